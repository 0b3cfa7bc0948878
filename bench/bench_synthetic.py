"""Throughput of the synthetic dataset generator (images/s, render + JPEG/PNG writes).

    python bench/bench_synthetic.py [--workers N] [--repeats R] [--json result.json]
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lusscore.data.synthetic import SynthConfig, generate_dataset, render_sample  # noqa: E402


def time_generate(config: SynthConfig, workers: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        generate_dataset(Path(tmp) / "ds", config, progress=False, workers=workers)
        return time.perf_counter() - start


def time_render(config: SynthConfig, count: int) -> float:
    start = time.perf_counter()
    for j in range(count):
        render_sample(config, "train", j)
    return time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs; the best is reported")
    ap.add_argument("--size", type=int, default=SynthConfig.size)
    ap.add_argument("--out", "--json", type=Path, help="also write the JSON result here")
    args = ap.parse_args()

    config = SynthConfig(size=args.size)
    time_render(config, 8)  # warm-up: imports, caches
    seconds = min(time_generate(config, args.workers) for _ in range(args.repeats))
    render_count = config.classes * config.train_per_class
    render_s = min(time_render(config, render_count) for _ in range(args.repeats))
    result = {
        "bench": "synthetic",
        "device": "cpu",
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "workers": args.workers,
        "config": asdict(config),
        "images": config.num_images,
        "seconds": round(seconds, 4),
        "images_per_s": round(config.num_images / seconds, 1),
        "render_only_images_per_s": round(render_count / render_s, 1),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
