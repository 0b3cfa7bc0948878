"""LARS over SGD with momentum, and the per-iteration cosine schedule (SwAV/PASS recipe)."""
from __future__ import annotations

import math

import torch


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose step is scaled per tensor by the LARS trust ratio.

    As apex's LARC(clip=False) around SGD in the reference code: for each parameter,
    g <- (g + wd * p) * trust * ||p|| / (||g|| + wd * ||p|| + eps), then SGD momentum.
    Parameters with ndim <= 1 (biases, BN) may be excluded from the adaptation and decay.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 1e-6,
                 trust_coefficient: float = 0.001, eps: float = 1e-8, exclude_1d: bool = False):
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coefficient <= 0:
            raise ValueError("LARS: lr, momentum and weight_decay must be >= 0, trust > 0")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, eps=eps, exclude_1d=exclude_1d)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd, mom, lr = group["weight_decay"], group["momentum"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if not (group["exclude_1d"] and p.ndim <= 1):
                    p_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(g)
                    ratio = group["trust_coefficient"] * p_norm / (g_norm + wd * p_norm + group["eps"])
                    # As apex LARC: an all-zero parameter or gradient keeps its plain gradient.
                    g = torch.where((p_norm > 0) & (g_norm > 0), (g + wd * p) * ratio, g)
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = g.clone()
                else:
                    buf.mul_(mom).add_(g)
                p.add_(buf, alpha=-lr)
        return loss


def cosine_schedule(base_lr: float, final_lr: float, total_iters: int, warmup_iters: int = 0,
                    start_warmup_lr: float = 0.0) -> list[float]:
    """Per-iteration learning rates: linear warm-up, then cosine from base_lr to final_lr."""
    if total_iters < 0 or warmup_iters < 0:
        raise ValueError("cosine_schedule: iteration counts must be >= 0")
    warmup_iters = min(warmup_iters, total_iters)
    lrs = [start_warmup_lr + (base_lr - start_warmup_lr) * i / warmup_iters
           for i in range(warmup_iters)]
    rest = total_iters - warmup_iters
    lrs += [final_lr + 0.5 * (base_lr - final_lr) * (1 + math.cos(math.pi * t / rest))
            for t in range(rest)]
    return lrs
