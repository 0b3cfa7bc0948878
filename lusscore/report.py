"""One HTML page (with PNG figures beside it) summarising a finished run folder.

The page, <run>/report/index.html, shows: the run summary (config essentials, dataset,
stage timings from the JSON-lines logs), the metric table of every protocol that was run
(fully unsupervised, semi-supervised, distance matching, HP) side by side with the trivial
floors of <run>/baselines.json (`luss baselines`) when it exists, per-class IoU bars,
the tau curve, the loss curves of each training stage and a grid of validation images
(image, GT, pseudo label, the prediction of each protocol, mean attention).

Whatever a run lacks is said on the page (a protocol not run, no tau sweep, no logs, a
dataset that moved); only a folder that is not a finished run at all is an error.
"""
from __future__ import annotations

import datetime
import html
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lusscore.stages.layout import RUN_CONFIG, TRAINING_STAGES, RunDir
from lusscore.utils import LusscoreError, atomic_path, atomic_write_text

SUMMARY_KEYS = ("mIoU", "mBIoU", "Acc", "FMeasure")
SIZE_KEYS = ("S", "MS", "ML", "L", "BS", "BMS", "BML", "BL")
KEY_LABELS = {"mIoU": "mIoU", "mBIoU": "mBIoU (boundary)", "Acc": "Img-Acc", "FMeasure": "F-measure",
              "S": "mIoU S", "MS": "mIoU MS", "ML": "mIoU ML", "L": "mIoU L",
              "BS": "mBIoU S", "BMS": "mBIoU MS", "BML": "mBIoU ML", "BL": "mBIoU L"}
TITLES = ["image", "ground truth", "pseudo label"]
MAX_ID = 65535  # the largest id a label PNG holds


@dataclass(frozen=True)
class Protocol:
    key: str      # the protocol's name in the run-folder layout (lusscore.stages.layout)
    title: str
    pass_protocol: bool = True  # PASS's own (ImageNet-S's); HP, another method, is named only when run

    def metrics_path(self, run_dir: Path, split: str = "validation") -> Path:
        return RunDir(run_dir).metrics(self.key, split)

    def predictions(self, run_dir: Path) -> Path:
        return RunDir(run_dir).predictions(self.key, "validation")


PROTOCOLS = (Protocol("unsupervised", "fully unsupervised"),
             Protocol("semi", "semi-supervised"),
             Protocol("distance_match", "distance matching"),
             Protocol("hp", "HP (hidden positives)", pass_protocol=False),
             Protocol("hp_linear", "HP linear probe", pass_protocol=False))


# ---------------------------------------------------------------- colours and the picture grid

def palette(n: int) -> np.ndarray:
    """(n + 1, 3) uint8 colours of ids 0..n; 0 ('other') is black."""
    rng = np.random.default_rng(7)
    colours = rng.integers(40, 255, size=(max(n, 1) + 1, 3)).astype(np.uint8)
    colours[0] = 0
    return colours


def colourise(label: np.ndarray, colours: np.ndarray) -> np.ndarray:
    out = colours[np.clip(label, 0, len(colours) - 1)]
    out[label == 1000] = 255  # ignore in white
    return out


def match_lut(match: dict | None, size: int) -> np.ndarray | None:
    """A lookup array pred id -> GT id for ids 0..size-1 (unmatched ids, and those a match
    leaves without a class (-1), -> 0); None: identity."""
    if match is None:
        return None
    lut = np.zeros(size, dtype=np.int64)
    for k, v in match.items():
        if 0 <= int(k) < size:
            lut[int(k)] = max(int(v), 0)
    return lut


def _mapped(label: np.ndarray, lut: np.ndarray | None) -> np.ndarray:
    if lut is None:
        return label
    keep = label == 1000
    out = lut[np.clip(label, 0, len(lut) - 1)]
    out[label >= len(lut)] = 0
    out[keep] = 1000
    return out


def pick_samples(samples: list, rows: int) -> list:
    """`rows` samples evenly spread over the list (all of them when there are fewer)."""
    if not samples or rows <= 0:
        return []
    return [samples[i] for i in np.linspace(0, len(samples) - 1, min(rows, len(samples))).astype(int)]


def save_picture(run_dir: Path, dataset, predictions: list[tuple[str, Path, dict | None]],
                 tau: float, path: Path, rows: int = 6, pseudo_match: dict | None = None) -> int:
    """A grid of validation images: image, GT, pseudo label (tau applied), one column per
    entry of `predictions` ((title, prediction folder, {pred id: GT id} or None)), and the
    mean attention. Pseudo labels are coloured through `pseudo_match`. A file a run lacks
    (an attention map, a prediction) leaves its cell empty with a note.
    Returns the number of rows drawn (0: no validation images, nothing written)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    import torch.nn.functional as F

    from lusscore.data import read_image, read_label_png

    picks = pick_samples(dataset.segmentation_samples("validation"), rows)
    if not picks:
        return 0
    run_dir = Path(run_dir)
    colours = palette(dataset.num_classes)
    pseudo_lut = match_lut(pseudo_match, MAX_ID + 1)
    titles = TITLES + [t for t, _, _ in predictions] + ["mean attention"]
    luts = [match_lut(m, MAX_ID + 1) for _, _, m in predictions]
    fig, axes = plt.subplots(len(picks), len(titles), figsize=(2 * len(titles), 2 * len(picks)),
                             dpi=100, squeeze=False)
    for r, s in enumerate(picks):
        img = np.asarray(read_image(s.image))
        gt = read_label_png(s.label)
        pseudo_path = RunDir(run_dir).labels("validation") / s.name
        att_path = pseudo_path.with_suffix(".npy")
        att_full = None
        if att_path.is_file():
            att = torch.from_numpy(np.load(att_path)).float()
            att_full = F.interpolate(att[None, None], size=gt.shape, mode="bilinear",
                                     align_corners=False)[0, 0].numpy()
        pseudo = None
        if pseudo_path.is_file():
            pseudo = read_label_png(pseudo_path)
            if att_full is not None:
                pseudo = np.where(att_full < tau, 0, pseudo)
            pseudo = colourise(_mapped(pseudo, pseudo_lut), colours)
        panels = [img, colourise(gt, colours), pseudo]
        for (_, folder, _), lut in zip(predictions, luts):
            pred_path = Path(folder) / s.name
            panels.append(colourise(_mapped(read_label_png(pred_path), lut), colours)
                          if pred_path.is_file() else None)
        panels.append(att_full)
        for c, panel in enumerate(panels):
            ax = axes[r, c]
            last = c == len(panels) - 1
            if panel is None:
                ax.text(0.5, 0.5, "missing", ha="center", va="center", fontsize=8, color="gray",
                        transform=ax.transAxes)
            else:
                ax.imshow(panel, cmap="magma" if last else None, vmin=0 if last else None,
                          vmax=1 if last else None)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    return len(picks)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


# ---------------------------------------------------------------- reading the run folder

def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LusscoreError(f"{path}: not valid JSON ({e})") from None


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """The records of a JSON-lines log and how many lines were unreadable (a crash mid-line).

    A resumed stage repeats the iterations of its unfinished epoch: the last record of an
    iteration wins, so the curve shows what the finished run did."""
    by_iter, order, bad = {}, [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("loss"), (int, float)):
            bad += 1
            continue
        key = rec.get("iter", len(order))
        if key not in by_iter:
            order.append(key)
        by_iter[key] = rec
    records = [by_iter[k] for k in order]
    if all(isinstance(k, (int, float)) for k in order):
        records.sort(key=lambda r: r.get("iter", 0))
    return records, bad


def check_run(run_dir: Path) -> dict:
    """{protocol key: metrics} of a finished run; a clear error when it is not one."""
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder not found: {run_dir}")
    if not RunDir(run_dir).config.is_file():
        raise LusscoreError(f"{run_dir} is not a run folder: {RunDir(run_dir).config} is missing")
    metrics = {p.key: _read_json(p.metrics_path(run_dir)) for p in PROTOCOLS
               if p.metrics_path(run_dir).is_file()}
    if not metrics:
        raise LusscoreError(
            f"{run_dir} is not a finished run: {PROTOCOLS[0].metrics_path(run_dir)} is missing "
            f"(and no protocol's metrics.json exists: "
            + ", ".join(str(p.metrics_path(run_dir).relative_to(run_dir)) for p in PROTOCOLS)
            + ")")
    for key, m in metrics.items():
        if not isinstance(m, dict) or "mIoU" not in m:
            path = next(p for p in PROTOCOLS if p.key == key).metrics_path(run_dir)
            raise LusscoreError(f"{path}: no mIoU; not a metrics file of `luss evaluate`")
    return metrics


def _protocol_match(run_dir: Path, p: Protocol, metrics: dict) -> dict | None:
    """The protocol's {pred id: GT id}: from metrics.json, else its match.json, else None."""
    match = metrics.get("match")
    if match is None and RunDir(run_dir).match(p.key).is_file():
        match = _read_json(RunDir(run_dir).match(p.key))
    return None if match is None else {int(k): int(v) for k, v in match.items()}


# ---------------------------------------------------------------- figures

def fmt(v, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def class_names(wnids: list[str] | None, n: int) -> list[str]:
    """Names of ids 0..n-1: 'other', then the wnids (or the ids when the list does not fit)."""
    if wnids is not None and len(wnids) == n - 1:
        return ["other"] + list(wnids)
    return ["other"] + [str(i) for i in range(1, n)]


def iou_figure(ious: list, names: list[str], title: str, path: Path, top: int) -> str:
    """Horizontal bars of the per-class IoU, sorted; only the best and worst `top` when there
    are more than 2 * top classes. Returns a caption."""
    plt = _pyplot()
    scored = sorted(((v, n) for v, n in zip(ious, names) if v is not None and not math.isnan(v)),
                    key=lambda t: -t[0])
    if len(scored) > 2 * top:
        shown = scored[:top] + [(None, "...")] + scored[-top:]
        caption = (f"the {top} best and {top} worst of {len(scored)} classes "
                   f"(every class in the table below)")
    else:
        shown = scored
        caption = f"all {len(scored)} classes, sorted"
    missing = len(ious) - len(scored)
    if missing:
        caption += f"; {missing} class(es) without a score (absent from GT and prediction)"
    fig, ax = plt.subplots(figsize=(6, 1.0 + 0.18 * max(len(shown), 4)), dpi=100)
    y = np.arange(len(shown))[::-1]
    vals = [0.0 if v is None else v for v, _ in shown]
    colours = ["#bbbbbb" if n == "other" else "#3b75af" for _, n in shown]
    ax.barh(y, vals, color=colours, height=0.75)
    ax.set_yticks(y)
    ax.set_yticklabels([n for _, n in shown], fontsize=7)
    ax.set_xlim(0, 100)
    ax.set_xlabel("IoU (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    return caption


def tau_figure(sweep: dict, path: Path) -> None:
    plt = _pyplot()
    table = sweep["table"]
    taus = [r["tau"] for r in table]
    fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=110)
    ax.plot(taus, [r["mIoU"] for r in table], "o-", label="pseudo-label mIoU")
    if all("FMeasure" in r for r in table):
        ax.plot(taus, [r["FMeasure"] for r in table], "s--", label="F-measure", alpha=0.7)
    best = sweep["best_tau"]
    best_miou = sweep.get("best", {}).get("mIoU")
    ax.axvline(best, color="gray", lw=0.8)
    if best_miou is not None:
        ax.plot([best], [best_miou], "*", color="crimson", markersize=14, zorder=5,
                label=f"best: tau {best:.3f}, mIoU {best_miou:.2f}")
    ax.set_xlabel("tau (mean attention threshold)")
    ax.set_ylabel("%")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Moving average with a window shrinking at the start (no lag-free illusion at the edge)."""
    if window <= 1 or len(values) < 2:
        return values
    c = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def loss_figure(stage: str, records: list[dict], path: Path) -> None:
    plt = _pyplot()
    x = np.array([r.get("iter", i) for i, r in enumerate(records)], dtype=float)
    comps = sorted({k for r in records for k, v in r.items()
                    if k.startswith("loss_") and isinstance(v, (int, float))})
    has_lr = all(isinstance(r.get("lr"), (int, float)) for r in records)
    window = max(1, len(records) // 50)
    fig, axes = plt.subplots(1, 2 if has_lr else 1, figsize=(9 if has_lr else 5.5, 3.2), dpi=100,
                             squeeze=False, gridspec_kw={"width_ratios": [3, 1.3] if has_lr else [1]})
    ax = axes[0, 0]
    for key, style in [("loss", "-")] + [(k, "--") for k in comps]:
        y = np.array([r.get(key, np.nan) for r in records], dtype=float)
        ok = np.isfinite(y)
        if not ok.any():
            continue
        line, = ax.plot(x[ok], smooth(y[ok], window), style, lw=1.4,
                        label=key if key == "loss" else key[len("loss_"):])
        if key == "loss" and window > 1:
            ax.plot(x[ok], y[ok], "-", lw=0.6, alpha=0.25, color=line.get_color())
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss" + (f" (moving average of {window})" if window > 1 else ""))
    ax.set_title(stage, fontsize=10)
    ax.grid(alpha=0.3)
    if comps:
        ax.legend(fontsize=7)
    if has_lr:
        ax = axes[0, 1]
        ax.plot(x, [r["lr"] for r in records], color="gray")
        ax.set_xlabel("iteration")
        ax.set_ylabel("learning rate")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


# ---------------------------------------------------------------- the page

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:1.5em auto;
max-width:1150px;padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0;font-size:.92em}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:right}
th:first-child,td:first-child{text-align:left}thead th{background:#f3f3f3}
.note{color:#666;font-size:.92em}.missing{color:#a33}
.figs{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}
.figs figure{margin:0}figcaption{font-size:.85em;color:#555;max-width:600px}
img{max-width:100%;height:auto}pre{background:#f7f7f7;padding:.6em;overflow:auto;font-size:.85em}
details{margin:.5em 0}summary{cursor:pointer;color:#245}
"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(name: str, caption: str = "", alt: str = "") -> str:
    cap = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    return (f'<figure><a href="{_e(name)}"><img src="{_e(name)}" alt="{_e(alt or caption or name)}">'
            f"</a>{cap}</figure>")


def floors_section(run_dir: Path, ran: list, metrics: dict) -> list[str]:
    """Each protocol's main numbers beside the trivial floors (<run>/baselines.json), for
    validation and, when scored, test; a note when the floors are absent or unreadable."""
    from lusscore.baselines import read_baselines
    parts = ["<h3>Trivial floors (no learning)</h3>"]
    path = RunDir(run_dir).baselines("validation")
    if not path.is_file():
        return parts + [(f'<p class="note">no {path.name}: write it with <code>luss baselines '
                         f"--data ROOT --split validation --out {_e(path)}</code>.</p>")]
    floors, scores = {}, {}
    try:
        for split in ("validation", "test"):
            if RunDir(run_dir).baselines(split).is_file():
                floors[split] = read_baselines(RunDir(run_dir).baselines(split))
                scores[split] = {p.key: metrics[p.key] if split == "validation"
                                 else _read_json(p.metrics_path(run_dir, split))
                                 for p in ran if p.metrics_path(run_dir, split).is_file()}
    except LusscoreError as e:
        return parts + [f'<p class="missing">{_e(e)}</p>']
    splits = list(floors)
    header = ["protocol"] + [f"{KEY_LABELS[k]} ({split})" for split in splits for k in SUMMARY_KEYS]
    cells = lambda m: [fmt(m.get(k)) if m else "-" for k in SUMMARY_KEYS]
    rows = [[p.title] + sum((cells(scores[s].get(p.key)) for s in splits), []) for p in ran]
    rows += [[f"floor {name}"] + sum((cells(floors[s]["floors"].get(name)) for s in splits), [])
             for name in floors["validation"]["floors"]]
    note = (f'<p class="note">floors with match {_e(floors["validation"].get("match", "?"))}: '
            "colour_kmeans = K+1 RGB clusters (the border's cluster is 'other'), centre_disc = "
            "a centred disc with one random id per image, all_other = every pixel 'other'. "
            "Choices are made on validation; test is scored once with them.</p>")
    return parts + [_table(header, rows), note]


def _get(cfg: dict, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


ESSENTIALS = ("name", "seed", "data.num_classes", "model.arch", "model.width", "pretrain.epochs",
              "pretrain.batch_size", "attention.epochs", "cluster.k", "cluster.pooling", "label.tau",
              "label.sweep", "finetune.epochs", "finetune.init", "semi.epochs")


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


def write_report(run_dir, rows: int = 6, top: int = 20) -> Path:
    """Write <run>/report/index.html and its PNG figures; returns the path of index.html.

    rows: validation images in the grid; top: best/worst classes drawn in the IoU bars when
    a protocol has more than 2 * top classes. Rerunning replaces the page and its figures."""
    import yaml

    run_dir = Path(run_dir)
    metrics = check_run(run_dir)
    out = RunDir(run_dir).report_dir
    out.mkdir(parents=True, exist_ok=True)
    written: set[str] = set()
    cfg = yaml.safe_load(RunDir(run_dir).config.read_text()) or {}
    if not isinstance(cfg, dict):
        raise LusscoreError(f"{RunDir(run_dir).config}: not a YAML mapping")
    parts = [f"<h1>lusscore run report: {_e(cfg.get('name') or run_dir.name)}</h1>",
             (f'<p class="note">run folder {_e(run_dir.resolve())} · generated '
              f"{_e(datetime.datetime.now().strftime('%Y-%m-%d %H:%M:%S'))}</p>")]

    # The dataset is needed for class names and the validation grid only; a run whose
    # dataset moved still gets its tables and curves.
    dataset, dataset_note = None, ""
    root = _get(cfg, "data.root")
    if not root:
        dataset_note = f"{RUN_CONFIG} has no data.root"
    else:
        try:
            from lusscore.data import ImageNetS
            dataset = ImageNetS(root, num_classes=_get(cfg, "data.num_classes"))
        except (LusscoreError, FileNotFoundError) as e:
            dataset_note = f"dataset not readable: {e}"

    # --- run summary
    rows_summary = [["run folder", run_dir.name], ["dataset", root or "not set"]]
    if dataset is not None:
        rows_summary.append(["classes", str(dataset.num_classes)])
    first = next(iter(metrics.values()))
    if "num_images" in first:
        rows_summary.append(["validation images scored", str(first["num_images"])])
    for key in ESSENTIALS:
        v = _get(cfg, key)
        if v is not None:
            rows_summary.append([key, json.dumps(v) if isinstance(v, (list, dict)) else str(v)])
    cluster_file = RunDir(run_dir).cluster_summary
    if cluster_file.is_file():
        c = _read_json(cluster_file)
        for k, label in (("nmi", "cluster NMI (image level)"),
                         ("nmi_validation", "cluster NMI (image level, validation)"),
                         ("hungarian_accuracy", "cluster Hungarian accuracy (image level)")):
            if isinstance(c.get(k), (int, float)):
                rows_summary.append([label, f"{100 * c[k]:.1f}%"])
    parts += ["<h2>Run summary</h2>", _table(["setting", "value"], rows_summary)]
    if dataset_note:
        parts.append(f'<p class="missing">{_e(dataset_note)}: no class names and no image grid.</p>')

    logs = {}
    for stage in TRAINING_STAGES:  # the order of the loss curves
        path = RunDir(run_dir).training_log(stage)
        if path.is_file():
            records, bad = read_jsonl(path)
            if records:
                logs[stage] = (records, bad)
    if logs:
        timing_rows = []
        for stage, (records, bad) in logs.items():
            times = [r["time"] for r in records if isinstance(r.get("time"), (int, float))]
            epochs = {r.get("epoch") for r in records}
            rates = [r["img_s"] for r in records if isinstance(r.get("img_s"), (int, float))]
            timing_rows.append([stage, str(len(epochs)), str(len(records)),
                                _duration(max(times) - min(times)) if len(times) > 1 else "n/a",
                                f"{np.median(rates):.1f}" if rates else "n/a",
                                fmt(records[-1]["loss"], 4)])
        parts += ["<h3>Training stages (from the logs)</h3>",
                  _table(["stage", "epochs", "iterations", "logged time", "median img/s", "final loss"],
                         timing_rows),
                  ('<p class="note">logged time: first to last logged iteration (pauses between '
                   "resumed sessions included).</p>")]
    parts.append(f"<details><summary>full config ({_e(RUN_CONFIG)})</summary><pre>"
                 f"{_e(RunDir(run_dir).config.read_text())}</pre></details>")

    # --- metric tables
    ran = [p for p in PROTOCOLS if p.key in metrics]
    not_ran = [p for p in PROTOCOLS if p.key not in metrics and p.pass_protocol]
    keys = [k for k in SUMMARY_KEYS + SIZE_KEYS if any(k in metrics[p.key] for p in ran)]
    table_rows = [[KEY_LABELS[k]] + [fmt(metrics[p.key].get(k)) for p in ran] for k in keys]
    parts += ["<h2>Metrics (validation)</h2>",
              _table(["metric (%)"] + [p.title for p in ran], table_rows)]
    if not_ran:
        parts.append('<p class="missing">not run: ' + "; ".join(
            f"{_e(p.title)} (no {_e(p.metrics_path(run_dir).relative_to(run_dir).as_posix())})"
            for p in not_ran) + "</p>")
    parts.append('<p class="note">S, MS, ML, L: mIoU of the objects by size bucket '
                 "(small to large); B*: their boundary mIoU.</p>")
    parts += floors_section(run_dir, ran, metrics)

    # --- per-class IoU
    parts.append("<h2>Per-class IoU</h2>")
    figs, full_names = [], None
    for p in ran:
        ious = metrics[p.key].get("IoUs")
        if not ious:
            parts.append(f'<p class="missing">{_e(p.title)}: no per-class IoUs in metrics.json</p>')
            continue
        names = class_names(dataset.wnids if dataset is not None else None, len(ious))
        full_names = full_names or names
        name = f"iou_{p.key}.png"
        caption = iou_figure(ious, names, f"{p.title}: per-class IoU", out / name, top)
        written.add(name)
        figs.append(_figure(name, f"{p.title}: {caption}"))
    parts.append('<div class="figs">' + "".join(figs) + "</div>")
    with_ious = [p for p in ran if metrics[p.key].get("IoUs")]
    if with_ious:
        n = max(len(metrics[p.key]["IoUs"]) for p in with_ious)
        names = class_names(dataset.wnids if dataset is not None else None, n)
        header = ["id", "class"] + [f"IoU {p.title}" for p in with_ious] + \
                 [f"BIoU {p.title}" for p in with_ious]
        class_rows = []
        for i in range(n):
            row = [str(i), names[i]]
            for field in ("IoUs", "BIoUs"):
                for p in with_ious:
                    vals = metrics[p.key].get(field) or []
                    row.append(fmt(vals[i]) if i < len(vals) else "n/a")
            class_rows.append(row)
        parts.append(f"<details><summary>every class ({n}, id 0 = other)</summary>"
                     f"{_table(header, class_rows)}</details>")

    # --- tau curve
    parts.append("<h2>Pseudo labels: tau sweep</h2>")
    sweep_file = RunDir(run_dir).sweep
    sweep = _read_json(sweep_file) if sweep_file.is_file() else None
    tau = float(sweep["best_tau"]) if sweep else float(_get(cfg, "label.tau") or 0.0)
    if sweep and sweep.get("table"):
        tau_figure(sweep, out / "tau.png")
        written.add("tau.png")
        best = sweep.get("best", {})
        parts += [_figure("tau.png", "pseudo-label quality on validation vs the mean-attention "
                                     "threshold tau (each tau with its own Hungarian matching)"),
                  (f"<p>best tau {_e(fmt(tau, 3))}: pseudo-label mIoU {_e(fmt(best.get('mIoU')))}, "
                   f"mBIoU {_e(fmt(best.get('mBIoU')))}, F-measure {_e(fmt(best.get('FMeasure')))}.</p>")]
    else:
        parts.append(f'<p class="missing">no sweep_tau.json: tau was fixed at {_e(fmt(tau, 3))}.</p>')

    # --- loss curves
    parts.append("<h2>Training losses</h2>")
    if logs:
        figs = []
        for stage, (records, bad) in logs.items():
            name = f"loss_{stage}.png"
            loss_figure(stage, records, out / name)
            written.add(name)
            note = f"{stage}: {len(records)} iterations"
            if bad:
                note += f"; {bad} unreadable log line(s) skipped"
            figs.append(_figure(name, note))
        parts.append('<div class="figs">' + "".join(figs) + "</div>")
    missing_logs = [s for s in TRAINING_STAGES if s not in logs]
    if missing_logs:
        parts.append('<p class="note">no loss log: '
                     + ", ".join(_e(RunDir(run_dir).training_log(s).name) for s in missing_logs) + "</p>")

    # --- validation grid
    parts.append("<h2>Validation images</h2>")
    if dataset is None:
        parts.append(f'<p class="missing">no grid: {_e(dataset_note)}</p>')
    else:
        preds = [(p.title, p.predictions(run_dir), _protocol_match(run_dir, p, metrics[p.key]))
                 for p in ran]
        unsup = metrics.get("unsupervised")
        pseudo_match = _protocol_match(run_dir, PROTOCOLS[0], unsup) if unsup else None
        try:
            drawn = save_picture(run_dir, dataset, preds, tau, out / "grid.png", rows=rows,
                                 pseudo_match=pseudo_match)
        except (LusscoreError, FileNotFoundError) as e:
            drawn, error = 0, str(e)
        else:
            error = "no validation images in the dataset" if rows > 0 else "0 rows asked for"
        if drawn:
            written.add("grid.png")
            parts.append(_figure("grid.png", f"{drawn} validation images: image, ground truth, pseudo "
                                 f"label (tau {tau:.3f}), the prediction of each protocol run (ids "
                                 "mapped to GT classes by the protocol's match), mean attention",
                                 alt="validation grid"))
        else:
            parts.append(f'<p class="missing">no grid: {_e(error)}</p>')

    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e('lusscore report: ' + (cfg.get('name') or run_dir.name))}</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")
    index = out / "index.html"
    atomic_write_text(index, page)
    # Figures of an earlier report that this one no longer has (e.g. a removed protocol).
    for old in out.glob("*.png"):
        if old.name not in written:
            old.unlink()
    return index
