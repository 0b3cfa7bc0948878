"""k-means ops and driver: one Lloyd iteration (assign + update) against the plain-PyTorch
baseline (chunked matmul + argmax + index_add), torch.compile of its chunk step, faiss-cpu, and
the bound of the GEMM alone, all measured in the same run; plus a full 20-iteration fit.

  python bench/bench_kmeans.py [--device cuda] [--quick] [--json out.json]

Cases on CUDA: N=1,183,322 D=2048 K=919 (ImageNet-S image features) and N=58,000,000 D=128
K=919 (every 7x7 pixel of ImageNet-S), in fp32 (TF32 GEMMs) and bf16, and the 58M fit from
host memory (upload + 20 iterations). On CPU: N=1,183,322 D=128 K=919 against faiss-cpu with
the same threads.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]  # this checkout's lusscore, and bench/common.py
from common import parser, time_fn, write_results  # noqa: E402

import lusscore.ops as ops  # noqa: E402
from lusscore.cluster import KMeans  # noqa: E402
from lusscore.reference.kmeans import torch_baseline_step  # noqa: E402

try:
    import faiss
except ImportError:
    faiss = None

CHUNK = 65536


def make_data(n, d, k, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.empty(n, d, dtype=dtype, device=device)
    for a in range(0, n, 1 << 22):  # in pieces: no fp32 copy of the whole set
        b = min(n, a + (1 << 22))
        x[a:b] = torch.randn(b - a, d, generator=g, device=device).to(dtype)
    c = x[torch.randperm(n, generator=g, device=device)[:k]].float()
    return x, c


def ours_step(x, c):
    labels, _ = ops.kmeans_assign(x, c, "l2")
    return ops.kmeans_update(x, labels, c.shape[0])


def gemm_only(x, c, buf):
    cc = c.to(x.dtype)
    for a in range(0, x.shape[0], CHUNK):
        xc = x[a:a + CHUNK]
        out = buf[:xc.shape[0]]
        if x.dtype == torch.float32:
            torch.mm(xc, cc.T, out=out)
        else:
            out.copy_(xc @ cc.T)  # bf16 GEMM (a lower bound would skip this copy)


def _chunk_step(xc, c, half_norm):
    lab = ((xc @ c.T).float() - half_norm).argmax(1)
    sums = torch.zeros(c.shape[0], xc.shape[1], dtype=torch.float32, device=xc.device)
    return lab, sums.index_add_(0, lab, xc.float())


_compiled_chunk_step = torch.compile(_chunk_step, dynamic=False)


def compiled_step(x, c):
    cc = c.to(x.dtype)
    half_norm = 0.5 * (c ** 2).sum(1)
    sums = torch.zeros(c.shape[0], x.shape[1], device=x.device)
    for a in range(0, x.shape[0], CHUNK):  # one graph for the full chunks, one for the last
        _, s = _compiled_chunk_step(x[a:a + CHUNK], cc, half_norm)
        sums += s
    return sums


def case(results, name, x, c, device, repeat, with_compile=True):
    row = {"case": name, "n": x.shape[0], "d": x.shape[1], "k": c.shape[0], "dtype": str(x.dtype)}
    row["ours_s"] = time_fn(lambda: ours_step(x, c), device, warmup=1, repeat=repeat, min_time=0)["median_s"]
    row["torch_baseline_s"] = time_fn(lambda: torch_baseline_step(x, c, CHUNK), device, warmup=1,
                                      repeat=repeat, min_time=0)["median_s"]
    if with_compile:
        try:
            row["torch_compile_s"] = time_fn(lambda: compiled_step(x, c), device, warmup=2, repeat=repeat,
                                             min_time=0)["median_s"]
        except Exception as e:  # a compile failure is reported, not fatal
            row["torch_compile_error"] = str(e).splitlines()[0][:200]
    buf = torch.empty(min(CHUNK, x.shape[0]), c.shape[0], dtype=torch.float32, device=device)
    row["gemm_bound_s"] = time_fn(lambda: gemm_only(x, c, buf), device, warmup=1, repeat=repeat,
                                  min_time=0)["median_s"]
    if device.type == "cpu" and faiss is not None and x.dtype == torch.float32:
        xn, cn = x.numpy(), c.numpy()

        def faiss_iter():
            km = faiss.Kmeans(x.shape[1], c.shape[0], niter=1, max_points_per_centroid=1 << 30)
            km.train(xn, init_centroids=cn)

        row["faiss_cpu_s"] = time_fn(faiss_iter, device, warmup=1, repeat=repeat, min_time=0)["median_s"]
        row["faiss_threads"] = faiss.omp_get_max_threads()
    row["ours_over_gemm_bound"] = row["ours_s"] / row["gemm_bound_s"]
    print(f"{name:40s} ours {row['ours_s'] * 1e3:9.2f} ms | torch {row['torch_baseline_s'] * 1e3:9.2f} ms"
          + (f" | compile {row['torch_compile_s'] * 1e3:9.2f} ms" if "torch_compile_s" in row else "")
          + f" | gemm bound {row['gemm_bound_s'] * 1e3:9.2f} ms"
          + (f" | faiss-cpu {row['faiss_cpu_s'] * 1e3:9.2f} ms" if "faiss_cpu_s" in row else ""),
          flush=True)
    results.append(row)


def fit_case(results, name, x, k, device, dtype, niter):
    t0 = time.perf_counter()
    km = KMeans(k, niter=niter, device=device, dtype=dtype, progress=False).fit(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    total = time.perf_counter() - t0
    row = {"case": name, "n": x.shape[0], "d": x.shape[1], "k": k, "niter": niter,
           "dtype": str(dtype or x.dtype), "fit_s": total, "final_objective": km.objective}
    print(f"{name:40s} fit {total:8.3f} s ({niter} iterations, labels pass included)", flush=True)
    results.append(row)


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    p.add_argument("--skip-fit", action="store_true", help="no full k-means runs")
    p.add_argument("--no-cpu", action="store_true", help="with --device cuda: skip the CPU case")
    args = p.parse_args()
    device = torch.device(args.device)
    results = []
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 bound the issue quotes is TF32
        sizes = [(20000, 256, 50), (200000, 32, 50)] if args.quick else \
            [(1_183_322, 2048, 919), (58_000_000, 128, 919)]
        for n, d, k in sizes:
            for dtype in (torch.float32, torch.bfloat16):
                x, c = make_data(n, d, k, dtype, device)
                case(results, f"N={n} D={d} K={k} {str(dtype)[6:]}", x, c, device,
                     repeat=3 if not args.quick else 5, with_compile=n * d <= 2 ** 31 or args.quick)
                del x, c
                torch.cuda.empty_cache()
        # The GEMM score buffer of kmeans_assign: smaller ones stay in L2 but mean smaller GEMMs.
        n, d, k = (200000, 32, 50) if args.quick else (58_000_000, 128, 919)
        x, c = make_data(n, d, k, torch.bfloat16, device)
        for mb in (16, 32, 64, 128, 256, 1024):
            os.environ["LUSSCORE_KMEANS_SCORE_MB"] = str(mb)
            t = time_fn(lambda: ops.kmeans_assign(x, c, "l2"), device, warmup=1, repeat=3, min_time=0)
            results.append({"case": f"assign N={n} D={d} K={k} bf16, score buffer {mb} MB",
                            "ours_assign_s": t["median_s"]})
            print(f"assign bf16 N={n} D={d} score buffer {mb:5d} MB: {t['median_s'] * 1e3:9.2f} ms",
                  flush=True)
        os.environ.pop("LUSSCORE_KMEANS_SCORE_MB")
        del x, c
        torch.cuda.empty_cache()
        if not args.skip_fit:
            x, _ = make_data(n, d, k, torch.float32, device)
            host = torch.empty(n, d, pin_memory=True)
            host.copy_(x)
            del x
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            x = host.to(device, non_blocking=True)
            torch.cuda.synchronize()
            upload = time.perf_counter() - t0
            results.append({"case": f"upload N={n} D={d} fp32 (pinned)", "upload_s": upload})
            print(f"upload {upload:.3f} s", flush=True)
            for dtype in (torch.float32, torch.bfloat16):
                xd = x if dtype == torch.float32 else x.to(dtype)
                fit_case(results, f"fit N={n} D={d} K={k} {str(dtype)[6:]}", xd, k, device, None, 20)
                del xd
            del x
            torch.cuda.empty_cache()
            fit_case(results, f"fit streamed from host N={n} D={d} K={k} bf16", host, k, device,
                     torch.bfloat16, 2)
            del host
        if not args.no_cpu:  # the CPU kernels against faiss-cpu on this machine's cores
            cpu = torch.device("cpu")
            n, d, k = (20000, 32, 50) if args.quick else (1_183_322, 128, 919)
            x, c = make_data(n, d, k, torch.float32, cpu)
            case(results, f"N={n} D={d} K={k} float32 cpu ({torch.get_num_threads()} threads)", x, c,
                 cpu, repeat=3, with_compile=False)
    else:
        n, d, k = (20000, 32, 50) if args.quick else (1_183_322, 128, 919)
        x, c = make_data(n, d, k, torch.float32, device)
        case(results, f"N={n} D={d} K={k} float32 cpu", x, c, device, repeat=3)
        if not args.skip_fit:
            fit_case(results, f"fit N={n} D={d} K={k} float32 cpu", x, k, device, None,
                     20 if args.quick else 3)
    write_results(args.json, "kmeans", device, results, quick=args.quick,
                  faiss=getattr(faiss, "__version__", None))


if __name__ == "__main__":
    main()
