"""Run a list of named variants of a config (an ablation table) as sibling run folders.

    luss ablate CONFIG --run-dir DIR --rows ROWS.yaml [--only NAME,...]

ROWS.yaml (or the name of a packaged rows file, e.g. ablations_demo):

    set: [KEY=VALUE, ...]            # optional: applied to every row first
    rows:
      - name: baseline               # the run folder DIR/baseline
        set: []
      - name: no_p2p
        set: ["pretrain.loss_weights={swav: 0.5, d2s: 0.5}"]

Each row is `luss run CONFIG --set ...` in DIR/<name>. A step whose settings (and upstream
steps' settings) equal those of a step an earlier row completed is not run again: its outputs
are linked (large files) or copied (logs) from that row, so one pretraining serves every
label-generation row. After each row its pseudo labels are scored too: validation at the
run's tau with their own Hungarian match, and test with that match. Writes DIR/ablation.json,
DIR/ablation.md (pseudo-label and protocol mIoU per row on validation and test, the trivial
floors as the last rows) and DIR/ablation.png (a bar plot), after every row, so an
interrupted table resumes where it stopped (finished rows are read back).
With CONFIG demo and no data.root, the embedded dataset is generated in DIR/data.
"""
from __future__ import annotations

import json
import os
import shutil
from argparse import Namespace
from pathlib import Path

from lusscore.config import apply_overrides, load_config
from lusscore.stages.common import StageContext, fingerprint, open_run, recorded_steps
from lusscore.stages.layout import STEPS, SWITCHES, RunDir
from lusscore.utils import LusscoreError, atomic_path, atomic_write_text

PROTOCOL_COLUMNS = ("unsupervised", "semi", "distance_match")


def read_rows(name_or_path: str) -> tuple[list[str], list[dict]]:
    """(overrides for every row, [{'name', 'set'}]) of a rows file or a packaged one."""
    from lusscore.config import _read_config
    spec, path = _read_config(name_or_path), name_or_path  # a file, or a packaged YAML
    rows = spec.get("rows") if isinstance(spec, dict) else None
    if not isinstance(rows, list) or not rows:
        raise LusscoreError(f"{path}: needs a non-empty 'rows' list of {{name, set}}")
    common = spec.get("set") or []
    seen, out = set(), []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("name"), str) or not row["name"]:
            raise LusscoreError(f"{path}: row {i + 1} needs a 'name'")
        name, overrides = row["name"], row.get("set") or []
        if name in seen or "/" in name or name.startswith(".") or name == "data":
            raise LusscoreError(f"{path}: row name {name!r} is repeated or not a folder name")
        if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            raise LusscoreError(f"{path}: row {name!r}: 'set' must be a list of KEY=VALUE strings")
        seen.add(name)
        out.append({"name": name, "set": list(overrides)})
    if not isinstance(common, list) or not all(isinstance(o, str) for o in common):
        raise LusscoreError(f"{path}: 'set' must be a list of KEY=VALUE strings")
    return list(common), out


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link (one copy on disk) for artefacts, a copy for logs a rerun appends to."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.suffix != ".jsonl":
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    with atomic_path(dst) as tmp:
        shutil.copy2(src, tmp)


def reuse_steps(cfg: dict, run: RunDir, earlier: list[RunDir]) -> list[str]:
    """Give run the outputs of every step an earlier row completed with the same settings
    (its upstream steps reused too); returns the steps reused."""
    mine = recorded_steps(run)
    reused, steps = [], dict(mine)
    for step, (upstream, _) in STEPS.items():
        if step in mine or (upstream is not None and upstream not in steps):
            continue
        want = fingerprint(cfg, step)
        source = next((r for r in earlier if recorded_steps(r).get(step) == want), None)
        if source is None:
            continue
        for out in source.outputs(step):
            if not out.exists():
                continue
            target = run.root / out.relative_to(source.root)
            if out.is_dir():
                shutil.copytree(out, target, copy_function=lambda s, d: _link_or_copy(Path(s), Path(d)),
                                dirs_exist_ok=True)
            else:
                _link_or_copy(out, target)
        steps[step] = want
        reused.append(step)
    if reused:
        atomic_write_text(run.fingerprints, json.dumps(steps, indent=1))
    return reused


def data_key(cfg: dict) -> tuple:
    """What the trivial floors depend on: the dataset and the seed."""
    return str(cfg["data"]["root"]), cfg["data"]["num_classes"], cfg["seed"]


def reuse_floors(run: RunDir, source: RunDir) -> None:
    """The floors of a row on the same data and seed (computed once for the table)."""
    for split in ("validation", "test"):
        path = source.baselines(split)
        target = run.baselines(split)
        if path.is_file() and not target.exists():
            _link_or_copy(path, target)


def score_pseudo_labels(ctx: StageContext) -> dict:
    """The pseudo labels themselves as predictions: validation and test labelled at the run's
    tau under <run>/pseudo_labels/<split>, validation matched by Hungarian, test with that
    match (never re-matched). -> {split: mIoU}; read back when already scored."""
    from lusscore.matching import save_match
    from lusscore.stages.evaluate import evaluate, scored_splits
    from lusscore.stages.label import label_split
    folder = ctx.run.root / "pseudo_labels"
    done = folder / "metrics.json"
    if done.is_file():
        return json.loads(done.read_text())
    tau, ds, scores = float(ctx.cfg["label"]["tau"]), ctx.dataset, {}
    match_file = folder / "match.json"
    for split in scored_splits(ds):  # validation first: its match serves test
        label_split(ctx, split, tau, save_attention=False, out_dir=folder / split)
        result = evaluate(ds.labels_dir(split), folder / split, ds.num_classes,
                          ds.names_path(split), "hungarian" if split == "validation" else
                          str(match_file), workers=0)
        if split == "validation":
            save_match(match_file, result["match"])
        scores[split] = result["mIoU"]
    atomic_write_text(done, json.dumps(scores, indent=1))
    return scores


def row_result(run: RunDir, pseudo: dict) -> dict:
    summary = json.loads(run.protocols_summary.read_text())
    out = {"pseudo_labels": pseudo}
    for protocol in PROTOCOL_COLUMNS:
        if protocol in summary:
            s = summary[protocol]
            out[protocol] = {"validation": s["mIoU"],
                             "test": s["test"]["mIoU"] if s.get("test") else None}
    return out


def floor_rows(run: RunDir) -> dict:
    """{floor name: {split: mIoU}} of the run's baselines (the same data for every row)."""
    from lusscore.stages.baselines import read_baselines
    floors = {}
    for split in ("validation", "test"):
        path = run.baselines(split)
        if path.is_file():
            for name, m in read_baselines(path)["floors"].items():
                floors.setdefault(name, {})[split] = m["mIoU"]
    return floors


def _cell(v) -> str:
    return "" if v is None else f"{v:.2f}"


def format_table(table: dict) -> str:
    cols = [c for c in ("pseudo_labels",) + PROTOCOL_COLUMNS
            if any(c in r for r in table["rows"].values())]
    head = ["row"] + [f"{c} {s}" for c in cols for s in ("val", "test")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in table["rows"].items():
        cells = [_cell((r.get(c) or {}).get(s)) for c in cols for s in ("validation", "test")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name, f in table["floors"].items():  # no learning: the same cells in every column
        cells = [_cell(f.get(s)) for _ in cols for s in ("validation", "test")]
        lines.append(f"| floor: {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_table(table: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(table["rows"]) + [f"floor: {n}" for n in table["floors"]]
    val = [(r.get("unsupervised") or {}).get("validation") for r in table["rows"].values()]
    test = [(r.get("unsupervised") or {}).get("test") for r in table["rows"].values()]
    val += [f.get("validation") for f in table["floors"].values()]
    test += [f.get("test") for f in table["floors"].values()]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(names) + 1.2))
    y = list(range(len(names)))
    ax.barh([i - 0.2 for i in y], [v or 0 for v in val], height=0.4, label="validation")
    ax.barh([i + 0.2 for i in y], [v or 0 for v in test], height=0.4, label="test")
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel("fully unsupervised mIoU (%)")
    ax.legend(loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_table(out: Path, table: dict) -> None:
    atomic_write_text(out / "ablation.json", json.dumps(table, indent=1))
    plot_table(table, out / "ablation.png")
    atomic_write_text(out / "ablation.md", format_table(table) + "\n\n![ablation](ablation.png)\n")


def add_arguments(parser):
    parser.epilog = SWITCHES
    parser.add_argument("config", help="YAML file or packaged config name (demo, imagenet_s50, ...)")
    parser.add_argument("--run-dir", required=True, help="the folder of the rows' run folders")
    parser.add_argument("--rows", required=True,
                        help="the rows: a YAML file, or a packaged one (ablations_demo)")
    parser.add_argument("--only", default=None, metavar="NAME,...",
                        help="run only these rows (the table keeps every finished row)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key of every row (repeatable)")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")


def main(args):
    from lusscore.stages.run import run_pipeline
    out = Path(args.run_dir)
    common, rows = read_rows(args.rows)
    names = [r["name"] for r in rows]
    only = None if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in only or [] if n not in names]
    if unknown:
        raise LusscoreError(f"--only: no row named {', '.join(unknown)} (rows: {', '.join(names)})")
    base = load_config(args.config)
    base = apply_overrides(base, common + args.set)
    if not base["data"]["root"]:
        if base.get("name") != "demo":
            raise LusscoreError("the config has no data.root: set it with --set data.root=PATH")
        from lusscore.data.synthetic import SynthConfig, generate_dataset
        data = out / "data"
        generate_dataset(data, SynthConfig(seed=int(base["seed"])), progress=True)
        base = apply_overrides(base, [f"data.root={data}"])
    table = {"config": args.config, "rows": {}, "floors": {}}
    done: list[RunDir] = []
    floors_of: dict[tuple, RunDir] = {}  # data_key -> the first row with those floors
    for row in rows:
        run = RunDir(out / row["name"])
        if only is not None and row["name"] not in only:
            if (run.root / "pseudo_labels" / "metrics.json").is_file() and run.protocols_summary.is_file():
                table["rows"][row["name"]] = row_result(
                    run, json.loads((run.root / "pseudo_labels" / "metrics.json").read_text()))
                done.append(run)
            continue
        cfg = apply_overrides(base, row["set"])
        print(f"[luss ablate] row {row['name']}: {' '.join(row['set']) or '(the config as it is)'}",
              flush=True)
        reused = reuse_steps(cfg, run, done)
        if reused:
            print(f"[luss ablate] {row['name']}: reusing {', '.join(reused)} of an earlier row",
                  flush=True)
        if data_key(cfg) in floors_of:
            reuse_floors(run, floors_of[data_key(cfg)])
        ctx = open_run(Namespace(run_dir=run.root, device=args.device), cfg)
        run_pipeline(ctx)
        table["rows"][row["name"]] = row_result(run, score_pseudo_labels(ctx))
        table["floors"] = table["floors"] or floor_rows(run)
        floors_of.setdefault(data_key(cfg), run)
        done.append(run)
        if ctx.rt.is_main:
            write_table(out, table)
    if not table["rows"]:
        raise LusscoreError("no row ran or was finished before")
    print(format_table(table))
    print(f"[luss ablate] {out / 'ablation.md'}, {out / 'ablation.json'}, {out / 'ablation.png'}")
