"""overlap_gather: sample two views' feature maps on an S x S lattice spanning the overlap of
their crop boxes (the P2P loss of PASS), with a deterministic backward, on CPU or CUDA.

Geometry (per pair b): boxes are (left, top, width, height) in original-image pixels. The
overlap of the two boxes is expressed in each view's normalised [0, 1] frame; the lattice
spans it edge to edge inclusive (point k at k / (S - 1); the centre when S = 1) or, with
cell_centers, at (k + 1/2) / S; x is mirrored (u -> 1 - u) in a flipped view; each map is
sampled bilinearly with zero padding at pixel u * W - 1/2, which is exactly
F.grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False) with grid 2u - 1.
Pairs whose boxes do not overlap give zeros and valid = False.
"""
from __future__ import annotations

import torch

from lusscore.ops.switch import reference_enabled
from lusscore.reference import overlap_gather as _reference


def _channels_last(t: torch.Tensor) -> bool:
    # As the kernels decide: channels-last only when not also plain contiguous.
    return (not t.is_contiguous()) and t.is_contiguous(memory_format=torch.channels_last)


def _memory_format(t: torch.Tensor):
    return torch.channels_last if _channels_last(t) else torch.contiguous_format


def _check_pairs(ref, batch, boxes1, boxes2, flips1, flips2, size):
    torch._check(1 <= size <= 1024, lambda: f"overlap_gather: size must be in [1, 1024], got {size}")
    for name, t in (("boxes1", boxes1), ("boxes2", boxes2), ("flips1", flips1), ("flips2", flips2)):
        torch._check(t.device == ref.device,
                     lambda: f"features and {name} must be on the same device, got {ref.device} "
                             f"and {t.device}")
    for name, b in (("boxes1", boxes1), ("boxes2", boxes2)):
        torch._check(b.dtype in (torch.float32, torch.float64),
                     lambda: f"{name} must be float32 or float64, got {b.dtype}")
        torch._check(b.dim() == 2 and b.shape[0] == batch and b.shape[1] == 4,
                     lambda: f"{name} must have shape (B, 4) = ({batch}, 4), got {tuple(b.shape)}")
    for name, fl in (("flips1", flips1), ("flips2", flips2)):
        torch._check(fl.dtype in (torch.bool, torch.uint8, torch.int32, torch.int64),
                     lambda: f"{name} must be bool, uint8, int32 or int64, got {fl.dtype}")
        torch._check(fl.dim() == 1 and fl.shape[0] == batch,
                     lambda: f"{name} must have shape ({batch},), got {tuple(fl.shape)}")


@torch.library.register_fake("lusscore::overlap_gather")
def _overlap_gather_fake(f1, f2, boxes1, boxes2, flips1, flips2, size, cell_centers):
    torch._check(f1.dim() == 4 and f2.dim() == 4,
                 lambda: f"f1 and f2 must be (B, C, H, W), got {tuple(f1.shape)}, {tuple(f2.shape)}")
    torch._check(f1.dtype == f2.dtype, lambda: "f1 and f2 must have the same dtype")
    torch._check(f1.shape[0] == f2.shape[0], lambda: "f1 and f2 must have the same batch size")
    _check_pairs(f1, f1.shape[0], boxes1, boxes2, flips1, flips2, size)
    g1 = torch.empty((f1.shape[0], f1.shape[1], size, size), dtype=f1.dtype, device=f1.device,
                     memory_format=_memory_format(f1))
    g2 = torch.empty((f2.shape[0], f2.shape[1], size, size), dtype=f2.dtype, device=f2.device,
                     memory_format=_memory_format(f2))
    return g1, g2, f1.new_empty((f1.shape[0],), dtype=torch.bool)


@torch.library.register_fake("lusscore::overlap_gather_backward")
def _overlap_gather_backward_fake(grad_g1, grad_g2, boxes1, boxes2, flips1, flips2, height1,
                                  width1, height2, width2, size, cell_centers):
    torch._check(grad_g1.dim() == 4 and grad_g2.dim() == 4, lambda: "grads must be 4-D")
    torch._check(grad_g1.dtype == grad_g2.dtype, lambda: "grads must have the same dtype")
    _check_pairs(grad_g1, grad_g1.shape[0], boxes1, boxes2, flips1, flips2, size)
    gf1 = torch.empty((grad_g1.shape[0], grad_g1.shape[1], height1, width1), dtype=grad_g1.dtype,
                      device=grad_g1.device, memory_format=_memory_format(grad_g1))
    gf2 = torch.empty((grad_g2.shape[0], grad_g2.shape[1], height2, width2), dtype=grad_g2.dtype,
                      device=grad_g2.device, memory_format=_memory_format(grad_g2))
    return gf1, gf2


def _setup_context(ctx, inputs, output):
    f1, f2, boxes1, boxes2, flips1, flips2, size, cell_centers = inputs
    ctx.save_for_backward(boxes1, boxes2, flips1, flips2)
    ctx.maps = (f1.shape[2], f1.shape[3], f2.shape[2], f2.shape[3])
    ctx.f_shapes = (f1.shape, f2.shape)
    ctx.size, ctx.cell_centers = size, cell_centers


def _backward(ctx, grad_g1, grad_g2, grad_valid):
    boxes1, boxes2, flips1, flips2 = ctx.saved_tensors
    (s1, s2), S = ctx.f_shapes, ctx.size
    if grad_g1 is None:
        grad_g1 = boxes1.new_zeros((s1[0], s1[1], S, S), dtype=grad_g2.dtype)
    if grad_g2 is None:
        grad_g2 = boxes1.new_zeros((s2[0], s2[1], S, S), dtype=grad_g1.dtype)
    gf1, gf2 = torch.ops.lusscore.overlap_gather_backward(
        grad_g1, grad_g2, boxes1, boxes2, flips1, flips2, *ctx.maps, S, ctx.cell_centers)
    return gf1, gf2, None, None, None, None, None, None


torch.library.register_autograd("lusscore::overlap_gather", _backward,
                                setup_context=_setup_context)


# The backward is linear in the grads; its own backward is the forward (double backward).
def _setup_context_backward(ctx, inputs, output):
    _, _, boxes1, boxes2, flips1, flips2, *_, size, cell_centers = inputs
    ctx.save_for_backward(boxes1, boxes2, flips1, flips2)
    ctx.size, ctx.cell_centers = size, cell_centers


def _backward_backward(ctx, grad_gf1, grad_gf2):
    boxes1, boxes2, flips1, flips2 = ctx.saved_tensors
    gg1, gg2, _ = torch.ops.lusscore.overlap_gather(grad_gf1, grad_gf2, boxes1, boxes2, flips1,
                                                    flips2, ctx.size, ctx.cell_centers)
    return (gg1, gg2) + (None,) * 10


torch.library.register_autograd("lusscore::overlap_gather_backward", _backward_backward,
                                setup_context=_setup_context_backward)


def overlap_gather(f1: torch.Tensor, f2: torch.Tensor, boxes1: torch.Tensor,
                   boxes2: torch.Tensor, flips1: torch.Tensor, flips2: torch.Tensor,
                   size: int = 7, cell_centers: bool = False):
    """Sample both views on the S x S overlap lattice.

    f1, f2: (B, C1, H1, W1), (B, C2, H2, W2) float32/float64/float16/bfloat16 maps
    (contiguous or channels-last); boxes1, boxes2: (B, 4) float (left, top, width, height)
    in original-image pixels; flips1, flips2: (B) bool/int, true where the view was
    mirrored horizontally. Returns g1 (B, C1, S, S), g2 (B, C2, S, S) laid out like their
    maps, and valid (B) bool (False: no overlap, g1 = g2 = 0 there). On CUDA one batch item
    of a map (C x H x W, and C x S x S) must hold fewer than 2^31 elements.
    """
    if reference_enabled():
        _overlap_gather_fake(f1, f2, boxes1, boxes2, flips1, flips2, size, cell_centers)
        g1, g2, valid = _reference.overlap_gather(f1, f2, boxes1, boxes2, flips1, flips2, size,
                                                  cell_centers)
        return (g1.to(f1.dtype, memory_format=_memory_format(f1)),
                g2.to(f2.dtype, memory_format=_memory_format(f2)), valid)
    return torch.ops.lusscore.overlap_gather(f1, f2, boxes1, boxes2, flips1, flips2, size,
                                             cell_centers)
