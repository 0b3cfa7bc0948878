"""attention_pool: fused pixel-attention pooling of PASS on CPU or CUDA.

pooled (B, L) = mean_hw(sigmoid(a + theta) * x), accumulated in fp32, and optionally the
per-pixel channel-mean attention (B, H, W). The backward is its own op; it recomputes the
sigmoid instead of storing it and gives grad_theta by a deterministic reduction. Both
outputs are differentiable w.r.t. a and theta (pooled also w.r.t. x).
"""
from __future__ import annotations

import torch

from lusscore.ops.switch import reference_enabled
from lusscore.reference import attention_pool as _reference

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_inputs(x, a, theta):
    torch._check(x.dim() == 4, lambda: f"x (B, L, H, W) must have 4 dimensions, got shape {tuple(x.shape)}")
    torch._check(a.shape == x.shape, lambda: f"a must have the shape of x {tuple(x.shape)}, got {tuple(a.shape)}")
    torch._check(x.dtype in _FLOATS, lambda: f"x must have a floating dtype, got {x.dtype}")
    torch._check(a.dtype == x.dtype, lambda: f"a must have the dtype of x ({x.dtype}), got {a.dtype}")
    torch._check(theta.dim() == 1 and theta.shape[0] == x.shape[1],
                 lambda: f"theta must have shape ({x.shape[1]},), got {tuple(theta.shape)}")
    torch._check(theta.dtype in _FLOATS, lambda: f"theta must have a floating dtype, got {theta.dtype}")


@torch.library.register_fake("lusscore::attention_pool")
def _attention_pool_fake(x, a, theta, return_mean_attention):
    _check_inputs(x, a, theta)
    b, l, h, w = x.shape
    pooled = x.new_empty((b, l))
    mean = x.new_empty((b, h, w)) if return_mean_attention else x.new_empty((0,))
    return pooled, mean


@torch.library.register_fake("lusscore::attention_pool_backward")
def _attention_pool_backward_fake(grad_pooled, grad_mean_attention, x, a, theta, compute_grad_x):
    _check_inputs(x, a, theta)
    torch._check(grad_pooled.shape == x.shape[:2],
                 lambda: f"grad_pooled must have shape {tuple(x.shape[:2])}, got {tuple(grad_pooled.shape)}")
    grad_x = x.new_empty(x.shape) if compute_grad_x else x.new_empty((0,))
    return grad_x, a.new_empty(a.shape), theta.new_empty(theta.shape)


def _setup_context(ctx, inputs, output):
    x, a, theta, return_mean_attention = inputs
    ctx.save_for_backward(x, a, theta)
    ctx.return_mean_attention = return_mean_attention


def _backward(ctx, grad_pooled, grad_mean):
    x, a, theta = ctx.saved_tensors
    if grad_pooled is None:
        grad_pooled = x.new_zeros(x.shape[:2])
    if not ctx.return_mean_attention or grad_mean is None:
        grad_mean = None
    grad_x, grad_a, grad_theta = torch.ops.lusscore.attention_pool_backward(
        grad_pooled, grad_mean, x, a, theta, bool(ctx.needs_input_grad[0]))
    return (grad_x if ctx.needs_input_grad[0] else None,
            grad_a if ctx.needs_input_grad[1] else None,
            grad_theta if ctx.needs_input_grad[2] else None, None)


torch.library.register_autograd("lusscore::attention_pool", _backward, setup_context=_setup_context)


def attention_pool(x: torch.Tensor, a: torch.Tensor, theta: torch.Tensor,
                   return_mean_attention: bool = False):
    """x, a (B, L, H, W) of one float dtype, theta (L) -> (pooled (B, L), mean_attention).

    mean_attention is (B, H, W) when return_mean_attention, else an empty tensor. Outputs
    have x's dtype; sums are accumulated in fp32 (fp64 for fp64 inputs). x and a may be
    float32, bfloat16 or float16 on both devices, float64 on the CPU only; theta may have
    any of the four float dtypes on both (read in the accumulation type; its gradient comes
    back in its own dtype). H * W must be below 2^25. Channels-last inputs are accepted (the
    kernels read a contiguous copy).
    """
    if reference_enabled():
        _check_inputs(x, a, theta)
        pooled, mean = _reference.attention_pool(x, a, theta, return_mean_attention)
        return pooled.to(x.dtype), mean.to(x.dtype)
    return torch.ops.lusscore.attention_pool(x, a, theta, return_mean_attention)
