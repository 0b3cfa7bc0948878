"""What every training stage shares: one process or torchrun DDP, seeding, data loaders,
AMP, per-epoch atomic checkpoints with exact resume, a JSON-lines log and progress bars.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler


from lusscore.utils import LusscoreError, progress_bar
from lusscore.checkpoint import load_checkpoint, save_checkpoint
from lusscore.config import save_config


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """bf16 autocast on the GPU; full precision on the CPU."""
        return torch.bfloat16 if self.device.type == "cuda" else None

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the running process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


KEEP_HOST_MEMORY_ENV = "LUSSCORE_KEEP_HOST_MEMORY"


def keep_freed_host_memory() -> bool:
    """Make glibc's malloc keep freed memory in the process. By default it hands every block
    over its mmap threshold (at most 32 MiB) and a large free heap top back to the system, so
    a CPU training step page-faults such activations in anew every time (the attention step's
    37 MiB maps: ~30% of the demo's step); jemalloc and tcmalloc keep freed memory, and so
    does this (the process holds on to its peak, which it reaches every step anyway).
    LUSSCORE_KEEP_HOST_MEMORY=0 leaves malloc as it is. Returns whether it applied: False
    then, or without glibc."""
    if os.environ.get(KEEP_HOST_MEMORY_ENV, "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl without mallopt, Windows)
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # malloc.h
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def setup_runtime(device: str | None = None) -> Runtime:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); start the process group.

    NCCL on the GPU, gloo on the CPU; a single process needs no environment at all.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise LusscoreError(f"--device {device!r} is not a device: cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise LusscoreError(f"--device {device!r}: lusscore runs on cpu or cuda, not {dev.type}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LusscoreError(f"--device {device}: no usable GPU here (torch "
                            f"{torch.__version__}, CUDA build {torch.version.cuda}); use --device cpu")
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if dev.type == "cpu":
        # Tiny gradients and BN statistics drift into denormal floats, which x86 CPUs handle
        # ~100x slower: a training step can take 30x its normal time. GPUs flush them anyway.
        torch.set_flush_denormal(True)
        keep_freed_host_memory()
    return Runtime(device=dev, rank=rank, world_size=world, local_rank=local_rank)


def seed_everything(seed: int, rank: int = 0) -> None:
    s = seed + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def stage_seed(seed: int, stage: str, part: str | int, rank: int = 0) -> int:
    """The seed of one part of a stage (its model's initialisation, "init", or an epoch): a
    function of (run seed, stage, part, rank) only, so a stage draws the same random numbers
    whether it runs after other stages in one process, alone, or resumed at any epoch."""
    digest = hashlib.sha256(f"{seed}:{stage}:{part}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seed_stage(seed: int, stage: str, part: str | int, rank: int = 0) -> None:
    """Seed Python's, NumPy's and torch's generators from stage_seed (DataLoader workers
    derive theirs from torch's when each epoch's iterator starts)."""
    seed_everything(stage_seed(seed, stage, part, rank))


class EpochSampler(Sampler):
    """A single-process shuffling sampler whose order depends only on (seed, epoch).

    Resuming at epoch e therefore sees the same order as an uninterrupted run.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def make_loader(dataset: Dataset, batch_size: int, rt: Runtime, seed: int, shuffle: bool = True,
                drop_last: bool = True, workers: int = 0, collate_fn=None) -> DataLoader:
    """batch_size is per process. DistributedSampler under DDP, EpochSampler otherwise."""
    if rt.distributed:
        sampler = DistributedSampler(dataset, num_replicas=rt.world_size, rank=rt.rank,
                                     shuffle=shuffle, seed=seed, drop_last=drop_last)
    else:
        sampler = EpochSampler(len(dataset), seed, shuffle)
    # Workers start anew each epoch: their seeds then follow the epoch's seed (seed_stage),
    # so a resumed epoch draws what the uninterrupted one drew.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                      num_workers=workers, collate_fn=collate_fn, pin_memory=rt.device.type == "cuda")


# prepare_model's channels-last route on the CPU (a switch for benchmarks to measure it against).
CPU_CHANNELS_LAST = True


def prepare_model(model: nn.Module, rt: Runtime, sync_bn: bool = True,
                  channels_last_on_cpu: bool = False) -> nn.Module:
    """Move to the device; under DDP convert BN to SyncBN (GPU only: PyTorch has no CPU
    SyncBN, so gloo runs keep per-replica BN statistics) and wrap. channels_last_on_cpu: the
    whole model channels-last on the CPU (to_channels_last_on_cpu)."""
    model = model.to(rt.device)
    if channels_last_on_cpu:
        to_channels_last_on_cpu(model, rt)
    if rt.distributed:
        if sync_bn and rt.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    return model


def to_channels_last_on_cpu(module: nn.Module, rt: Runtime) -> nn.Module:
    """On the CPU, the module's weights (and so every activation after its first
    convolution) channels-last, where oneDNN runs a ResNet faster: 10-13% on the demo's
    pretraining and fine-tuning steps, 10% on the attention step with its frozen backbone
    alone channels-last (the trained 1x1 convolutions of M_A are slower so)."""
    if CPU_CHANNELS_LAST and rt.device.type == "cpu":
        module.to(memory_format=torch.channels_last)
    return module


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class JsonlLog:
    """Appends one JSON object per line (main process only): losses, lr, throughput."""

    def __init__(self, path: str | os.PathLike, rt: Runtime):
        self.path, self.enabled = Path(path), rt.is_main
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record) -> None:
        if self.enabled:
            record.setdefault("time", time.time())
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


class StageCheckpoint:
    """A stage's checkpoint (+ .yaml config beside it): saved atomically after every epoch,
    resumed on start.

    `state` holds whatever the stage needs (model, optimizer, queue, ...) plus epoch and RNG.
    `done` marks a finished stage so `luss run` can skip it.
    """

    def __init__(self, path: str | os.PathLike, rt: Runtime, config: dict):
        self.path = Path(path)
        self.rt, self.config = rt, config

    def exists(self) -> bool:
        return self.path.is_file()

    def load(self, map_location="cpu") -> dict | None:
        if not self.exists():
            return None
        # Every rank restores its own RNG stream from the checkpoint of rank 0 plus its rank.
        return load_checkpoint(self.path, map_location=map_location, restore_rng=True)

    def save(self, state: dict, done: bool = False) -> None:
        if self.rt.is_main:
            save_checkpoint(self.path, {**state, "config": self.config, "done": done})
            save_config(self.path.with_suffix(".yaml"), self.config)
        self.rt.barrier()


def autocast(rt: Runtime):
    if rt.amp_dtype is None:
        return torch.autocast(device_type=rt.device.type, enabled=False)
    return torch.autocast(device_type=rt.device.type, dtype=rt.amp_dtype)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


class Trainer:
    """What one training stage supplies to `train_epochs`: its model (as trained, DDP-wrapped
    under torchrun), optimizer, loader, per-iteration lr schedule and `loss(batch)`; the hooks
    default to nothing. The loop owns the rest: resume, schedule, progress, log, checkpoint."""

    name: str                    # the stage: <run>/<name>.pt, <run>/<name>.jsonl
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    lrs: list[float]
    epochs: int

    def loss(self, batch) -> tuple[torch.Tensor, dict, int]:
        """(loss, {part: tensor} logged as loss_<part>, images in the batch)."""
        raise NotImplementedError

    def start_epoch(self, epoch: int) -> None:
        """Before the epoch's first batch (e.g. the SwAV queue starts)."""

    def before_step(self, step: int) -> None:
        """After backward, before the optimizer step (e.g. prototypes frozen early on)."""

    def after_step(self, step: int) -> None:
        """After the optimizer step (e.g. a momentum network's EMA update)."""

    def state(self) -> dict:
        """Checkpoint entries beside model, optimizer and epoch."""
        return {}

    def load(self, state: dict) -> None:
        """Restore what `state()` saved."""


def train_step(trainer: Trainer, batch, step: int) -> tuple[torch.Tensor, dict, int]:
    """One optimisation step of a stage (also what bench/bench_pipeline.py times)."""
    loss, parts, images = trainer.loss(batch)
    trainer.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    trainer.before_step(step)
    trainer.optimizer.step()
    trainer.after_step(step)
    return loss, parts, images


def train_epochs(trainer: Trainer, run, rt: Runtime, config: dict) -> nn.Module:
    """The training loop of every stage: resumes from the run's checkpoint of the stage
    (RunDir.checkpoint) at its last saved epoch, follows the lr schedule per iteration, shows
    progress, appends one JSON line per iteration to the stage's log (RunDir.training_log) and
    checkpoints atomically after every epoch (the last one marked done). Returns the
    unwrapped model."""
    name, core = trainer.name, unwrap(trainer.model)
    if len(trainer.loader) == 0:  # drop_last and fewer images than a batch: zero steps
        n, batch = len(trainer.loader.dataset), trainer.loader.batch_size
        raise LusscoreError(f"{name}: {n} training image(s) per process, fewer than one batch of "
                            f"{batch}, so an epoch would take no step; set {name}.batch_size to "
                            f"at most {max(1, n) * rt.world_size}")
    ck = StageCheckpoint(run.checkpoint(name), rt, config)
    log = JsonlLog(run.training_log(name), rt)
    start, iters = 0, len(trainer.loader)
    state = ck.load()
    if state is not None:
        core.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        start = state["epoch"]
        trainer.load(state)
    seed = int(config.get("seed", 0))
    for epoch in range(start, trainer.epochs):
        seed_stage(seed, name, epoch, rt.rank)
        trainer.loader.sampler.set_epoch(epoch)
        trainer.start_epoch(epoch)
        trainer.model.train()
        bar = progress_bar(trainer.loader, desc=f"{name} {epoch + 1}/{trainer.epochs}",
                           disable=not rt.is_main, leave=False)
        for it, batch in enumerate(bar):
            t0 = time.perf_counter()
            step = epoch * iters + it
            set_lr(trainer.optimizer, trainer.lrs[step])
            loss, parts, images = train_step(trainer, batch, step)
            rate = images * rt.world_size / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{rate:.0f}")
            log.write(stage=name, epoch=epoch, iter=step, loss=loss.item(), lr=trainer.lrs[step],
                      img_s=rate, **{f"loss_{k}": v.item() for k, v in parts.items()})
        ck.save({"model": core.state_dict(), "optimizer": trainer.optimizer.state_dict(),
                 "epoch": epoch + 1, **trainer.state()}, done=epoch + 1 == trainer.epochs)
    return core
