"""The PASS objective assembled from its parts: SwAV's queue, the swapped-prediction loss on
the two large crops' codes, D2S on the same codes, P2P on the large crops' overlap, and for
PASS_p (pretrain.method pixpro) PixPro's loss on the large crops.

Loss = [L_pixpro +] w_swav * L_swav + w_d2s * L_d2s + w_p2p * L_p2p (a weight of 0 switches a
part off; with pixpro, L_swav is the clustering loss the paper adds to PixPro, Tab 7a).
L_d2s sums one term per supervised stage, as the reference code weights them: its
`--weights 1 1` (D2S3) is {swav: 1/2, d2s: 1/2} here, `--weights 1 1 1` (D2S32) {swav: 1/3,
d2s: 1/3}.
"""
from __future__ import annotations

import torch

from lusscore.engine import Runtime
from lusscore.losses.swav import sinkhorn, swapped_prediction_loss
from lusscore.utils import LusscoreError

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


D2S_VIEWS = ("cross", "same")
D2S_TARGETS = ("deep", "same_stage")


def d2s_options(pcfg: dict) -> dict:
    """pretrain.d2s, checked: stages (the shallow stages supervised, e.g. [3] or [3, 2]),
    view (cross: one large crop's codes supervise the other crop's shallow output, as the
    paper; same: its own) and target (deep: the codes of the last stage, as the paper;
    same_stage: codes of the shallow stage's own scores, Tab 8c)."""
    d = dict(pcfg["d2s"])
    stages = [int(v) for v in d.get("stages", [3])]
    if not stages or any(v not in (1, 2, 3) for v in stages) or len(set(stages)) < len(stages):
        raise LusscoreError(f"pretrain.d2s.stages must list distinct shallow stages among 1, 2, "
                            f"3, got {d.get('stages')}")
    if d.get("view", "cross") not in D2S_VIEWS:
        raise LusscoreError(f"pretrain.d2s.view must be one of {D2S_VIEWS}, got {d['view']!r}")
    if d.get("target", "deep") not in D2S_TARGETS:
        raise LusscoreError(f"pretrain.d2s.target must be one of {D2S_TARGETS}, got "
                            f"{d['target']!r}")
    return {"stages": stages, "view": d.get("view", "cross"), "target": d.get("target", "deep")}


def p2p_options(pcfg: dict) -> dict:
    """pretrain.p2p, checked: kind (noncontrastive, PASS; contrastive; clustering: Tab 8a),
    pixel_mlp (false: no M_p, Tab 8b) and temperature (of the contrastive and clustering
    kinds)."""
    from lusscore.losses.p2p import P2P_KINDS
    d = {"kind": "noncontrastive", "pixel_mlp": True, "temperature": 0.1, **dict(pcfg["p2p"])}
    if d["kind"] not in P2P_KINDS:
        raise LusscoreError(f"pretrain.p2p.kind must be one of {P2P_KINDS}, got {d['kind']!r}")
    if not isinstance(d["pixel_mlp"], bool):
        raise LusscoreError(f"pretrain.p2p.pixel_mlp must be true or false, got {d['pixel_mlp']!r}")
    if not d["temperature"] > 0:
        raise LusscoreError(f"pretrain.p2p.temperature must be > 0, got {d['temperature']!r}")
    return d


PRETRAIN_METHODS = ("swav", "pixpro")
PIXPRO_KEYS = ("momentum", "gamma", "threshold", "transform_layers")


def pixpro_options(pcfg: dict) -> dict | None:
    """PixProBranch's options from pretrain.pixpro when pretrain.method is pixpro (PASS_p),
    None for swav (PASS_s); checked."""
    method = pcfg["method"]
    if method not in PRETRAIN_METHODS:
        raise LusscoreError(f"pretrain.method must be one of {PRETRAIN_METHODS}, got {method!r}")
    if method == "swav":
        return None
    d = dict(pcfg["pixpro"])
    unknown = sorted(set(d) - set(PIXPRO_KEYS))
    if unknown:
        raise LusscoreError(f"pretrain.pixpro: unknown keys {unknown}; known: {list(PIXPRO_KEYS)}")
    if not 0 <= float(d["momentum"]) <= 1:
        raise LusscoreError(f"pretrain.pixpro.momentum must lie in [0, 1], got {d['momentum']!r}")
    if not float(d["gamma"]) > 0 or not float(d["threshold"]) > 0:
        raise LusscoreError(f"pretrain.pixpro.gamma and threshold must be > 0, got "
                            f"{d['gamma']!r} and {d['threshold']!r}")
    if d["transform_layers"] not in (0, 1, 2):
        raise LusscoreError(f"pretrain.pixpro.transform_layers must be 0, 1 or 2, got "
                            f"{d['transform_layers']!r}")
    return {"momentum": float(d["momentum"]), "gamma": float(d["gamma"]),
            "threshold": float(d["threshold"]), "transform_layers": int(d["transform_layers"])}


def d2s_loss(shallow: dict, codes: list, bs: int, pcfg: dict) -> torch.Tensor:
    """Sum over the supervised stages of the swapped prediction between the large crops'
    codes and their shallow outputs (Eq. 4: u_1^(4) predicts u_2^(j) and back)."""
    opts, temp = d2s_options(pcfg), pcfg["temperature"]
    total = None
    for scores in shallow.values():
        crops = scores.float().split(bs)[:N_LARGE]
        if opts["target"] == "same_stage":
            targets = [sinkhorn(c.detach(), pcfg["epsilon"], pcfg["sinkhorn_iterations"])
                       for c in crops]
        else:
            targets = codes[:N_LARGE]
        term = sum(-(targets[i] * torch.log_softmax(
            crops[N_LARGE - 1 - i if opts["view"] == "cross" else i] / temp, dim=1)).sum(1).mean()
            for i in range(N_LARGE)) / N_LARGE
        total = term if total is None else total + term
    return total


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
        parts["d2s"] = d2s_loss(out["d2s_scores"], codes, bs, pcfg)
    total = sum(weights.get(k, 0.0) * v for k, v in parts.items())
    return total, parts


def add_pixpro(model, out: dict, batch, bs: int, total, parts):
    """total + L_pixpro of the two large crops (parts gets 'pixpro'): PASS_p's L_e (weight 1)."""
    if model.pixpro is None:
        return total
    maps, images = out["large_maps"][:N_LARGE * bs], out["large_images"][:N_LARGE * bs]
    parts["pixpro"] = model.pixpro.loss(maps, images, batch.boxes[:N_LARGE], batch.flips[:N_LARGE])
    return total + parts["pixpro"]


def add_p2p(model, out: dict, batch, bs: int, weights: dict, total, parts, pcfg: dict):
    """total + w_p2p * P2P of the two large crops' stage-4 maps (parts gets 'p2p')."""
    if model.p2p is None:
        return total
    maps = out["large_maps"]
    z1, z2 = maps[:bs], maps[bs:2 * bs]
    # The clustering kind scores lattice points against the detached prototypes: like D2S,
    # it trains the pixel branch, not the prototypes.
    parts["p2p"] = model.p2p(z1.float(), z2.float(), batch.boxes[0], batch.boxes[1],
                             batch.flips[0], batch.flips[1],
                             prototypes=model.prototypes.weight.detach().float(),
                             epsilon=pcfg["epsilon"],
                             sinkhorn_iterations=pcfg["sinkhorn_iterations"])
    return total + weights["p2p"] * parts["p2p"]
