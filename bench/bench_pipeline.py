"""Benchmark the PASS pipeline with the fused ops against their pure-PyTorch references.

Default: steady-state training steps of the pretrain stage (SwAV + D2S + P2P, the S50
multi-crop, LARS, AMP on the GPU; and the same with PixPro as L_e, PASS_p) and of the
attention stage (frozen backbone, attention
pooling), on one fixed batch already on the device so the data loader is not measured:
images/s and peak GPU memory (torch.cuda.max_memory_allocated over the steps, absolute and
above what was allocated before the step) with `ops: fused` and `ops: reference`, the same
config, in this one process; ratios are fused / reference. On the CPU (the `demo` config by
default: the embedded default's steps) also `plain`: the reference ops, PyTorch's own
bilinear upsampling, contiguous (not channels-last) models and glibc's malloc as it comes,
none of lusscore's CPU paths (measured first: the other modes run as `setup_runtime` sets the
CPU up, freed memory kept); and the multi-crop loading of a pretrain batch in the main process
(`data.workers: 0`, as the demo runs it), lusscore's batched augmentation against
torchvision's per-crop transforms.

--stages: the wall time of each stage of a whole `luss run` (from <run>/timings.json, with
each stage's peak GPU memory), once per ops mode, each in a fresh process on a fresh run
folder; the synthetic dataset of the config's recipe is generated first (kept for reuse).

    python bench/bench_pipeline.py [--device cuda|cpu] [--config synthetic_gpu|demo]
                                   [--set KEY=VALUE] [--stages] [--ops fused,reference,plain]
                                   [--quick] [--json OUT]
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2 as T

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
import lusscore.engine as engine  # noqa: E402
import lusscore.models.pixel_attention as pixel_attention  # noqa: E402
import lusscore.ops as ops  # noqa: E402
from lusscore.config import apply_overrides, load_config  # noqa: E402
from lusscore.data.views import MultiCropTransform, augment_options, collate_multicrop  # noqa: E402
from lusscore.engine import Runtime, keep_freed_host_memory, train_step  # noqa: E402
from lusscore.losses.pass_loss import SwAVQueue  # noqa: E402
from lusscore.stages.attention import AttentionTrainer  # noqa: E402
from lusscore.stages.pretrain import PretrainTrainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# The dataset of lusscore/configs/synthetic_gpu.yaml's header (`luss synth` options).
SYNTH_RECIPE = ["--classes", "50", "--size", "224", "--train-per-class", "100", "--val-per-class", "4",
                "--semi-per-class", "2"]
# --quick: a 3-class set of 48 px images and the config shrunk to match (runs on a CPU).
QUICK_SYNTH = ["--classes", "3", "--size", "48", "--train-per-class", "8", "--val-per-class", "3",
               "--semi-per-class", "1"]
QUICK_SET = ["data.num_classes=3", "data.workers=0", "model.width=8", "model.output_stride=16",
             "model.hidden_mlp=32", "model.feat_dim=16", "model.num_prototypes=20",
             "pretrain.epochs=2", "pretrain.batch_size=8", "pretrain.crops.sizes=[48, 24]",
             "pretrain.crops.counts=[2, 2]", "pretrain.queue_length=16",
             "pretrain.freeze_prototypes_iters=2", "attention.epochs=1", "attention.batch_size=8",
             "attention.crop=48", "attention.queue_length=16", "cluster.k=3", "cluster.nredo=2",
             "cluster.resize=48", "cluster.crop=48", "label.resize=48", "label.sweep=[0.3, 0.6, 0.1]",
             "finetune.epochs=1", "finetune.batch_size=8", "finetune.crop=48", "finetune.label_size=24",
             "infer.resize=48"]
MODES = ("fused", "reference", "plain")  # plain: reference ops, no CPU paths of lusscore's own
STEADY_STATE = 1 << 30  # an iteration past freeze_prototypes_iters: every parameter steps


# ------------------------------------------------------------------ training steps
def random_images(n: int, size: int, seed: int = 0):
    """n RGB noise images about `size` px (the content does not change the work)."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size + size // 8, 3), dtype=np.uint8))
            for _ in range(n)]


def multicrop_batch(sizes, counts, min_scale, max_scale, batch: int, image_size: int, std_quirk: bool):
    torch.manual_seed(0)
    transform = MultiCropTransform(sizes, counts, min_scale, max_scale, std_quirk=std_quirk)
    return transform.collate([transform(im) for im in random_images(batch, image_size)])


def to_device(batch, device):
    batch = copy.copy(batch)
    batch.images = [t.to(device) for t in batch.images]
    batch.boxes = [t.to(device) for t in batch.boxes]
    batch.flips = [t.to(device) for t in batch.flips]
    return batch


def full_queue(length: int, dim: int, batch: int, device) -> SwAVQueue | None:
    """A queue in its steady state (full, in use), as after epoch_queue_starts."""
    length -= length % batch
    if length <= 0:
        return None
    queue = SwAVQueue(length, dim, device)
    queue.tensor.copy_(torch.nn.functional.normalize(torch.randn_like(queue.tensor), dim=-1))
    queue.in_use = True
    return queue


def pretrain_step_fn(cfg: dict, rt: Runtime, batch):
    """A closure running one iteration of the pretrain stage's own trainer (the training loop's
    train_step), with the SwAV queue full as after epoch_queue_starts."""
    torch.manual_seed(0)
    trainer = PretrainTrainer(cfg, rt, samples=[])
    bs = batch.images[0].shape[0]
    trainer.queue = full_queue(trainer.queue_len, cfg["model"]["feat_dim"], bs, rt.device)
    return lambda: train_step(trainer, batch, STEADY_STATE)[0], bs


def attention_step_fn(cfg: dict, rt: Runtime, batch):
    """One iteration of the attention stage's trainer (frozen backbone, trainable attention
    and prototypes)."""
    torch.manual_seed(0)
    trainer = AttentionTrainer(cfg, rt, samples=[], pretrain_state=None)
    bs = batch.images[0].shape[0]
    if trainer.queue is not None:
        trainer.queue = full_queue(trainer.queue.tensor.shape[1], cfg["model"]["feat_dim"], bs,
                                   rt.device)
    return lambda: train_step(trainer, batch, STEADY_STATE)[0], bs


@contextlib.contextmanager
def ops_mode(mode: str):
    """fused: lusscore's kernels; reference: their pure-PyTorch twins; plain: the twins,
    PyTorch's own upsampling and contiguous (not channels-last) models (what the step is
    without lusscore)."""
    pixel_attention.CPU_UPSAMPLE_VIA_CHANNELS_LAST = engine.CPU_CHANNELS_LAST = mode != "plain"
    try:
        with ops.use_reference(mode != "fused"):
            yield
    finally:
        pixel_attention.CPU_UPSAMPLE_VIA_CHANNELS_LAST = engine.CPU_CHANNELS_LAST = True


def measure(name: str, make_step, cfg: dict, rt: Runtime, batch, mode: str, warmup: int, repeat: int):
    device = rt.device
    with ops_mode(mode):
        step, bs = make_step(cfg, rt, batch)
        loss = step().detach().item()  # the first step (allocations, cuDNN choices) is not timed
        timing = common.time_fn(step, device, warmup=warmup, repeat=repeat)
        row = {"case": name, "impl": mode, "batch": bs, "step": timing,
               "images_per_s": bs / timing["median_s"], "first_loss": loss}
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            step()
            torch.cuda.synchronize(device)
            row["peak_bytes"] = torch.cuda.max_memory_allocated(device)
            row["peak_step_bytes"] = row["peak_bytes"] - before
    del step
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def bench_steps(cfg: dict, rt: Runtime, modes, warmup: int, repeat: int, attention: bool) -> list[dict]:
    pcfg, acfg = cfg["pretrain"], cfg["attention"]
    crops = pcfg["crops"]
    image_size = max(crops["sizes"])
    std_quirk = pcfg.get("std_quirk", True)
    pretrain_batch = multicrop_batch(crops["sizes"], crops["counts"], crops["min_scale"],
                                     crops["max_scale"], pcfg["batch_size"], image_size, std_quirk)
    # The config's pretraining, and PASS_p's (PixPro + the same parts) on the same batch.
    other = "swav" if pcfg["method"] == "pixpro" else "pixpro"
    cases = [(f"pretrain_{pcfg['method']}", pretrain_step_fn, cfg, pretrain_batch),
             (f"pretrain_{other}", pretrain_step_fn,
              apply_overrides(cfg, [f"pretrain.method={other}"]), pretrain_batch)]
    if attention:
        crop = acfg.get("crop", crops["sizes"][0])
        cases.append(("attention", attention_step_fn, cfg,
                      multicrop_batch([crop], [2], [acfg.get("min_scale", 0.14)], [1.0],
                                      acfg["batch_size"], image_size, std_quirk)))
    # plain is the step as PyTorch runs it, glibc's malloc as it comes: its rounds go first;
    # then the runtime's setting (setup_runtime: freed memory kept) for lusscore's modes.
    phases = [[m for m in modes if m == "plain"], [m for m in modes if m != "plain"]]
    per_case: dict[str, dict] = {name: {} for name, *_ in cases}
    for phase in phases:
        if phase and phase[0] != "plain" and rt.device.type == "cpu":
            keep_freed_host_memory()
        for name, make_step, cfg, batch in cases:
            batch = to_device(batch, rt.device)
            for mode in phase:  # one untimed round of every mode first: the first one run pays
                with ops_mode(mode):  # one-off costs (kernel choices, pages)
                    step, _ = make_step(cfg, rt, batch)
                    step()
                    step()
                del step
            for mode in phase:
                per_case[name][mode] = measure(name, make_step, cfg, rt, batch, mode, warmup, repeat)
            del batch
    rows = []
    for name, per_mode in per_case.items():
        per_mode = {m: per_mode[m] for m in modes}
        add_ratios(per_mode, ("images_per_s", "peak_bytes", "peak_step_bytes"))
        for m, row in per_mode.items():
            mem = f", peak {row['peak_bytes'] / 2**30:.2f} GiB" if "peak_bytes" in row else ""
            print(f"{name} step [{m}]: {row['images_per_s']:.1f} images/s{mem}", file=sys.stderr)
        rows += per_mode.values()
    return rows


def torchvision_colour(transform: MultiCropTransform):
    """The photometric recipe as torchvision's per-image transforms (one call per crop, uint8
    between operations): the loading peer."""
    aug = transform.photometric
    s = aug.jitter_strength
    return T.Compose([
        T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=aug.color_p),
        T.RandomGrayscale(p=aug.grayscale_p),
        T.RandomApply([T.GaussianBlur(aug.kernel_size, sigma=aug.blur_sigma)], p=aug.blur_p),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(mean=transform.mean.flatten().tolist(), std=transform.std.flatten().tolist())])


def bench_loading(cfg: dict, repeat: int) -> list[dict]:
    """Multi-crop loading of pretrain batches in this process (decoded images in memory: the
    crops, photometric augmentation, normalisation and collation): images/s, lusscore's
    (augmentation applied to the batch at collation by the photometric_augment op, or by its
    batched PyTorch reference) and torchvision's per-crop transforms."""
    pcfg = cfg["pretrain"]
    crops = pcfg["crops"]
    transform = MultiCropTransform(crops["sizes"], crops["counts"], crops["min_scale"],
                                   crops["max_scale"], std_quirk=pcfg.get("std_quirk", True),
                                   **augment_options(pcfg.get("augment")))
    colour = torchvision_colour(transform)

    def per_crop():
        samples = [transform(im) for im in images]
        for sample in samples:
            sample.crops = [colour(c) for c in sample.crops]
        return collate_multicrop(samples)

    images = random_images(pcfg["batch_size"], max(crops["sizes"]))

    def batched():
        return transform.collate([transform(im) for im in images])

    def batched_reference():
        with ops.use_reference():
            return batched()

    impls = {"fused": batched, "reference": batched_reference, "torchvision per crop": per_crop}
    rows = {}
    for impl, load in impls.items():
        timing = common.time_fn(load, "cpu", warmup=1, repeat=repeat)
        rows[impl] = {"case": "pretrain multi-crop loading (main process)", "impl": impl,
                      "batch": len(images), "step": timing,
                      "images_per_s": len(images) / timing["median_s"]}
        print(f"{rows[impl]['case']} [{impl}]: {rows[impl]['images_per_s']:.1f} images/s",
              file=sys.stderr)
    for peer, key in (("reference", "reference"), ("torchvision per crop", "torchvision")):
        rows["fused"][f"images_per_s_fused_over_{key}"] = (
            rows["fused"]["images_per_s"] / rows[peer]["images_per_s"])
    return list(rows.values())


def add_ratios(per_mode: dict, keys) -> None:
    """fused / each other mode of each key, written on the fused row."""
    fused = per_mode.get("fused")
    for other in ("reference", "plain"):
        if fused is None or other not in per_mode:
            continue
        for key in keys:
            if fused.get(key) is not None and per_mode[other].get(key):
                fused[f"{key}_fused_over_{other}"] = fused[key] / per_mode[other][key]


# ------------------------------------------------------------------ whole runs
def luss(*argv, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "lusscore", *argv], cwd=ROOT, env=env, check=True,
                          **kwargs)


def bench_stages(args, device, modes) -> tuple[list[dict], dict]:
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_pipeline_"))
    data = Path(args.data) if args.data else work / ("data_quick" if args.quick else "data")
    extra = {"work": str(work), "data": str(data)}
    if not args.data:
        recipe = QUICK_SYNTH if args.quick else SYNTH_RECIPE
        start = time.perf_counter()
        luss("synth", str(data), *recipe, "--workers", str(args.synth_workers))
        extra["synth_s"] = time.perf_counter() - start  # ~0 when the folder already held it
        extra["synth_recipe"] = recipe
    overrides = (QUICK_SET if args.quick else []) + args.set
    per_stage: dict[str, dict[str, dict]] = {}
    for mode in modes:
        run = work / f"run_{mode}"
        shutil.rmtree(run, ignore_errors=True)  # a fresh run: completed stages would be skipped
        argv = ["run", args.config, "--run-dir", str(run), "--device", str(device),
                "--set", f"data.root={data}", "--set", f"ops={mode}"]
        for item in overrides:
            argv += ["--set", item]
        start = time.perf_counter()
        luss(*argv)
        wall = time.perf_counter() - start
        timings = json.loads((run / "timings.json").read_text())
        run_cfg = load_config(run / "config.yaml")
        metrics = json.loads((run / "metrics.json").read_text())
        for stage, seconds in list(timings["stages_s"].items()) + [("total", timings["total_s"])]:
            row = {"case": f"stage {stage}", "impl": mode, "seconds": seconds}
            if stage in timings.get("peak_gpu_bytes", {}):
                row["peak_bytes"] = timings["peak_gpu_bytes"][stage]
            log = run / f"{stage}.jsonl"
            if stage in ("pretrain", "attention") and log.is_file():
                # End to end (data loading and checkpoints included): iterations x batch / time.
                iters = sum(1 for line in log.read_text().splitlines() if line.strip())
                row["images_per_s"] = iters * int(run_cfg[stage]["batch_size"]) / seconds
            if stage == "total":
                row["process_wall_s"] = wall  # with interpreter start and imports
                row["mIoU"] = metrics.get("mIoU")
            per_stage.setdefault(stage, {})[mode] = row
    rows = []
    for stage, per_mode in per_stage.items():
        add_ratios(per_mode, ("seconds", "peak_bytes", "images_per_s"))
        rows += per_mode.values()
        line = "  ".join(f"{m}: {r['seconds']:.1f} s" for m, r in per_mode.items())
        print(f"stage {stage}: {line}", file=sys.stderr)
    return rows, extra


def main():
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--config", default=None,
                   help="packaged config name or YAML file (default: synthetic_gpu on a GPU, demo on the CPU)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable), as for `luss run`")
    p.add_argument("--ops", default=None,
                   help="modes to run (default: fused,reference on a GPU, fused,reference,plain on the CPU)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run; fits a CPU)")
    p.add_argument("--stages", action="store_true", help="time each stage of whole `luss run`s")
    p.add_argument("--no-attention", action="store_true", help="only the pretrain step")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 5; quick 1)")
    p.add_argument("--repeat", type=int, default=None, help="timed steps (default 20; quick 3)")
    p.add_argument("--work", default=None, help="--stages: folder for the dataset and runs")
    p.add_argument("--data", default=None, help="--stages: an existing dataset (skips `luss synth`)")
    p.add_argument("--synth-workers", type=int, default=min(16, os.cpu_count() or 1))
    args = p.parse_args()
    device = torch.device(args.device)
    if args.config is None:
        args.config = "demo" if device.type == "cpu" else "synthetic_gpu"
    if args.ops is None:
        args.ops = ",".join(MODES if device.type == "cpu" else MODES[:2])
    modes = [m.strip() for m in args.ops.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            p.error(f"--ops: unknown mode {m!r} ({', '.join(MODES)})")
        if m == "plain" and args.stages:
            p.error("--ops plain: only for the training steps (not --stages)")
    cfg = apply_overrides(load_config(args.config), (QUICK_SET if args.quick else []) + args.set)
    extra = {"config": args.config, "overrides": (QUICK_SET if args.quick else []) + args.set,
             "quick": args.quick}
    if args.stages:
        rows, more = bench_stages(args, device, modes)
        extra.update(more)
        name = "pipeline_stages"
    else:
        if device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device() if device.index is None
                                  else device.index)
            torch.cuda.set_device(device)
        rt = Runtime(device=device)
        if device.type == "cpu":
            # Tiny CPU runs reach denormal floats, which x86 handles ~100x slower (seconds per
            # step, whichever ops run): flush them so the two modes are compared fairly.
            torch.set_flush_denormal(True)
            extra["flush_denormal"] = True
        warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
        repeat = args.repeat if args.repeat is not None else (3 if args.quick else 20)
        rows = bench_steps(cfg, rt, modes, warmup, repeat, attention=not args.no_attention)
        if device.type == "cpu":
            rows += bench_loading(cfg, repeat)
        extra.update(warmup=warmup, repeat=repeat, amp=str(rt.amp_dtype))
        name = "pipeline"
    common.write_results(args.json, name, device, rows, **extra)


if __name__ == "__main__":
    main()
