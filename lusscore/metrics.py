"""The ImageNet-S evaluator: mIoU, boundary mIoU, Img-Acc, F-measure and size buckets,
exactly as the official code defines them (see the quirks in the docs), streamed through the
seg_metrics_update_ op. Accumulators keep raw predicted ids, so any match (none, Hungarian or
a file) is applied in `compute`, after the single pass over the maps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from lusscore.utils import LusscoreError

KEYS = ("Acc", "mIoU", "mBIoU", "FMeasure", "S", "MS", "ML", "L", "BS", "BMS", "BML", "BL")
BUCKETS = ("S", "MS", "ML", "L")
# The matches `compute` finds itself: the official one (image-level co-occurrence) and HP's
# (pixel-level agreement).
MATCH_MODES = ("hungarian", "hungarian-pixel")


@dataclass
class _ImageStats:
    """Per-image sparse histograms (raw predicted rows and GT ids), concatenated."""
    img: list = field(default_factory=list)      # image index of each pred entry
    pid: list = field(default_factory=list)      # pred row
    pcnt: list = field(default_factory=list)     # its pixels (valid)
    pfg: list = field(default_factory=list)      # its pixels on GT != 0
    gimg: list = field(default_factory=list)
    gid: list = field(default_factory=list)      # GT id, C+1 = outside 0..C
    gcnt: list = field(default_factory=list)

    def arrays(self):
        cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64)  # noqa: E731
        return {k: cat(getattr(self, k)) for k in
                ("img", "pid", "pcnt", "pfg", "gimg", "gid", "gcnt")}


def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        if not np.issubdtype(x.dtype, np.integer):
            raise LusscoreError(f"{name} must hold integer label ids, got dtype {x.dtype}")
        if x.dtype not in (np.int8, np.int16, np.int32, np.int64, np.uint8):
            x = x.astype(np.int64)
        return torch.from_numpy(np.ascontiguousarray(x))
    raise LusscoreError(f"{name} must be a torch tensor or a numpy array, got {type(x).__name__}")


class SegEvaluator:
    """Streaming ImageNet-S metrics.

    update(pred, gt): one (H, W) map pair or a (B, H, W) batch (tensors or numpy).
    compute(match=None | "hungarian" | {pred id: gt id}): every official number.
    pred_lut: relabel predictions before the bands (PASS's evaluator); then compute() with
    match=None applies nothing more.
    """

    def __init__(self, num_classes: int, ignore_index: int = 1000, boundary_ratio: float = 0.03,
                 device="cpu", pred_lut: dict[int, int] | None = None,
                 max_pred_rows: int | None = None):
        if num_classes < 1:
            raise LusscoreError(f"num_classes must be >= 1, got {num_classes}")
        import lusscore.ops  # noqa: F401  (registers the op)
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.boundary_ratio = float(boundary_ratio)
        self.device = torch.device(device)
        # Predicted ids beyond C keep rows of their own (a match file may map them) up to
        # this many rows; larger ids are only counted as 'out of range'.
        self.max_pred_rows = max_pred_rows or max(2 * (num_classes + 1), 1024)
        self.pred_lut = None
        if pred_lut is not None:
            size = max(pred_lut) + 1
            lut = torch.arange(size, dtype=torch.int64)
            for k, v in pred_lut.items():
                if k >= 0:
                    lut[k] = v
            self.pred_lut = lut.to(self.device)
        self.reset()

    # ---------------------------------------------------------------- accumulation
    def reset(self) -> None:
        c = self.num_classes
        self.rows = c + 1
        kw = dict(dtype=torch.int64, device=self.device)
        self.region_conf = torch.zeros(5, self.rows + 1, c + 1, **kw)
        self.boundary_conf = torch.zeros(5, self.rows + 1, c + 2, **kw)
        self.num_images = 0
        self.out_of_range_ids: set[int] = set()
        self._stats = _ImageStats()

    def _grow(self, rows: int) -> None:
        """Give predicted ids up to rows-1 their own rows (the overflow row moves last)."""
        def grow(t):
            new = t.new_zeros(t.shape[0], rows + 1, t.shape[2])
            new[:, :self.rows] = t[:, :self.rows]
            new[:, rows] = t[:, self.rows]
            return new
        self.region_conf = grow(self.region_conf)
        self.boundary_conf = grow(self.boundary_conf)
        self.rows = rows

    def update(self, pred, gt, names: list[str] | None = None) -> None:
        pred, gt = _as_tensor(pred, "pred"), _as_tensor(gt, "gt")
        if pred.shape != gt.shape:
            where = f" ({names[0]})" if names else ""
            raise LusscoreError(f"prediction size {tuple(pred.shape)} does not match the GT size "
                                f"{tuple(gt.shape)}{where}")
        if pred.dim() == 2:
            pred, gt = pred[None], gt[None]
        if pred.dim() != 3:
            raise LusscoreError(f"pred must be (H, W) or (B, H, W), got shape {tuple(pred.shape)}")
        batch = pred.shape[0]
        if batch == 0:
            return
        pred, gt = pred.to(self.device), gt.to(self.device)
        if pred.numel():
            lo, hi = torch.aminmax(pred if self.pred_lut is None else self._relabel(pred))
            lo, hi = int(lo), int(hi)
            c = self.num_classes
            if hi > c or lo < 0:
                q = pred if self.pred_lut is None else self._relabel(pred)
                odd = torch.unique(q[(q > c) | (q < 0)])
                self.out_of_range_ids.update(int(v) for v in odd.tolist())
                if hi >= self.rows and self.rows < self.max_pred_rows:
                    self._grow(min(hi + 1, self.max_pred_rows))
        pred_stats = torch.empty(batch, 2, self.rows + 1, dtype=torch.int64, device=self.device)
        gt_hist = torch.empty(batch, self.num_classes + 2, dtype=torch.int64, device=self.device)
        from lusscore.ops.seg_metrics import seg_metrics_update_  # the fused op or its reference
        seg_metrics_update_(pred, gt, self.num_classes, self.region_conf, self.boundary_conf,
                            pred_stats, gt_hist, self.ignore_index, self.boundary_ratio,
                            self.pred_lut)
        self._fold(pred_stats.cpu().numpy(), gt_hist.cpu().numpy(), names)

    def _relabel(self, pred: torch.Tensor) -> torch.Tensor:
        lut = self.pred_lut
        inside = (pred >= 0) & (pred < lut.numel())
        return torch.where(inside, lut[pred.clamp(0, lut.numel() - 1).long()], pred.long())

    def _fold(self, pred_stats: np.ndarray, gt_hist: np.ndarray, names) -> None:
        c = self.num_classes
        bad = np.nonzero(gt_hist[:, c + 1])[0]
        if bad.size:
            which = names[bad[0]] if names else f"image {self.num_images + int(bad[0])}"
            raise LusscoreError(
                f"{which}: the GT holds {int(gt_hist[bad[0], c + 1])} pixels with ids outside "
                f"0..{c} that are not the ignore id {self.ignore_index}")
        s = self._stats
        for b in range(pred_stats.shape[0]):
            i = self.num_images + b
            pid = np.nonzero(pred_stats[b, 0])[0]
            s.img.append(np.full(pid.size, i, dtype=np.int64))
            s.pid.append(pid)
            s.pcnt.append(pred_stats[b, 0, pid])
            s.pfg.append(pred_stats[b, 1, pid])
            gid = np.nonzero(gt_hist[b])[0]
            s.gimg.append(np.full(gid.size, i, dtype=np.int64))
            s.gid.append(gid)
            s.gcnt.append(gt_hist[b, gid])
        self.num_images += pred_stats.shape[0]

    # ---------------------------------------------------------------- merging
    def state(self) -> dict:
        """A compact, picklable copy of everything accumulated (sparse accumulators)."""
        def sparse(t):
            idx = torch.nonzero(t.reshape(-1)).reshape(-1)
            return idx.cpu().numpy(), t.reshape(-1)[idx].cpu().numpy()
        return {"rows": self.rows, "num_images": self.num_images,
                "region": sparse(self.region_conf), "boundary": sparse(self.boundary_conf),
                "stats": self._stats.arrays(), "out_of_range_ids": sorted(self.out_of_range_ids)}

    def merge(self, state: dict) -> None:
        """Add another evaluator's state(); its images come after the ones seen so far."""
        rows = state["rows"]
        if rows > self.rows:
            self._grow(rows)

        def add(acc, sparse_part):
            idx, val = sparse_part
            if idx.size == 0:
                return
            old_rows, cols = rows + 1, acc.shape[2]
            s, rest = np.divmod(idx, old_rows * cols)
            r, c = np.divmod(rest, cols)
            r = np.where(r == rows, self.rows, r)  # the overflow row stays last
            flat = torch.from_numpy((s * (self.rows + 1) + r) * cols + c).to(acc.device)
            acc.view(-1).index_add_(0, flat, torch.from_numpy(val).to(acc.device))
        add(self.region_conf, state["region"])
        add(self.boundary_conf, state["boundary"])
        for k, v in state["stats"].items():
            getattr(self._stats, k).append(v + self.num_images if k in ("img", "gimg") else v)
        self.num_images += state["num_images"]
        self.out_of_range_ids.update(state["out_of_range_ids"])

    # ---------------------------------------------------------------- distributed
    def all_reduce(self, group=None) -> None:
        """Sum the accumulators of every rank (torch.distributed) into each rank."""
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()):
            return
        world = dist.get_world_size(group)
        rows = [None] * world
        dist.all_gather_object(rows, self.rows, group=group)
        if max(rows) > self.rows:
            self._grow(max(rows))
        dist.all_reduce(self.region_conf, group=group)
        dist.all_reduce(self.boundary_conf, group=group)
        parts = [None] * world
        mine = (self.num_images, self._stats.arrays(), sorted(self.out_of_range_ids))
        dist.all_gather_object(parts, mine, group=group)
        self._stats, offset, self.out_of_range_ids = _ImageStats(), 0, set()
        for n, arrays, odd in parts:
            for k, v in arrays.items():
                getattr(self._stats, k).append(v + offset if k in ("img", "gimg") else v)
            offset += n
            self.out_of_range_ids.update(odd)
        self.num_images = offset

    # ---------------------------------------------------------------- results
    def image_label_sets(self):
        """Per image, the predicted ids and the GT ids present on valid pixels (0 excluded)."""
        a = self._stats.arrays()
        n = self.num_images
        pred = np.split(a["pid"], np.searchsorted(a["img"], np.arange(1, n)))
        gt = np.split(a["gid"], np.searchsorted(a["gimg"], np.arange(1, n)))
        return [p[p != 0] for p in pred], [g[g != 0] for g in gt]

    def hungarian(self, variant: str = "imagenet-s") -> dict[int, int]:
        """The official matching (image-level co-occurrence, Munkres 1.1.4)."""
        from lusscore.matching import cooccurrence_from_pairs, hungarian_match
        a = self._stats.arrays()
        cooc = cooccurrence_from_pairs(a["img"], a["pid"], a["gimg"], a["gid"], self.num_images,
                                       self.num_classes)
        return hungarian_match(cooc, self.num_images, variant)

    def pixel_hungarian(self) -> dict[int, int]:
        """HP's (and STEGO's) matching: one-to-one between the predicted ids (0 included) and
        the classes 0..C, maximising the valid pixels on which they agree; ids left over -> -1
        (wrong everywhere)."""
        from scipy.optimize import linear_sum_assignment
        conf = self.region_conf[0, :self.rows].double().cpu().numpy()
        used = np.nonzero(conf.sum(1))[0]  # the ids predicted on some valid pixel
        pred, gt = linear_sum_assignment(conf[used], maximize=True)
        match = {int(k): -1 for k in used}
        match.update({int(used[p]): int(g) for p, g in zip(pred, gt)})
        return match

    def _match_table(self, match, hungarian: bool = False):
        """(target class per pred row or -1 when dropped, foreground flag per pred row)."""
        c, rows = self.num_classes, self.rows
        ids = np.arange(rows + 1)
        if match is None:
            target = np.where(ids <= c, ids, -1)
            target[rows] = -1
            return target, ids != 0
        used = np.nonzero(self.region_conf[0].sum(1).cpu().numpy())[0]
        missing = [int(v) for v in used if v < rows and v not in match]
        if used.size and used[-1] == rows:
            big = sorted(v for v in self.out_of_range_ids if v < 0 or v >= rows)
            raise LusscoreError(
                f"predicted ids {big[:10]} cannot be matched (negative or >= {rows}); "
                "check the predictions")
        if missing and hungarian:
            raise LusscoreError(
                f"predicted id(s) {missing[:20]} lie outside 1..{c}: the Hungarian match covers "
                "1..C only (the official evaluator fails on them with a KeyError); pass a match "
                "file that maps them")
        if missing:
            raise LusscoreError(
                f"the match lacks predicted id(s) {missing[:20]}"
                + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
                + ": every id predicted on a valid pixel needs an entry")
        target = np.full(rows + 1, -1, dtype=np.int64)
        fg = np.ones(rows + 1, dtype=bool)
        for k, v in match.items():
            if 0 <= k < rows:
                target[k] = v if 0 <= v <= c else -1
                fg[k] = v != 0
        return target, fg

    def compute(self, match=None) -> dict:
        """Every official number; match: None, "hungarian", or {pred id: GT id}."""
        if self.num_images == 0:
            raise LusscoreError("no images were evaluated")
        if isinstance(match, str):
            if match not in MATCH_MODES:
                raise LusscoreError(f"match must be None, {' or '.join(map(repr, MATCH_MODES))} "
                                    f"or a dict, got {match!r}")
            if match == "hungarian":
                match = self.hungarian()
                target, fg = self._match_table(match, hungarian=True)
            else:
                match = self.pixel_hungarian()
                target, fg = self._match_table(match)
        else:
            target, fg = self._match_table(match)
        out = {}
        region = self.region_conf.cpu().numpy()
        boundary = self.boundary_conf.cpu().numpy()
        ious, bious = [], []
        for s in range(5):
            iou, g = _iou(region[s], target, self.num_classes, boundary=False)
            biou, bg = _iou(boundary[s], target, self.num_classes, boundary=True)
            if s == 0:
                out["mIoU"], out["mBIoU"] = float(iou.mean()), float(biou.mean())
                ious, bious = iou, biou
            else:
                name = BUCKETS[s - 1]
                out[name] = float(iou[g > 0].mean()) if (g > 0).any() else math.nan
                out["B" + name] = float(biou[bg > 0].mean()) if (bg > 0).any() else math.nan
        out.update(self._image_metrics(target, fg))
        out["IoUs"] = [float(v) for v in ious]
        out["BIoUs"] = [float(v) for v in bious]
        # The paper's App. B (Tab 15): the means over the C classes, 'other' left out.
        out["mIoU_without_other"] = float(ious[1:].mean()) if len(ious) > 1 else math.nan
        out["mBIoU_without_other"] = float(bious[1:].mean()) if len(bious) > 1 else math.nan
        # HP's and STEGO's pixel accuracy: the share of valid pixels whose (matched) id is right.
        rows = np.nonzero(target[:-1] >= 0)[0]
        total = region[0].sum()
        out["PixelAcc"] = float(100 * region[0][rows, target[rows]].sum() / total) if total else math.nan
        out["match"] = None if match is None else {int(k): int(v) for k, v in match.items()}
        out["num_images"] = self.num_images
        out["out_of_range_ids"] = sorted(self.out_of_range_ids)
        return {k: out[k] for k in KEYS + ("IoUs", "BIoUs", "mIoU_without_other",
                                           "mBIoU_without_other", "PixelAcc", "match", "num_images",
                                           "out_of_range_ids")}

    def _image_metrics(self, target: np.ndarray, fg: np.ndarray) -> dict:
        c, n = self.num_classes, self.num_images
        a = self._stats.arrays()
        img, pid, pcnt, pfg = a["img"], a["pid"], a["pcnt"], a["pfg"]
        # F-measure (beta^2 = 0.3), per image, any non-zero (matched) id is foreground.
        is_fg = fg[pid]
        q = np.bincount(img[is_fg], weights=pcnt[is_fg], minlength=n)
        tp = np.bincount(img[is_fg], weights=pfg[is_fg], minlength=n)
        g_fg = a["gid"] != 0
        t = np.bincount(a["gimg"][g_fg], weights=a["gcnt"][g_fg], minlength=n)
        recall, precision = tp / (t + 1e-20), tp / (q + 1e-20)
        f = 1.3 * precision * recall / (0.3 * precision + recall + 1e-20)
        # Img-Acc: the most predicted matched class 1..C (first on ties) must be in the GT.
        cls = target[pid]
        keep = (cls >= 1) & (cls <= c)
        key = img[keep] * (c + 1) + cls[keep]
        uniq, inv = np.unique(key, return_inverse=True)
        sums = np.bincount(inv, weights=pcnt[keep]) if uniq.size else np.zeros(0)
        u_img, u_cls = uniq // (c + 1), uniq % (c + 1)
        order = np.lexsort((u_cls, -sums, u_img))
        first = order[np.r_[True, u_img[order][1:] != u_img[order][:-1]]] if order.size else order
        top = np.ones(n, dtype=np.int64)      # argmax of an all-zero histogram: class 1
        top_count = np.zeros(n)
        top[u_img[first]] = u_cls[first]
        top_count[u_img[first]] = sums[first]
        gt_keys = set((a["gimg"] * (c + 2) + a["gid"]).tolist())
        has_gt = np.array([i * (c + 2) + top[i] in gt_keys for i in range(n)], dtype=bool)
        acc = has_gt & (top_count > 0)
        return {"Acc": 100.0 * float(acc.mean()), "FMeasure": 100.0 * float(f.mean())}


def _iou(conf: np.ndarray, target: np.ndarray, num_classes: int, boundary: bool):
    """Per-class IoU (percent) of one confusion set after mapping pred rows by `target`."""
    c = num_classes
    keep = target >= 0
    mapped = torch.zeros(c + 1, conf.shape[1], dtype=torch.int64).index_add_(
        0, torch.from_numpy(target[keep]), torch.from_numpy(conf[keep])).numpy()
    inter = mapped[np.arange(c + 1), np.arange(c + 1)].astype(np.float64)
    out_area = mapped.sum(1).astype(np.float64)
    gt_area = conf[:, :c + 1].sum(0).astype(np.float64)
    iou = 100.0 * inter / (out_area + gt_area - inter + 1e-10)
    return iou, gt_area


class ThresholdSweep:
    """Several evaluators fed from one read of the files: for threshold t, the prediction is
    set to 0 ('other') where the confidence map (e.g. PASS's mean pixel attention) is < t.
    Each threshold gets its own matching in compute()."""

    def __init__(self, num_classes: int, thresholds, **kwargs):
        self.thresholds = [float(t) for t in thresholds]
        if not self.thresholds:
            raise LusscoreError("the threshold sweep needs at least one threshold")
        self.evaluators = [SegEvaluator(num_classes, **kwargs) for _ in self.thresholds]

    def update(self, pred, gt, confidence, names: list[str] | None = None) -> None:
        pred, gt = _as_tensor(pred, "pred"), _as_tensor(gt, "gt")
        conf = confidence if isinstance(confidence, torch.Tensor) else torch.from_numpy(
            np.asarray(confidence))
        if conf.shape != pred.shape:
            where = f" ({names[0]})" if names else ""
            raise LusscoreError(f"confidence map size {tuple(conf.shape)} does not match the "
                                f"prediction size {tuple(pred.shape)}{where}")
        device = self.evaluators[0].device
        pred, gt, conf = pred.to(device), gt.to(device), conf.to(device)
        for t, ev in zip(self.thresholds, self.evaluators):
            ev.update(torch.where(conf < t, torch.zeros_like(pred), pred), gt, names)

    def compute(self, match=None) -> dict:
        results = [ev.compute(match) for ev in self.evaluators]
        best = max(range(len(results)), key=lambda i: results[i]["mIoU"])
        return {"thresholds": self.thresholds, "results": results,
                "best_threshold": self.thresholds[best], "best": results[best]}

    def reset(self) -> None:
        for ev in self.evaluators:
            ev.reset()


# Image-level clustering scores (the cluster stage's summary)


def nmi(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised mutual information (arithmetic mean of the entropies, as scikit-learn)."""
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    joint = np.zeros((ai.max() + 1, bi.max() + 1))
    np.add.at(joint, (ai, bi), 1)
    p = joint / joint.sum()
    pa, pb = p.sum(1), p.sum(0)
    nz = p > 0
    mi = (p[nz] * np.log(p[nz] / np.outer(pa, pb)[nz])).sum()
    ha, hb = -(pa * np.log(pa)).sum(), -(pb * np.log(pb)).sum()
    return float(mi / max((ha + hb) / 2, 1e-12)) if ha + hb > 0 else 1.0


def hungarian_accuracy(pred: np.ndarray, truth: np.ndarray) -> float:
    """Accuracy of cluster ids against class ids under the best one-to-one match."""
    k = max(pred.max(), truth.max()) + 1
    counts = np.zeros((k, k), dtype=np.int64)
    np.add.at(counts, (pred, truth), 1)
    rows, cols = linear_sum_assignment(-counts)
    return float(counts[rows, cols].sum() / len(pred))
