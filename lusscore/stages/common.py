"""What every stage is given: a StageContext (config, run folder, runtime, dataset), built
once per command by `start_run`, and the command-line plumbing that builds it."""
from __future__ import annotations

import json
import os
import time
from functools import cached_property
from pathlib import Path

import torch

from lusscore.config import apply_overrides, load_config, save_config
from lusscore.data import ImageNetS
from lusscore.engine import Runtime, seed_everything, seed_stage, setup_runtime
from lusscore.ops.switch import apply_ops_config, ops_mode
from lusscore.stages.layout import EVAL_SPLITS, PROTOCOLS, STEPS, RunDir, downstream, step_keys  # noqa: F401
from lusscore.utils import LusscoreError, atomic_write_text


class StageContext:
    """One command's config, run folder (RunDir), runtime and dataset (opened on first use)."""

    def __init__(self, cfg: dict, run_dir: str | os.PathLike | RunDir, rt: Runtime):
        self.cfg, self.rt = cfg, rt
        self.run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)

    @cached_property
    def dataset(self) -> ImageNetS:
        return dataset_of(self.cfg)

    @property
    def seed(self) -> int:
        return int(self.cfg["seed"])

    def seed_stage(self, stage: str) -> None:
        """Seed the generators for a stage's model initialisation from (seed, stage, rank)
        alone: what ran before in this process does not matter (its epochs are seeded by the
        training loop the same way)."""
        seed_stage(self.seed, stage, "init", self.rt.rank)

    def log(self, text: str) -> None:
        """One progress line of `luss run` (main process only)."""
        if self.rt.is_main:
            print(f"[luss run] {text}", flush=True)


class StageTimings:
    """Wall seconds of each stage of one `luss run` (GPU work finished), printed and written
    to <run>/timings.json after every stage with this process's peak GPU memory per stage;
    a stage skipped as complete takes ~0 s."""

    def __init__(self, ctx: StageContext):
        self.path, self.rt, self.log = ctx.run.timings, ctx.rt, ctx.log
        self.stages: dict[str, float] = {}
        self.peak_bytes: dict[str, int] = {}
        self.start = self.last = self._now()
        if self.rt.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.rt.device)

    def _now(self) -> float:
        if self.rt.device.type == "cuda":
            torch.cuda.synchronize(self.rt.device)
        return time.perf_counter()

    def lap(self, stage: str) -> None:
        now = self._now()
        self.stages[stage] = now - self.last
        self.last = now
        memory = ""
        if self.rt.device.type == "cuda":
            self.peak_bytes[stage] = torch.cuda.max_memory_allocated(self.rt.device)
            torch.cuda.reset_peak_memory_stats(self.rt.device)
            memory = f", peak GPU memory {self.peak_bytes[stage] / 2**30:.2f} GiB"
        self.log(f"{stage}: {self.stages[stage]:.1f} s{memory}")
        if self.rt.is_main:
            atomic_write_text(self.path, json.dumps(
                {"ops": ops_mode(), "device": str(self.rt.device), "world_size": self.rt.world_size,
                 "stages_s": self.stages, "total_s": now - self.start,
                 "peak_gpu_bytes": self.peak_bytes}, indent=1))


# ---------------------------------------------------------------------------------------------
# Config fingerprints: a rerun never reuses outputs made with other settings


def config_value(cfg: dict, key: str):
    node = cfg
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def fingerprint(cfg: dict, step: str) -> dict:
    """{config key: value} of what a step's outputs depend on (layout.STEPS). With a tau
    sweep, label.tau is the sweep's output, not a setting, and is left out."""
    keys = step_keys(step)
    if cfg["label"]["sweep"]:
        keys = tuple(k for k in keys if k != "label.tau")
    return json.loads(json.dumps({k: config_value(cfg, k) for k in keys}))  # as JSON stores it


def recorded_steps(run: RunDir) -> dict:
    if not run.fingerprints.is_file():
        return {}
    try:
        return json.loads(run.fingerprints.read_text())
    except json.JSONDecodeError as e:
        raise LusscoreError(f"{run.fingerprints}: not valid JSON ({e}); restore it or remove "
                            "the run folder") from None


def record_step(ctx: "StageContext", step: str) -> None:
    """Note that a step's outputs now exist, made with this config (main process)."""
    if ctx.rt.is_main:
        steps = recorded_steps(ctx.run)
        steps[step] = fingerprint(ctx.cfg, step)
        atomic_write_text(ctx.run.fingerprints, json.dumps(steps, indent=1))


def _leaves(values: dict, prefix: str = "") -> dict:
    """{dotted key: value} of the non-mapping values of a nested fingerprint."""
    out = {}
    for k, v in values.items():
        if isinstance(v, dict) and v:
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_fingerprints(cfg: dict, run: RunDir) -> None:
    """An error naming every key whose value differs from the one a completed step of the
    run folder was made with, and the ways out."""
    steps = recorded_steps(run)
    for step in STEPS:  # in run order: the first stale step is where to redo from
        if step not in steps:
            continue
        then, now = _leaves(steps[step]), _leaves(fingerprint(cfg, step))
        diff = [f"{k}: {then.get(k)!r} in the run, {now.get(k)!r} now"
                for k in sorted(set(then) | set(now)) if then.get(k) != now.get(k)]
        if diff:
            raise LusscoreError(
                f"{run.root} was made with other settings than this config ("
                + "; ".join(diff) + f"), from step {step} on. Use a new --run-dir, or "
                f"`luss run CONFIG --run-dir {run.root} --redo-from {step}` to redo {step} and "
                "every step after it")


def redo_from(run: RunDir, step: str) -> list[str]:
    """Remove the outputs and records of a step and of every step after it; -> those steps."""
    import shutil
    if step not in STEPS:
        raise LusscoreError(f"--redo-from: unknown step {step!r}; one of {list(STEPS)}")
    steps, redone = recorded_steps(run), downstream(step)
    for s in redone:
        for path in run.outputs(s):  # every rank of a torchrun may do this: missing is fine
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        steps.pop(s, None)
    atomic_write_text(run.fingerprints, json.dumps(steps, indent=1))
    return redone


def add_run_arguments(parser, config_required: bool = False) -> None:
    parser.add_argument("--run-dir", required=True, help="the run folder (checkpoints, labels, ...)")
    parser.add_argument("--config", required=config_required,
                        help="YAML file or packaged config name (default: the run's config.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set pretrain.epochs=5 (repeatable)")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")


def resolve_config(run_dir: str | Path, config: str | None, overrides: list[str]) -> dict:
    """The run's config: --config (or the run's saved config.yaml) with --set applied."""
    saved = RunDir(run_dir).config
    if config is None:
        if not saved.is_file():
            raise LusscoreError(f"{run_dir}: no {saved.name} yet; pass --config (e.g. --config demo)")
        config = saved
    return apply_overrides(load_config(config), overrides)


def open_run(args, cfg: dict | None = None) -> StageContext:
    """The StageContext of a command: the resolved config (or cfg) saved into the run folder,
    the runtime and the seeds."""
    if cfg is None:
        cfg = resolve_config(args.run_dir, args.config, args.set)
    check_fingerprints(cfg, RunDir(args.run_dir))  # before config.yaml is rewritten
    ctx = StageContext(cfg, args.run_dir, setup_runtime(args.device))
    if ctx.rt.is_main:
        save_config(ctx.run.config, cfg)
    seed_everything(ctx.seed, ctx.rt.rank)
    return ctx


def start_run(args, cfg: dict | None = None) -> StageContext:
    """open_run, and the config's ops mode (fused kernels or their references) set for the
    rest of this stage command."""
    ctx = open_run(args, cfg)
    apply_ops_config(ctx.cfg)
    return ctx


def dataset_of(cfg: dict) -> ImageNetS:
    root = cfg["data"]["root"]
    if not root:
        raise LusscoreError("the config has no data.root: set it with --set data.root=PATH")
    return ImageNetS(root, num_classes=cfg["data"]["num_classes"])


def train_stage(ctx: StageContext, stage: str, train) -> None:
    """Run a training stage, train(ctx), unless its checkpoint is complete (a partial one is
    resumed by the stage's training loop)."""
    if ctx.run.stage_done(stage):
        ctx.log(f"{stage}: complete ({ctx.run.checkpoint(stage)}), skipped")
        return
    ctx.log(f"{stage}: {ctx.cfg[stage]['epochs']} epochs")
    train(ctx)
