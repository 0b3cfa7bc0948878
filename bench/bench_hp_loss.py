"""Benchmark hp_contrastive_loss (forward + backward): ours (tiled, fused) vs the chunked
reference that materialises the masks vs the official HP code's way (every N x N matrix at once,
in plain PyTorch), time and peak memory.

HP's shape: N = 50,176 patches (batch 64 at 28 x 28), codes d = 512 (the task-specific
features are the EMA codes, d_s = d), task-agnostic features d_f = 384 (ViT-S), rho = 0.02.
Features come from 27 clusters so that about one pair in 27 is a hidden positive.
On the CPU each case runs in a fresh process, whose peak resident memory above its inputs is
the case's peak; on CUDA, torch's peak allocation above the inputs. A case that runs out of
memory is reported as such.

    python bench/bench_hp_loss.py [--device cuda] [--quick] [--sizes 4096 8192] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
import lusscore.ops as ops  # noqa: E402
from lusscore.reference.hp_loss import hp_contrastive_loss as reference  # noqa: E402

D, D_F, RHO, TAU, LAM, CLUSTERS = 512, 384, 0.02, 0.1, 1.0, 27
CPU_SIZES, CUDA_SIZES, QUICK_SIZES = [4096, 8192, 16384], [50176], [512, 1024]


def hp_inputs(n: int, device, seed: int = 0):
    """Codes z (n, D) and features f (n, D_F), s = z detached, with HP-style thresholds: the
    best cosine similarity to a pool of 256 draws from the same clusters."""
    g = torch.Generator().manual_seed(seed)

    def clustered(rows, dim):
        centers = torch.randn(CLUSTERS, dim, generator=g)
        labels = torch.randint(0, CLUSTERS, (rows,), generator=g)
        return F.normalize(centers[labels] + 0.9 * torch.randn(rows, dim, generator=g), dim=1)

    z, f = clustered(n, D), clustered(n, D_F)
    pool_z, pool_f = clustered(256, D), clustered(256, D_F)
    phi_f, phi_s = (f @ pool_f.T).max(1).values, (z @ pool_z.T).max(1).values
    return [t.to(device) for t in (z, f, phi_f, z.clone(), phi_s)]


def all_pairs_loss(z, f, phi_f, s, phi_s, tau, rho, lam, seed):
    """The official code's way: every N x N similarity and mask at once, torch.rand sampling."""
    n = z.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    sim_f, sim_s = f @ f.T, s @ s.T
    ag = (sim_f > phi_f[:, None]) | (sim_f > phi_f[None])
    sp = (sim_s > phi_s[:, None]) | (sim_s > phi_s[None])
    weight_pairs = (ag.float() + lam * sp.float()).masked_fill(eye, 0)
    sampled = torch.rand(n, n, device=z.device, generator=torch.Generator(z.device).manual_seed(seed)) < rho
    denominator = ((weight_pairs > 0) | sampled) & ~eye
    logits = z @ z.T / tau
    lse = torch.logsumexp(logits.masked_fill(~denominator, float("-inf")), dim=1)
    weight = weight_pairs.sum(1)
    loss = lse - (weight_pairs * logits).sum(1) / weight.clamp_min(1e-30)
    return torch.where(weight > 0, loss, torch.zeros_like(loss)), weight


IMPLS = {"lusscore": ops.hp_contrastive_loss, "reference (chunked, masks)": reference,
         "all-pairs (official HP's way)": all_pairs_loss}


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def run_case(impl: str, n: int, device, repeat: int) -> dict:
    """Peak memory of the first forward + backward, then its median time."""
    device = torch.device(device)
    inputs = hp_inputs(n, device)
    z = inputs[0].requires_grad_(True)
    fn = IMPLS[impl]

    def fwd_bwd():
        z.grad = None
        loss, weight = fn(z, *inputs[1:], TAU, RHO, LAM, 0)
        loss.sum().backward()

    res = {"case": f"N={n} d={D} d_f={D_F} rho={RHO}", "impl": impl, "n": n}
    try:
        if device.type == "cuda":
            res["peak_bytes"] = common.peak_memory(fwd_bwd, device)
        else:
            base = rss_bytes()
            fwd_bwd()
            res["peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
        res["fwd+bwd"] = common.time_fn(fwd_bwd, device, warmup=0, repeat=repeat, min_time=0)
    except (torch.OutOfMemoryError, MemoryError) as exc:
        res["error"] = f"out of memory: {str(exc).splitlines()[0][:200]}"
    return res


def run_isolated(impl: str, n: int, device: str, repeat: int) -> dict:
    """run_case in a fresh process (the CPU's peak resident memory is per process)."""
    cmd = [sys.executable, __file__, "--one", impl, str(n), "--device", device,
           "--repeat", str(repeat)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        killed = done.returncode < 0 or done.returncode == 137
        why = "killed (out of memory)" if killed else done.stderr.strip().splitlines()[-1:]
        return {"case": f"N={n} d={D} d_f={D_F} rho={RHO}", "impl": impl, "n": n,
                "error": str(why)}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small N (a smoke run)")
    p.add_argument("--sizes", type=int, nargs="+", help="the N to run (default by device)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per case")
    p.add_argument("--skip-reference", action="store_true",
                   help="leave out the chunked reference (the slowest; large N on a CPU)")
    p.add_argument("--one", nargs=2, metavar=("IMPL", "N"), help=argparse.SUPPRESS)  # one case, in a child process
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_case(args.one[0], int(args.one[1]), args.device, args.repeat)))
        return
    device = torch.device(args.device)
    sizes = args.sizes or (QUICK_SIZES if args.quick else CUDA_SIZES if device.type == "cuda" else CPU_SIZES)
    results = []
    for n in sizes:
        rows = {}
        for impl in IMPLS:
            if args.skip_reference and impl.startswith("reference"):
                continue
            rows[impl] = (run_case(impl, n, device, args.repeat) if device.type == "cuda"
                          else run_isolated(impl, n, args.device, args.repeat))
            if device.type == "cuda":
                torch.cuda.empty_cache()
        ours = rows["lusscore"]
        for impl, r in rows.items():
            if "error" not in r and "error" not in ours:
                r["time_vs_ours"] = r["fwd+bwd"]["median_s"] / ours["fwd+bwd"]["median_s"]
                r["memory_vs_ours"] = r["peak_bytes"] / max(ours["peak_bytes"], 1)
            results.append(r)
            shown = r.get("error") or (f"{r['fwd+bwd']['median_s']:.3f} s, "
                                       f"peak {r['peak_bytes'] / 2**20:.0f} MiB")
            print(f"N={n} {impl}: {shown}", file=sys.stderr)
    common.write_results(args.json, "hp_loss", device, results)


if __name__ == "__main__":
    main()
