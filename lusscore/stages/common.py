"""Command-line plumbing shared by the stages: run folder, config, overrides, runtime."""
from __future__ import annotations

from pathlib import Path

from lusscore.config import apply_overrides, load_config, save_config
from lusscore.data import ImageNetS
from lusscore.engine import Runtime, StageCheckpoint, seed_everything, setup_runtime
from lusscore.ops.switch import apply_ops_config
from lusscore.stages.layout import (  # noqa: F401  (the stages import the layout from here)
    EVAL_SPLITS,
    PROTOCOLS,
    RUN_CONFIG,
    baselines_path,
    match_path,
    predictions_dir,
    protocol_dir,
    protocol_metrics_path,
)
from lusscore.utils import LusscoreError


def add_run_arguments(parser, config_required: bool = False) -> None:
    parser.add_argument("--run-dir", required=True, help="the run folder (checkpoints, labels, ...)")
    parser.add_argument("--config", required=config_required,
                        help="YAML file or packaged config name (default: the run's config.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set pretrain.epochs=5 (repeatable)")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")


def resolve_config(run_dir: str | Path, config: str | None, overrides: list[str]) -> dict:
    """The run's config: --config (or the run's saved config.yaml) with --set applied."""
    run_dir = Path(run_dir)
    saved = run_dir / RUN_CONFIG
    if config is None:
        if not saved.is_file():
            raise LusscoreError(f"{run_dir}: no {RUN_CONFIG} yet; pass --config (e.g. --config demo)")
        config = saved
    return apply_overrides(load_config(config), overrides)


def start_run(args) -> tuple[dict, Path, Runtime]:
    cfg = resolve_config(args.run_dir, args.config, args.set)
    run_dir = Path(args.run_dir)
    rt = setup_runtime(args.device)
    if rt.is_main:
        save_config(run_dir / RUN_CONFIG, cfg)
    seed_everything(int(cfg.get("seed", 0)), rt.rank)
    apply_ops_config(cfg)  # fused kernels or their references, for this whole command
    return cfg, run_dir, rt


def dataset_of(cfg: dict) -> ImageNetS:
    root = cfg.get("data", {}).get("root")
    if not root:
        raise LusscoreError("the config has no data.root: set it with --set data.root=PATH")
    return ImageNetS(root, num_classes=cfg["data"].get("num_classes"))


def run_training_stage(args, stage: str, train) -> None:
    """A training stage's command: skip it when <run>/<stage>.pt is complete, else
    train(cfg, run_dir, rt) (which resumes from the last saved epoch)."""
    cfg, run_dir, rt = start_run(args)
    ck = StageCheckpoint(run_dir, stage, rt, cfg)
    if ck.is_done():
        print(f"{stage}: {ck.path} is complete")
        return
    train(cfg, run_dir, rt)
    if rt.is_main:
        print(f"{stage}: wrote {ck.path}")
