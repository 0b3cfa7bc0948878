"""Pure-PyTorch reference of attention_pool: what the fused kernels must compute."""
from __future__ import annotations

import torch


def attention_pool(x: torch.Tensor, a: torch.Tensor, theta: torch.Tensor,
                   return_mean_attention: bool = False):
    """pooled (B, L) = mean_hw(sigmoid(a + theta) * x); optionally mean_l sigmoid (B, H, W).

    Computed in the inputs' dtype (eager PyTorch semantics); materialises sigmoid(a + theta).
    """
    c = torch.sigmoid(a + theta.to(a.dtype).view(1, -1, 1, 1))
    pooled = (c * x).mean(dim=(2, 3))
    if return_mean_attention:
        return pooled, c.mean(dim=1)
    return pooled, x.new_empty(0)


def attention_pool_fp32(x, a, theta, return_mean_attention: bool = False):
    """The reference evaluated in float32 (float64 stays float64), cast back to x's dtype."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    pooled, mean = attention_pool(x.to(acc), a.to(acc), theta.to(acc), return_mean_attention)
    return pooled.to(x.dtype), mean.to(x.dtype)
