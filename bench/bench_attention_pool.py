"""Benchmark attention_pool: ours vs the eager reference and torch.compile of the reference.

Per shape: forward, backward and forward+backward times, the peak memory of fwd+bwd, and
the forward with the mean attention (what the label stage calls). As in
PASS's attention stage, x (the frozen backbone's features) needs no gradient, a and theta do
(--grad-x adds x). The HBM floor counts 5 passes over B*L*H*W (fwd reads x, a; bwd reads
x, a and writes grad_a) and the report gives our fwd+bwd's fraction of peak bandwidth.

    python bench/bench_attention_pool.py [--device cuda] [--quick] [--grad-x] [--json OUT]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python_tests"))

import common  # noqa: E402
import lusscore.ops as ops  # noqa: E402
from lusscore.reference.attention_pool import attention_pool as reference  # noqa: E402
from samples import (ATTENTION_POOL_BENCH_SHAPES, ATTENTION_POOL_QUICK_SHAPES,  # noqa: E402
                     attention_pool_inputs)


def peak_bandwidth_gbs(device) -> float | None:
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "H200" in name:
        return 4800.0
    if "H100" in name:
        return 2000.0 if "PCIe" in name else 3350.0
    return None


def reference_pooled(x, a, theta, mean=False):
    pooled, mean_att = reference(x, a, theta, mean)
    return (pooled, mean_att) if mean else pooled


def ours_pooled(x, a, theta, mean=False):
    pooled, mean_att = ops.attention_pool(x, a, theta, mean)
    return (pooled, mean_att) if mean else pooled


def bench_case(impl_name, fn, shape, dtype, device, grad_x):
    x, a, theta = attention_pool_inputs(*shape, dtype=dtype, device=device)
    a.requires_grad_(True)
    theta.requires_grad_(True)
    x.requires_grad_(grad_x)
    inputs = (x, a, theta)
    grad = torch.randn(shape[:2], dtype=dtype, device=device)

    def zero():
        for t in inputs:
            t.grad = None

    def fwd():
        with torch.no_grad():
            fn(*inputs)

    def fwd_bwd():
        zero()
        fn(*inputs).backward(grad)

    out = fn(*inputs)

    def bwd():
        zero()
        out.backward(grad, retain_graph=True)

    def fwd_mean():  # the label stage's call: both outputs, no gradient
        with torch.no_grad():
            fn(*inputs, mean=True)

    res = {"case": "x".join(map(str, shape)) + f" {str(dtype).split('.')[-1]}", "impl": impl_name,
           "grad_x": grad_x}
    for mode, f in (("fwd", fwd), ("bwd", bwd), ("fwd+bwd", fwd_bwd), ("fwd_mean_attention", fwd_mean)):
        res[mode] = common.time_fn(f, device)
    del out
    zero()
    res["peak_bytes_fwd+bwd"] = common.peak_memory(fwd_bwd, device)
    return res


def main():
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes (a smoke run)")
    p.add_argument("--grad-x", action="store_true", help="also differentiate w.r.t. x")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    args = p.parse_args()
    device = torch.device(args.device)
    shapes = ATTENTION_POOL_QUICK_SHAPES if args.quick else ATTENTION_POOL_BENCH_SHAPES
    peak = peak_bandwidth_gbs(device)
    results = []
    for *shape, dtype in shapes:
        # A fresh compile per shape: dynamo's recompile limit must not send a case to eager.
        torch._dynamo.reset()
        impls = [("eager", reference_pooled)]
        if not args.no_compile:
            impls.append(("torch.compile", torch.compile(reference_pooled, dynamic=False)))
        impls.append(("lusscore", ours_pooled))
        rows = {}
        for name, fn in impls:
            rows[name] = bench_case(name, fn, tuple(shape), dtype, device, args.grad_x)
        numel = 1
        for s in shape:
            numel *= s
        passes = 6 if args.grad_x else 5  # with grad_x, the backward also writes grad_x
        floor_s = passes * numel * torch.empty(0, dtype=dtype).element_size() / (peak * 1e9) if peak else None
        ours = rows["lusscore"]["fwd+bwd"]["median_s"]
        for name, r in rows.items():
            r["speedup_vs_this"] = r["fwd+bwd"]["median_s"] / ours
            if name == "lusscore" and floor_s:
                r["hbm_floor_s"] = floor_s
                r["hbm_fraction"] = floor_s / ours
            results.append(r)
        line = "  ".join(f"{n}: {r['fwd+bwd']['median_s'] * 1e3:.3f} ms" for n, r in rows.items())
        print(f"{rows['lusscore']['case']} fwd+bwd  {line}", file=sys.stderr)
    common.write_results(args.json, "attention_pool", device, results, peak_bandwidth_gbs=peak)


if __name__ == "__main__":
    main()
