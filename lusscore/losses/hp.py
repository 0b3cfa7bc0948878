"""HP's objective on one batch: global hidden positives (GHP) from two reference pools, local
hidden positives (LHP) by mixing neighbouring codes (by the backbone's attention for a ViT, by
its feature affinity for a CNN), the consistency regulariser.

    L = tau / base_tau * (GHP + LHP) / 2 + alpha * R,
    GHP = sum_i w_i l(z_i) / sum_i w_i,  LHP = sum_i w_i l(z_i^mix) / sum_i w_i,
with l the fused hp_contrastive_loss (W_ij = 1[agnostic] + lambda(t) 1[specific], the sampled
denominator), w_i = sum_j W_ij (HP's reweighting of each anchor by its positives; anchors with
none drop out) and R the mean Euclidean distance between the codes of a crop and of its
photometric augmentation. The tau / base_tau factor is SupCon's, as HP's code keeps it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lusscore.ops import hp_contrastive_loss


def flat_pixels(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B*h*w, C)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def pool_thresholds(features: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """phi_i = max_m cos(features_i, pool_m) (both L2-normalised); +inf with an empty pool
    (no positive can pass it)."""
    if pool.shape[0] == 0:
        return features.new_full((features.shape[0],), float("inf"))
    return (features @ pool.T).max(1).values


def one_patch_per_image(features: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, C, h, w) -> (B, C): one random patch of each image (HP's pools hold one per image)."""
    b, _, h, w = features.shape
    idx = torch.randint(0, h * w, (b,), generator=generator).to(features.device)
    return features.flatten(2)[torch.arange(b, device=features.device), :, idx]


class RingPool:
    """The task-specific reference pool: the latest `size` rows added (the batches' EMA
    features, one patch per image), oldest overwritten first; or, renewed, the rows given."""

    def __init__(self, size: int, dim: int, device):
        self.rows = torch.zeros(size, dim, device=device)
        self.filled, self.next = 0, 0

    def add(self, rows: torch.Tensor) -> None:
        size = self.rows.shape[0]
        rows = rows[-size:]
        slots = (self.next + torch.arange(rows.shape[0], device=self.rows.device)) % size
        self.rows[slots] = rows.to(self.rows.dtype)
        self.next = (self.next + rows.shape[0]) % size
        self.filled = min(self.filled + rows.shape[0], size)

    def replace(self, rows: torch.Tensor) -> None:
        """The pool becomes `rows` (at most `size` of them; HP's renewal)."""
        self.filled, self.next = 0, 0
        self.add(rows)

    def view(self) -> torch.Tensor:
        return self.rows[:self.filled]

    def state(self) -> dict:
        return {"rows": self.rows.cpu(), "filled": self.filled, "next": self.next}

    def load(self, state: dict) -> None:
        self.rows.copy_(state["rows"])
        self.filled, self.next = int(state["filled"]), int(state["next"])


def neighbours(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, 9, h*w): each position's 3x3 window (zeros outside the image)."""
    b, c, h, w = x.shape
    return F.unfold(x, 3, padding=1).view(b, c, 9, h * w)


def _inside(b: int, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """(B, 9, h*w): which window entries lie inside the image."""
    return neighbours(like.new_ones(b, 1, h, w))[:, 0] > 0


def affinity_mix_weights(features: torch.Tensor) -> torch.Tensor:
    """LHP's weights for a CNN backbone: the window entries whose backbone-feature cosine
    affinity to the centre is at least the window's mean (the centre, affinity 1, always is),
    weighted by that affinity and normalised to sum 1. (B, C, h, w) -> (B, 9, h*w)."""
    b, _, h, w = features.shape
    fn = F.normalize(features, dim=1)
    inside = _inside(b, h, w, fn)
    affinity = (fn.flatten(2)[:, :, None] * neighbours(fn)).sum(1)  # (B, 9, hw)
    mean = (affinity * inside).sum(1, keepdim=True) / inside.sum(1, keepdim=True)
    weight = torch.where(inside & (affinity >= mean), affinity.clamp_min(0), torch.zeros_like(affinity))
    return weight / weight.sum(1, keepdim=True).clamp_min(1e-12)


def attention_mix_weights(attention: torch.Tensor, h: int, w: int, sharpness: float | None = None) -> torch.Tensor:
    """LHP's weights for a ViT, as HP computes them from the last block's patch-to-patch
    attention (B, hw, hw): each row clamped to its 10-90 % quantiles, softmax, times the
    sharpness (HP: 28, its grid side; default h), entries below the row's mean zeroed; then
    the 3x3 window's entries, divided by the number inside the image. -> (B, 9, h*w)."""
    a = attention.float()
    a = torch.max(torch.min(a, row_quantile(a, 0.9)), row_quantile(a, 0.1))
    a = a.softmax(-1) * (h if sharpness is None else sharpness)
    a = torch.where(a < a.mean(2, keepdim=True), torch.zeros_like(a), a)
    # The window's positions as flat indices (out-of-image ones point at 0, masked below).
    index = torch.arange(h * w, device=a.device, dtype=a.dtype).view(1, 1, h, w) + 1
    window = neighbours(index).long()[0, 0] - 1  # (9, hw), -1 outside
    inside = window >= 0
    rows = torch.arange(h * w, device=a.device).expand(9, -1)
    weight = a[:, rows, window.clamp_min(0)] * inside  # (B, 9, hw)
    return weight / inside.sum(0, keepdim=True)


def row_quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile(x, q, dim=-1, keepdim=True) (linear interpolation) by a sort, without
    torch.quantile's limit on the input's size."""
    xs = x.sort(-1).values
    pos = q * (x.shape[-1] - 1)
    lo = int(pos)
    hi = min(lo + 1, x.shape[-1] - 1)
    return torch.lerp(xs[..., lo:lo + 1], xs[..., hi:hi + 1], pos - lo)


def mix_codes(s: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each code replaced by the weighted sum of its 3x3 window: s (B, K, h, w), weights
    (B, 9, h*w) -> (B, K, h, w)."""
    b, k, h, w = s.shape
    return (neighbours(s) * weights[:, None].to(s.dtype)).sum(2).view(b, k, h, w)


def lambda_at(step: int, total: int, warmup: float) -> float:
    """lambda(t): 0 for the first `warmup` fraction of the steps, then linear up to 1 at the
    last step (HP's ramp, its warm-up given as a fraction instead of a step count)."""
    start = warmup * total
    if step <= start:
        return 0.0
    return min(1.0, (step - start) / max(total - 1 - start, 1e-9))


def hp_objective(z: torch.Tensor, z_mix: torch.Tensor, z_aug: torch.Tensor, f: torch.Tensor,
                 phi_f: torch.Tensor, s: torch.Tensor, phi_s: torch.Tensor, tau: float, rho: float,
                 lam: float, alpha: float, seed: int, base_tau: float = 0.07) -> tuple[torch.Tensor, dict]:
    """z, z_mix, z_aug (N, d) normalised codes of the anchors, of their LHP mixes and of the
    augmented crop; f, s (N, .) normalised agnostic and EMA features, phi_* their thresholds.
    -> (loss, {part: value})."""
    ghp, weight = hp_contrastive_loss(z, f, phi_f, s, phi_s, tau, rho, lam, seed)
    lhp, _ = hp_contrastive_loss(z_mix, f, phi_f, s, phi_s, tau, rho, lam, seed)
    total = weight.sum().clamp_min(1e-12)  # the loss is 0 where the weight is
    ghp, lhp = (ghp * weight).sum() / total, (lhp * weight).sum() / total
    consistency = (z - z_aug).norm(dim=1).mean()
    loss = tau / base_tau * (ghp + lhp) / 2 + alpha * consistency
    return loss, {"ghp": ghp.detach(), "lhp": lhp.detach(), "consistency": consistency.detach(),
                  "anchors_kept": (weight > 0).float().mean()}
