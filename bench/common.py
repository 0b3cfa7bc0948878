"""Shared benchmark helpers: a timer that syncs the GPU, device tags and JSON output.

Every bench script takes --json PATH and writes {"device": ..., "results": [...]}, each
result naming the case, the implementation (ours or a peer) and its median time.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else the machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_tag(device: str | torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (f"cpu ({cpu_model()}, {torch.backends.cpu.get_cpu_capability()}, "
            f"{os.cpu_count()} cores, {torch.get_num_threads()} threads)")


def time_fn(fn, device="cpu", warmup: int = 3, repeat: int = 20, min_time: float = 0.2) -> dict:
    """Median/min seconds of fn() over repeats (CUDA events on the GPU)."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    times = []
    start_all = time.perf_counter()
    while len(times) < repeat or (time.perf_counter() - start_all < min_time and len(times) < 1000):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "runs": len(times)}


def peak_memory(fn, device) -> int | None:
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--json", help="write the results to this JSON file")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def write_results(path: str | None, bench: str, device, results: list[dict], **extra) -> dict:
    doc = {"bench": bench, "device": device_tag(device), "torch": torch.__version__,
           "results": results, **extra}
    text = json.dumps(doc, indent=1)
    print(text)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(path).with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return doc


def merge(parts_dir: str, out: str) -> None:
    docs = [json.loads(p.read_text()) for p in sorted(Path(parts_dir).glob("*.json"))]
    Path(out).write_text(json.dumps(docs, indent=1))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "merge":
        merge(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: python bench/common.py merge PARTS_DIR OUT.json")
