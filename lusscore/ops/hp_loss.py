"""hp_contrastive_loss: HP's hidden-positive contrastive loss over all pairs of a batch, fused
and tiled on CPU or CUDA (memory O(N * d), never the N x N similarity matrix).

For codes z (N, d), L2-normalised by the caller, task-agnostic features f (N, d_f) with
thresholds phi_f (N) and task-specific features s (N, d_s) with thresholds phi_s (N):
    W_ij = 1[f_i.f_j > phi_f[i] or phi_f[j]] + lam * 1[s_i.s_j > phi_s[i] or phi_s[j]], j != i
    D_i  = {j != i : W_ij > 0} + each other j != i drawn with probability rho (Philox keyed by
           (seed, i, j): the same set on CPU and CUDA, whatever the tiling)
    loss_i = -sum_j W_ij (z_i.z_j / tau - logsumexp_{k in D_i} z_i.z_k / tau) / sum_j W_ij
    weight_i = sum_j W_ij  (an anchor with weight 0 has loss 0)
Gradients flow to z only. The backward recomputes the similarity tiles and the draws.
"""
from __future__ import annotations

import torch

from lusscore.ops.switch import reference_enabled
from lusscore.reference import hp_loss as _reference

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _acc_dtype(z):
    return torch.float64 if z.dtype == torch.float64 else torch.float32


def _check_inputs(z, f, phi_f, s, phi_s, tau, rho, lam):
    for name, t, dims in (("z (N, d)", z, 2), ("f (N, d_f)", f, 2), ("s (N, d_s)", s, 2),
                          ("phi_f (N)", phi_f, 1), ("phi_s (N)", phi_s, 1)):
        torch._check(t.dim() == dims, lambda: f"{name} must have {dims} dimensions, got shape {tuple(t.shape)}")
        torch._check(t.dtype in _FLOATS, lambda: f"{name} must have a floating dtype, got {t.dtype}")
        torch._check(t.shape[0] == z.shape[0],
                     lambda: f"{name} must have N = {z.shape[0]} rows (those of z), got shape {tuple(t.shape)}")
        torch._check(t.device == z.device, lambda: f"{name} must be on {z.device} (z's device), got {t.device}")
    torch._check(tau > 0, lambda: f"tau must be a positive number, got {tau}")
    torch._check(0 <= rho <= 1, lambda: f"rho must lie in [0, 1], got {rho}")
    torch._check(lam >= 0, lambda: f"lam must be a finite number >= 0, got {lam}")


@torch.library.register_fake("lusscore::hp_contrastive_loss")
def _hp_loss_fake(z, f, phi_f, s, phi_s, tau, rho, lam, seed):
    _check_inputs(z, f, phi_f, s, phi_s, tau, rho, lam)
    n, dtype = z.shape[0], _acc_dtype(z)
    return z.new_empty(n, dtype=dtype), z.new_empty(n, dtype=dtype), z.new_empty(n, dtype=dtype)


@torch.library.register_fake("lusscore::hp_contrastive_loss_backward")
def _hp_loss_backward_fake(grad_loss, z, f, phi_f, s, phi_s, weight, lse, tau, rho, lam, seed):
    _check_inputs(z, f, phi_f, s, phi_s, tau, rho, lam)
    return z.new_empty(z.shape)


def _setup_context(ctx, inputs, output):
    z, f, phi_f, s, phi_s, tau, rho, lam, seed = inputs
    _, weight, lse = output
    ctx.save_for_backward(z, f, phi_f, s, phi_s, weight, lse)
    ctx.scalars = (tau, rho, lam, seed)
    ctx.mark_non_differentiable(weight, lse)


def _backward(ctx, grad_loss, _grad_weight, _grad_lse):
    z, f, phi_f, s, phi_s, weight, lse = ctx.saved_tensors
    grad_z = None
    if ctx.needs_input_grad[0] and grad_loss is not None:
        grad_z = torch.ops.lusscore.hp_contrastive_loss_backward(
            grad_loss, z, f, phi_f, s, phi_s, weight, lse, *ctx.scalars)
    return grad_z, None, None, None, None, None, None, None, None


torch.library.register_autograd("lusscore::hp_contrastive_loss", _backward,
                                setup_context=_setup_context)


def hp_contrastive_loss(z: torch.Tensor, f: torch.Tensor, phi_f: torch.Tensor, s: torch.Tensor,
                        phi_s: torch.Tensor, tau: float, rho: float, lam: float,
                        seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (loss (N), weight (N)), both float32 (float64 for float64 z).

    z, f, s, phi_f and phi_s may each be float32, bfloat16, float16 or float64 (read in the
    accumulation type), on one device; tau > 0, rho in [0, 1], lam >= 0. The caller
    normalises z, f and s; HP's anchor dropping and reweighting happen on top of the result.
    """
    if reference_enabled():
        _check_inputs(z, f, phi_f, s, phi_s, tau, rho, lam)
        return _reference.hp_contrastive_loss(z, f, phi_f, s, phi_s, tau, rho, lam, seed)
    loss, weight, _ = torch.ops.lusscore.hp_contrastive_loss(z, f, phi_f, s, phi_s, float(tau),
                                                            float(rho), float(lam), int(seed))
    return loss, weight
