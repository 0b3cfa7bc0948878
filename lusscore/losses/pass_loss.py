"""The PASS objective assembled from its parts: SwAV's queue, the swapped-prediction loss on
the two large crops' codes, D2S on the same codes, P2P on the large crops' overlap.

Loss = w_swav * L_swav + w_d2s * L_d2s + w_p2p * L_p2p (a weight of 0 switches a part off).
"""
from __future__ import annotations

import torch

from lusscore.engine import Runtime
from lusscore.losses.swav import sinkhorn, swapped_prediction_loss

N_LARGE = 2  # codes come from the two large crops


class SwAVQueue:
    """Per large crop, a FIFO of the last embeddings (SwAV's queue), used once it is full."""

    def __init__(self, length: int, dim: int, device):
        self.tensor = torch.zeros(N_LARGE, length, dim, device=device)
        self.in_use = False

    @torch.no_grad()
    def codes_input(self, crop: int, scores: torch.Tensor, embedding: torch.Tensor,
                    prototypes: torch.Tensor) -> torch.Tensor:
        """As SwAV: scores of the queued embeddings (before this batch) + this batch's; then push."""
        q = self.tensor[crop]
        if self.in_use or not torch.all(q[-1] == 0):
            self.in_use = True
            scores = torch.cat([q @ prototypes.t(), scores])
        bs = embedding.shape[0]
        q[bs:] = q[:-bs].clone()
        q[:bs] = embedding
        return scores

    def state(self, rt: Runtime) -> dict:
        """Every rank's queue (gathered) for the checkpoint."""
        parts = [self.tensor.clone()]
        if rt.distributed:
            parts = [torch.empty_like(self.tensor) for _ in range(rt.world_size)]
            torch.distributed.all_gather(parts, self.tensor)
        return {"queue": torch.stack(parts).cpu(), "queue_in_use": self.in_use}

    def load(self, state: dict, rt: Runtime) -> None:
        self.tensor.copy_(state["queue"][rt.rank])
        self.in_use = bool(state["queue_in_use"])


def queue_state(queue: SwAVQueue | None, rt: Runtime) -> dict:
    return queue.state(rt) if queue is not None else {"queue": None, "queue_in_use": False}


def queue_length(length: int, rt: Runtime, per_rank: int) -> int:
    """A config's queue length per process, a multiple of the per-process batch."""
    length = int(length) // rt.world_size
    return length - length % per_rank


def pass_losses(out: dict, batch_size: int, n_crops: int, weights: dict, pcfg: dict,
                queue: SwAVQueue | None, prototypes: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """SwAV (+ D2S when the output has d2s_scores) on a multi-crop output:
    (weighted total, {part: loss})."""
    bs = batch_size
    scores = [s for s in out["scores"].float().split(bs)]
    emb = out["embedding"].float().split(bs)
    codes: list = [None] * n_crops
    for c in range(N_LARGE):
        s = scores[c].detach()
        if queue is not None:
            s = queue.codes_input(c, s, emb[c].detach(), prototypes.float())
        codes[c] = sinkhorn(s, pcfg["epsilon"], pcfg["sinkhorn_iterations"])[-bs:]
    temp = pcfg["temperature"]
    parts = {"swav": swapped_prediction_loss(scores, codes, temp)}
    if "d2s_scores" in out:
        parts["d2s"] = swapped_prediction_loss(list(out["d2s_scores"].float().split(bs)), codes, temp)
    total = sum(weights.get(k, 0.0) * v for k, v in parts.items())
    return total, parts


def add_p2p(model, out: dict, batch, bs: int, weights: dict, total, parts):
    """total + w_p2p * P2P of the two large crops' stage-4 maps (parts gets 'p2p')."""
    if model.p2p is None:
        return total
    maps = out["large_maps"]
    z1, z2 = maps[:bs], maps[bs:2 * bs]
    parts["p2p"] = model.p2p(z1.float(), z2.float(), batch.boxes[0], batch.boxes[1],
                             batch.flips[0], batch.flips[1])
    return total + weights["p2p"] * parts["p2p"]
