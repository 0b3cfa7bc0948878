"""k-means ops and driver: one Lloyd iteration (assign + update) against the plain-PyTorch
baseline (chunked matmul + argmax + index_add), torch.compile of its chunk step, faiss-cpu, and
the bound of the GEMM alone, all measured in the same run; plus a full 20-iteration fit.

  python bench/bench_kmeans.py [--device cuda] [--quick] [--json out.json]

Cases on CUDA: N=1,183,322 D=2048 K=919 (ImageNet-S image features) and N=58,000,000 D=128
K=919 (every 7x7 pixel of ImageNet-S), in fp32 (TF32 GEMMs) and bf16, all on the GPU (58M x 128
fp32 is 30 GB). kmeans_assign is timed on its fused path (GEMM + arg-min in one kernel) and on
its buffered path (cuBLAS GEMMs into a score buffer, then a scan), against the baseline's
assignment (chunked matmul + argmax) and the GEMM bound: the same-size product alone, as plain
torch.mm over row chunks (the fastest of a few chunk sizes). Then 20-iteration fits of the 58M
set on the GPU (fp32, bf16) and from host memory (bf16, 2 iterations).
On CPU (--device cpu, or after the CUDA cases): N=100,000 D=128 K=919 against faiss-cpu on 1
and 2 threads, interleaved repeats in one process, medians; once per CPU micro-kernel this CPU
has (generic, avx2, avx512: LUSSCORE_KMEANS_CPU_KERNEL forces each), the kernel named per row.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]  # this checkout's lusscore, and bench/common.py
from common import parser, time_fn, write_results  # noqa: E402

import lusscore.ops as ops  # noqa: E402
from lusscore._build import load_extension  # noqa: E402
from lusscore.cluster import KMeans  # noqa: E402
from lusscore.reference.kmeans import torch_baseline_step  # noqa: E402

try:
    import faiss
except ImportError:
    faiss = None

CHUNK = 65536
GEMM_BOUND_CHUNKS = (16384, 65536, 262144)


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


def gemm_only(x, c, chunk):
    """The product x @ c.T alone, over row chunks into one reused output (fp32 for fp32 x,
    bf16 for bf16 x: what a plain torch.mm of that dtype writes)."""
    cc = c.to(x.dtype)
    out = torch.empty(min(chunk, x.shape[0]), c.shape[0], dtype=x.dtype, device=x.device)

    def run():
        for a in range(0, x.shape[0], chunk):
            xc = x[a:a + chunk]
            torch.mm(xc, cc.T, out=out[:xc.shape[0]])
    return run


def gemm_bound(x, c, device, repeat):
    """Fastest chunked torch.mm over GEMM_BOUND_CHUNKS (small chunks pay launch overheads,
    large ones write more output): the bound the issue quotes."""
    times = {}
    for chunk in GEMM_BOUND_CHUNKS:
        times[chunk] = time_fn(gemm_only(x, c, chunk), device, warmup=1, repeat=repeat, min_time=0)["median_s"]
    best = min(times, key=times.get)
    return times[best], best


def assign_on(path, x, c):
    """kmeans_assign forced onto one CUDA path ("fused" or "buffered")."""
    os.environ["LUSSCORE_KMEANS_ASSIGN"] = path
    try:
        return ops.kmeans_assign(x, c, "l2")
    finally:
        os.environ.pop("LUSSCORE_KMEANS_ASSIGN", None)


def torch_baseline_assign(x, c, chunk=CHUNK):
    """The baseline's assignment alone: chunked matmul in x's dtype, then argmax."""
    cc = c.to(x.dtype)
    half_norm = 0.5 * (c.float() ** 2).sum(1)
    labels = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    for a in range(0, x.shape[0], chunk):
        labels[a:a + chunk] = ((x[a:a + chunk] @ cc.T).float() - half_norm).argmax(1)
    return labels


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
    timed = lambda fn, warmup=1: time_fn(fn, device, warmup=warmup, repeat=repeat, min_time=0)["median_s"]
    row["ours_step_s"] = timed(lambda: ours_step(x, c))
    row["ours_assign_fused_s"] = timed(lambda: assign_on("fused", x, c))
    row["ours_assign_buffered_s"] = timed(lambda: assign_on("buffered", x, c))
    row["torch_baseline_step_s"] = timed(lambda: torch_baseline_step(x, c, CHUNK))
    row["torch_baseline_assign_s"] = timed(lambda: torch_baseline_assign(x, c))
    if with_compile:
        try:
            row["torch_compile_step_s"] = timed(lambda: compiled_step(x, c), warmup=2)
        except Exception as e:  # a compile failure is reported, not fatal
            row["torch_compile_error"] = str(e).splitlines()[0][:200]
    row["gemm_bound_s"], row["gemm_bound_chunk_rows"] = gemm_bound(x, c, device, repeat)
    row["fused_over_gemm_bound"] = row["ours_assign_fused_s"] / row["gemm_bound_s"]
    row["buffered_over_gemm_bound"] = row["ours_assign_buffered_s"] / row["gemm_bound_s"]
    print(f"{name:34s} assign: fused {row['ours_assign_fused_s'] * 1e3:9.2f} ms"
          f" | buffered {row['ours_assign_buffered_s'] * 1e3:9.2f} ms"
          f" | torch {row['torch_baseline_assign_s'] * 1e3:9.2f} ms"
          f" | gemm bound {row['gemm_bound_s'] * 1e3:9.2f} ms"
          f" (fused {row['fused_over_gemm_bound']:.2f}x)"
          f" || step: ours {row['ours_step_s'] * 1e3:9.2f} ms | torch {row['torch_baseline_step_s'] * 1e3:9.2f} ms"
          + (f" | compile {row['torch_compile_step_s'] * 1e3:9.2f} ms" if "torch_compile_step_s" in row else ""),
          flush=True)
    results.append(row)


def cpu_kernels() -> list[str]:
    """The CPU micro-kernels kmeans_assign can run here, narrowest first."""
    kernels = []
    for name in ("generic", "avx2", "avx512"):
        os.environ["LUSSCORE_KMEANS_CPU_KERNEL"] = name
        try:
            kernels.append(load_extension().kmeans_cpu_kernel())
        except RuntimeError:  # this CPU lacks it
            pass
        finally:
            os.environ.pop("LUSSCORE_KMEANS_CPU_KERNEL")
    return kernels


def cpu_vs_faiss(results, n, d, k, threads, repeat, kernels):
    """CPU assignment and one Lloyd step against faiss-cpu on the same number of threads, for
    each micro-kernel in `kernels`: the implementations alternate within each repeat (the
    machine may be shared), medians."""
    for kernel in kernels:
        os.environ["LUSSCORE_KMEANS_CPU_KERNEL"] = kernel
        try:
            cpu_vs_faiss_one_kernel(results, n, d, k, threads, repeat, kernel)
        finally:
            os.environ.pop("LUSSCORE_KMEANS_CPU_KERNEL")


def cpu_vs_faiss_one_kernel(results, n, d, k, threads, repeat, kernel):
    x, c = make_data(n, d, k, torch.float32, torch.device("cpu"))
    xn, cn = x.numpy(), c.numpy()

    def faiss_assign():
        index = faiss.IndexFlatL2(d)
        index.add(cn)
        index.search(xn, 1)

    def faiss_iter():
        km = faiss.Kmeans(d, k, niter=1, max_points_per_centroid=1 << 30)
        km.train(xn, init_centroids=cn)

    impls = {"ours_assign_s": lambda: ops.kmeans_assign(x, c, "l2"), "ours_step_s": lambda: ours_step(x, c),
             "torch_baseline_step_s": lambda: torch_baseline_step(x, c, CHUNK)}
    if faiss is not None:
        impls.update(faiss_assign_s=faiss_assign, faiss_iter_s=faiss_iter)
    old = torch.get_num_threads()
    for t in threads:
        torch.set_num_threads(t)
        if faiss is not None:
            faiss.omp_set_num_threads(t)
        times = {name: [] for name in impls}
        for fn in impls.values():  # warm-up
            fn()
        for _ in range(repeat):
            for name, fn in impls.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        row = {"case": f"cpu N={n} D={d} K={k} float32, {t} thread(s), {kernel} kernel", "n": n, "d": d,
               "k": k, "threads": t, "kernel": kernel, "repeats": repeat}
        row.update({name: statistics.median(v) for name, v in times.items()})
        line = f"{row['case']:58s} ours assign {row['ours_assign_s'] * 1e3:8.1f} ms, step {row['ours_step_s'] * 1e3:8.1f} ms"
        if faiss is not None:
            row["assign_ratio_ours_over_faiss"] = row["ours_assign_s"] / row["faiss_assign_s"]
            row["step_ratio_ours_over_faiss_iter"] = row["ours_step_s"] / row["faiss_iter_s"]
            line += (f" | faiss search {row['faiss_assign_s'] * 1e3:8.1f} ms, 1 iteration {row['faiss_iter_s'] * 1e3:8.1f} ms"
                     f" | ratios {row['assign_ratio_ours_over_faiss']:.2f}x, {row['step_ratio_ours_over_faiss_iter']:.2f}x")
        print(line, flush=True)
        results.append(row)
    torch.set_num_threads(old)


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
    p.add_argument("--cpu-repeat", type=int, default=7, help="interleaved repeats of the CPU case")
    p.add_argument("--cpu-kernels", choices=("all", "default"), default="all",
                   help="the CPU case for every micro-kernel this CPU has (all), or only the one "
                        "kmeans_assign picks by default")
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
        # The buffered path's score buffer: smaller ones stay in L2 but mean smaller GEMMs.
        n, d, k = (200000, 32, 50) if args.quick else (58_000_000, 128, 919)
        x, c = make_data(n, d, k, torch.bfloat16, device)
        for mb in (32, 256, 1024):
            os.environ["LUSSCORE_KMEANS_SCORE_MB"] = str(mb)
            t = time_fn(lambda: assign_on("buffered", x, c), device, warmup=1, repeat=3, min_time=0)
            results.append({"case": f"buffered assign N={n} D={d} K={k} bf16, score buffer {mb} MB",
                            "ours_assign_buffered_s": t["median_s"]})
            print(f"buffered assign bf16 N={n} D={d} score buffer {mb:5d} MB: {t['median_s'] * 1e3:9.2f} ms",
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
    if device.type == "cpu" or not args.no_cpu:  # the CPU kernels against faiss-cpu
        n, d, k = (20000, 32, 50) if args.quick else (100_000, 128, 919)
        kernels = cpu_kernels()
        print(f"CPU micro-kernels: {', '.join(kernels)} (default: {load_extension().kmeans_cpu_kernel()})",
              flush=True)
        if args.cpu_kernels == "default":
            kernels = [load_extension().kmeans_cpu_kernel()]
        cpu_vs_faiss(results, n, d, k, threads=(1, 2), repeat=3 if args.quick else args.cpu_repeat,
                     kernels=kernels)
        if device.type == "cpu" and not args.skip_fit:
            x, _ = make_data(n, d, k, torch.float32, device)
            fit_case(results, f"fit N={n} D={d} K={k} float32 cpu", x, k, device, None,
                     20 if args.quick else 3)
    write_results(args.json, "kmeans", device, results, quick=args.quick,
                  faiss=getattr(faiss, "__version__", None))


if __name__ == "__main__":
    main()
