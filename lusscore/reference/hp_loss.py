"""Reference of hp_contrastive_loss: chunks of anchors against every contrast, with the
similarity, positive and denominator masks materialised per chunk (chunk x N).

For anchors i and contrasts j != i (see csrc/hp_loss/hp_loss_kernel.h):
    ag = f_i.f_j > phi_f[i] or > phi_f[j];  sp = s_i.s_j > phi_s[i] or > phi_s[j]
    W_ij = ag + lam * sp;  D_i = {j : W_ij > 0} + each other j with probability rho
    loss_i = logsumexp_{k in D_i} x_ik - sum_j W_ij x_ij / sum_j W_ij,  x = z_i.z_j / tau
    weight_i = sum_j W_ij; an anchor with weight 0 has loss 0.
The rho-draws come from Philox4x32-10 keyed by (seed, i, j), the same on every device.
"""
from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
PHILOX_M = (0xD2511F53, 0xCD9E8D57)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of a * b for a 32-bit constant a and int64 b < 2^32, with
    int64 arithmetic only (16-bit halves keep every product below 2^63)."""
    p0 = a * (b & 0xFFFF)
    p1 = a * (b >> 16)
    mid = p0 + ((p1 & 0xFFFF) << 16)
    return ((p1 >> 16) + (mid >> 32)) & MASK32, mid & MASK32


def philox4x32_10(counter: tuple[torch.Tensor, ...], key: tuple[int, int]) -> list[torch.Tensor]:
    """Philox4x32-10 of counters given as four int64 tensors of 32-bit words (broadcast
    together) under a 2-word key; returns the four output words."""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) for c in counter)
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = _mulhilo(PHILOX_M[0], c0)
        hi1, lo1 = _mulhilo(PHILOX_M[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_W[0]) & MASK32, (k1 + PHILOX_W[1]) & MASK32
    return [c0, c1, c2, c3]


def keep_threshold(rho: float) -> int:
    """floor(rho * 2^24): a draw w is sampled when (w >> 8) < this."""
    return int(rho * 16777216.0)


def denominator_draws(seed: int, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """The 32-bit draw of each (anchor i, contrast j) (broadcast): word j % 4 of Philox with
    counter (i, j // 4) and key seed."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    q = j >> 2
    words = philox4x32_10((i & MASK32, i >> 32, q & MASK32, q >> 32), (seed & MASK32, seed >> 32))
    shape = torch.broadcast_shapes(i.shape, j.shape)
    stacked = torch.stack([w.expand(shape) for w in words], dim=-1)
    return stacked.gather(-1, (j & 3).expand(shape).unsqueeze(-1)).squeeze(-1)


def pair_weights(f, phi_f, s, phi_s, lam, rows: slice) -> torch.Tensor:
    """W (rows x N) of the anchors in `rows`, the diagonal included (the caller drops it)."""
    sim_f = f[rows] @ f.T
    sim_s = s[rows] @ s.T
    ag = (sim_f > phi_f[rows, None]) | (sim_f > phi_f[None])
    sp = (sim_s > phi_s[rows, None]) | (sim_s > phi_s[None])
    return ag.to(f.dtype) + lam * sp.to(f.dtype)


def hp_contrastive_loss(z, f, phi_f, s, phi_s, tau: float, rho: float, lam: float, seed: int,
                        chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss (N), weight (N)) in fp32 (fp64 for fp64 z), differentiable w.r.t. z."""
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    z, f, s, phi_f, phi_s = (t.to(acc) for t in (z, f, s, phi_f, phi_s))
    n = z.shape[0]
    keep = keep_threshold(rho)
    contrasts = torch.arange(n, device=z.device)
    losses, weights = [], []
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        anchors = contrasts[rows, None]
        other = anchors != contrasts[None]
        w_pairs = pair_weights(f, phi_f, s, phi_s, lam, rows) * other
        sampled = (denominator_draws(seed, anchors, contrasts[None]) >> 8) < keep
        in_denominator = ((w_pairs > 0) | sampled) & other
        x = z[rows] @ z.T / tau
        weight = w_pairs.sum(1)
        has_positive = weight > 0
        # Rows without positives are zeroed before the log-sum-exp, so no -inf reaches it.
        masked = torch.where(has_positive[:, None], x.masked_fill(~in_denominator, float("-inf")),
                             torch.zeros_like(x))
        lse = torch.logsumexp(masked, dim=1)
        loss = lse - (w_pairs * x).sum(1) / weight.clamp_min(1e-30)
        losses.append(torch.where(has_positive, loss, torch.zeros_like(loss)))
        weights.append(weight)
    if not losses:  # N = 0: empty results that still belong to z's graph
        return z.sum(1), z.sum(1).detach()
    return torch.cat(losses), torch.cat(weights)
