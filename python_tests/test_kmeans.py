"""kmeans_assign / kmeans_update against a float64 brute force, on every device; the
lusscore.cluster.KMeans driver (faiss semantics, determinism, distributed, errors)."""
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lusscore.ops as ops
from conftest import requires_cuda
from lusscore.cluster import KMeans, l2_normalize, pca_whiten, preprocess_features
from lusscore.reference import kmeans as ref
from lusscore.utils import LusscoreError
from samples import kmeans_blobs, kmeans_points

try:
    import faiss
except ImportError:
    faiss = None


def check_assign(x, c, metric, labels, values, gap_rtol=1e-9, vtol=1e-5):
    """Labels equal the float64 brute force wherever the best/second-best gap is above float64
    rounding (the kernels re-score near-ties exactly in double); values equal the brute-force
    value up to the output's fp32 rounding."""
    rl, rv = ref.kmeans_assign(x.cpu(), c.cpu(), metric)
    gap = ref.kmeans_assign_gap(x.cpu(), c.cpu(), metric)
    xs = x.cpu().double().norm(dim=1) if len(x) else torch.zeros(0, dtype=torch.float64)
    cs = c.cpu().double().norm(dim=1).max()
    scale = (xs + cs) ** 2 + 1e-30
    clear = gap > gap_rtol * scale
    assert labels.dtype == torch.int64 and labels.shape == (len(x),)
    assert torch.equal(labels.cpu()[clear], rl[clear])
    assert ((labels >= 0) & (labels < len(c))).all()
    atol = vtol * float(scale.max() if len(x) else 1)
    assert torch.allclose(values.cpu().double(), rv, rtol=vtol, atol=atol)


# ------------------------------------------------------------------------------ kmeans_assign

@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_assign_matches_brute_force(device, metric, dtype):
    if device.type == "cuda" and dtype == torch.float64:
        pytest.skip("CUDA kernels take fp32/bf16/fp16")
    x = kmeans_points(700, 37, dtype=dtype, seed=1, device=device)
    c = kmeans_points(45, 37, seed=2, device=device)
    labels, values = ops.kmeans_assign(x, c, metric)
    assert values.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # Low precision x is judged against the brute force on the rows as stored: near-ties are
    # re-scored exactly, so even bf16 GEMMs on CUDA give the float64 labels.
    check_assign(x, c, metric, labels, values)
    rl, _ = ref.kmeans_assign(x.cpu(), c.cpu(), metric)
    assert torch.equal(labels.cpu(), rl)


def test_assign_many_tiles(device):
    """More centroids than one tile (CPU 1024) and more rows than one row tile."""
    x = kmeans_points(5000, 6, seed=3, device=device)
    c = kmeans_points(1500, 6, seed=4, device=device)
    for metric in ("l2", "ip"):
        labels, values = ops.kmeans_assign(x, c, metric)
        check_assign(x, c, metric, labels, values)


def test_assign_ties_go_to_lowest_index(device):
    base = kmeans_points(7, 9, seed=5, device=device)
    c = torch.cat([base, base, base])  # each centroid three times: 0..6, 7..13, 14..20
    x = torch.cat([kmeans_points(300, 9, seed=6, device=device), base, base])
    for metric in ("l2", "ip"):
        labels, _ = ops.kmeans_assign(x, c, metric)
        assert (labels < 7).all()
        rl, _ = ref.kmeans_assign(x.cpu(), base.cpu(), metric)
        gap = ref.kmeans_assign_gap(x.cpu(), base.cpu(), metric)
        assert torch.equal(labels.cpu()[gap > 1e-3], rl[gap > 1e-3])
    # A duplicate across centroid tiles (index 3 and 1500), and all-equal centroids.
    far = kmeans_points(1600, 4, seed=7, device=device) + 100
    far[1500] = far[3] = 0
    x0 = kmeans_points(50, 4, seed=8, device=device) * 0.01
    assert (ops.kmeans_assign(x0, far, "l2")[0] == 3).all()
    same = torch.ones(5, 4, device=device)
    for metric in ("l2", "ip"):
        assert (ops.kmeans_assign(x0, same, metric)[0] == 0).all()
    # Points exactly on centroids: distance 0, their own centroid.
    labels, values = ops.kmeans_assign(base, base, "l2")
    assert torch.equal(labels.cpu(), torch.arange(7)) and (values.abs() < 1e-4).all()


def test_assign_shapes_k1_kn_d1_noncontiguous_empty(device):
    x = kmeans_points(64, 5, seed=9, device=device)
    labels, values = ops.kmeans_assign(x, x[:1], "l2")  # K = 1
    assert (labels == 0).all()
    check_assign(x, x[:1], "l2", labels, values)
    labels, values = ops.kmeans_assign(x, x, "l2")  # K = N
    assert torch.equal(labels.cpu(), torch.arange(64))
    x1, c1 = kmeans_points(200, 1, seed=10, device=device), kmeans_points(13, 1, seed=11, device=device)
    check_assign(x1, c1, "l2", *ops.kmeans_assign(x1, c1, "l2"))  # D = 1
    xt = kmeans_points(11, 300, seed=12, device=device).T  # (300, 11), non-contiguous
    ct = kmeans_points(11, 20, seed=13, device=device).T[::2]  # (10, 11), strided rows
    assert not xt.is_contiguous() and not ct.is_contiguous()
    for metric in ("l2", "ip"):
        check_assign(xt, ct, metric, *ops.kmeans_assign(xt, ct, metric))
    labels, values = ops.kmeans_assign(x[:0], x[:3], "l2")
    assert labels.shape == (0,) and values.shape == (0,) and labels.dtype == torch.int64


def test_assign_errors(device):
    x, c = kmeans_points(8, 4, device=device), kmeans_points(3, 4, device=device)
    with pytest.raises(RuntimeError, match="metric"):
        ops.kmeans_assign(x, c, "cosine")
    with pytest.raises(RuntimeError, match="same number of columns"):
        ops.kmeans_assign(x, c[:, :3], "l2")
    with pytest.raises(RuntimeError, match="x must have dtype"):
        ops.kmeans_assign(x.int(), c, "l2")
    with pytest.raises(RuntimeError, match="centroids must have 2 dimensions"):
        ops.kmeans_assign(x, c[0], "l2")
    with pytest.raises(RuntimeError, match="at least one row"):
        ops.kmeans_assign(x, c[:0], "l2")
    if device.type == "cuda":
        with pytest.raises(RuntimeError, match="same device"):
            ops.kmeans_assign(x, c.cpu(), "l2")


# ------------------------------------------------------------------------------ kmeans_update

def test_update_exact(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-50, 50, (3000, 19), generator=g).float().to(device)  # exact sums
    labels = torch.randint(0, 23, (3000,), generator=g).to(device)
    labels[labels == 5] = 6  # cluster 5 empty
    sums, counts = ops.kmeans_update(x, labels, 23)
    rs, rc = ref.kmeans_update(x, labels, 23)
    assert sums.dtype == torch.float32 and counts.dtype == torch.int64
    assert torch.equal(sums, rs) and torch.equal(counts, rc)
    assert counts[5] == 0 and (sums[5] == 0).all()
    xr = kmeans_points(5000, 33, seed=1, device=device)  # random values, > one segment per cluster
    lr = torch.randint(0, 3, (5000,), generator=g).to(device)
    sums, counts = ops.kmeans_update(xr, lr, 3)
    rs, rc = ref.kmeans_update(xr, lr, 3)
    assert torch.allclose(sums, rs, rtol=1e-6, atol=1e-5) and torch.equal(counts, rc)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_update_dtypes(device, dtype):
    if device.type == "cuda" and dtype == torch.float64:
        pytest.skip("CUDA kernels take fp32/bf16/fp16")
    x = kmeans_points(500, 8, dtype=dtype, seed=2, device=device)
    labels = torch.arange(500, device=device) % 7
    sums, counts = ops.kmeans_update(x, labels, 7)
    rs, rc = ref.kmeans_update(x, labels, 7)
    assert sums.dtype == rs.dtype
    assert torch.allclose(sums.double(), rs.double(), rtol=1e-6, atol=1e-5) and torch.equal(counts, rc)


def test_update_noncontiguous_empty_and_deterministic(device):
    x = kmeans_points(40, 600, seed=3, device=device).T  # (600, 40) non-contiguous
    labels = (torch.arange(600, device=device) * 7) % 5
    sums, counts = ops.kmeans_update(x, labels, 5)
    rs, rc = ref.kmeans_update(x, labels, 5)
    assert torch.allclose(sums, rs, rtol=1e-6, atol=1e-5) and torch.equal(counts, rc)
    again = ops.kmeans_update(x.contiguous(), labels, 5)
    assert torch.equal(again[0], sums) and torch.equal(again[1], counts)
    sums, counts = ops.kmeans_update(x[:0], labels[:0], 4)
    assert sums.shape == (4, 40) and (sums == 0).all() and (counts == 0).all()


def test_update_errors(device):
    x = kmeans_points(6, 3, device=device)
    labels = torch.tensor([0, 1, 2, 0, 1, 2], device=device)
    with pytest.raises(RuntimeError, match=r"labels must lie in \[0, k\)"):
        ops.kmeans_update(x, labels, 2)
    with pytest.raises(RuntimeError, match=r"labels must lie in \[0, k\)"):
        ops.kmeans_update(x, labels - 1, 3)
    with pytest.raises(RuntimeError, match="one entry per row"):
        ops.kmeans_update(x, labels[:5], 3)
    with pytest.raises(RuntimeError, match="labels must have dtype"):
        ops.kmeans_update(x, labels.int(), 3)
    with pytest.raises(RuntimeError, match="k .* must be >= 1"):
        ops.kmeans_update(x, labels, 0)
    with pytest.raises(RuntimeError, match="x must have dtype"):
        ops.kmeans_update(x.long(), labels, 3)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tf32", [False, True])
def test_cpu_cuda_parity(dtype, tf32):
    """Both devices re-score near-ties with the same canonical double arithmetic: identical
    labels and values whatever the GEMM precision; update sums are bit-identical."""
    x = kmeans_points(20000, 64, dtype=dtype, seed=4)
    c = kmeans_points(919, 64, seed=5)
    c[700] = c[3]  # an exact duplicate: both must pick 3
    x[:10] = c[3].to(dtype)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        for metric in ("l2", "ip"):
            lc, vc = ops.kmeans_assign(x, c, metric)
            lg, vg = ops.kmeans_assign(x.cuda(), c.cuda(), metric)
            assert torch.equal(lc, lg.cpu()) and torch.equal(vc, vg.cpu())
            assert not (lg == 700).any()
        # More centroids than one CUDA tile (8192).
        cbig = kmeans_points(9000, 64, seed=6)
        lc, vc = ops.kmeans_assign(x[:3000], cbig, "l2")
        lg, vg = ops.kmeans_assign(x[:3000].cuda(), cbig.cuda(), "l2")
        assert torch.equal(lc, lg.cpu()) and torch.equal(vc, vg.cpu())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    labels = torch.randint(0, 919, (20000,), generator=torch.Generator().manual_seed(0))
    sc, nc = ops.kmeans_update(x, labels, 919)
    sg, ng = ops.kmeans_update(x.cuda(), labels.cuda(), 919)
    assert torch.equal(sc, sg.cpu()) and torch.equal(nc, ng.cpu())  # same order, bit-identical


# Shapes of the fused CUDA kernel's edge cases: (N, D, K). Its tiles are 128 rows x 128
# centroids x 128 bytes of D (32 fp32 or 64 bf16/fp16 values); D * itemsize % 16 != 0 takes the
# element-wise copy path, the rest cp.async.
FUSED_SHAPES = [
    (1, 1, 1),        # one row, D = 1, K = 1
    (300, 1, 13),     # D = 1
    (257, 37, 1),     # K = 1, N and D tails
    (200, 19, 200),   # K = N (x = centroids below)
    (1000, 33, 129),  # odd D, K one past a tile
    (1031, 128, 919), # the D and K; N, K tails
    (513, 200, 300),  # D over several chunks with a tail
    (130, 2056, 7),   # large D
    (129, 40, 257),
]


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_fused_cuda_assign(monkeypatch, dtype, metric):
    """The fused GEMM + arg-min kernel (forced on) on every tail: labels equal the float64 brute
    force on the rows as stored, and labels and values equal the CPU kernel's and the buffered
    CUDA path's bit for bit."""
    for n, d, k in FUSED_SHAPES:
        x = kmeans_points(n, d, dtype=dtype, seed=n + d)
        c = x[:k].float().clone() if k == n else kmeans_points(k, d, seed=k + 1)
        monkeypatch.setenv("LUSSCORE_KMEANS_ASSIGN", "fused")
        lg, vg = ops.kmeans_assign(x.cuda(), c.cuda(), metric)
        monkeypatch.setenv("LUSSCORE_KMEANS_ASSIGN", "buffered")
        lb, vb = ops.kmeans_assign(x.cuda(), c.cuda(), metric)
        lc, vc = ops.kmeans_assign(x, c, metric)
        rl, _ = ref.kmeans_assign(x, c, metric)
        check_assign(x, c, metric, lg, vg)
        assert torch.equal(lg.cpu(), rl), (n, d, k)
        assert torch.equal(lg.cpu(), lc) and torch.equal(vg.cpu(), vc), (n, d, k)
        assert torch.equal(lg, lb) and torch.equal(vg, vb), (n, d, k)
        if k == n and metric == "l2":
            assert torch.equal(lg.cpu(), torch.arange(n))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_cuda_ties_and_flagged_rows(monkeypatch, dtype):
    """Exact duplicates (in one tile, across tiles, across the two warps of a tile) make rows
    whose best and second-best fast scores tie: those are flagged, their candidates collected
    and re-scored exactly, lowest index first. 300 equal centroids overflow the candidate list
    (16): the buffered path resolves those rows. Misaligned rows take the element-wise copy
    path."""
    monkeypatch.setenv("LUSSCORE_KMEANS_ASSIGN", "fused")
    c = kmeans_points(919, 64, seed=21)
    for dup, orig in ((700, 3), (130, 5), (64, 6), (200, 199)):
        c[dup] = c[orig]
    x = torch.cat([kmeans_points(3000, 64, seed=22), c[[3, 5, 6, 199, 700, 130, 64, 200]]]).to(dtype)
    for metric in ("l2", "ip"):
        lg, vg = ops.kmeans_assign(x.cuda(), c.cuda(), metric)
        lc, vc = ops.kmeans_assign(x, c, metric)
        assert torch.equal(lg.cpu(), lc) and torch.equal(vg.cpu(), vc)
        for dup in (700, 130, 64, 200):
            assert not (lg == dup).any()
        rl, _ = ref.kmeans_assign(x, c, metric)
        gap = ref.kmeans_assign_gap(x, c, metric)
        clear = gap > 1e-9 * (x.double().norm(dim=1) + c.double().norm(dim=1).max()) ** 2
        assert torch.equal(lg.cpu()[clear], rl[clear])
        if dtype == torch.float32 and metric == "l2":  # rows on a centroid: its first copy
            assert lg[-8:].tolist() == [3, 5, 6, 199, 3, 5, 6, 199]
    same = torch.ones(300, 16, device="cuda")  # all centroids equal: every row flagged, label 0
    x0 = kmeans_points(500, 16, dtype=dtype, seed=23, device="cuda")
    for metric in ("l2", "ip"):
        assert (ops.kmeans_assign(x0, same, metric)[0] == 0).all()
    # Contiguous rows at a 4-byte offset: not 16-byte aligned, so no cp.async.
    flat = kmeans_points(1, 700 * 128 + 1, dtype=dtype, seed=24).flatten().cuda()
    xm = flat[1:].view(700, 128)
    cm = kmeans_points(919, 128, seed=25)
    assert xm.data_ptr() % 16 != 0
    lg, vg = ops.kmeans_assign(xm, cm.cuda(), "l2")
    lc, vc = ops.kmeans_assign(xm.cpu(), cm, "l2")
    assert torch.equal(lg.cpu(), lc) and torch.equal(vg.cpu(), vc)


@requires_cuda
def test_fused_cuda_is_the_default_for_large_n(monkeypatch):
    """Enough rows to fill the GPU take the fused path by default; it agrees with the forced
    buffered path and with the CPU."""
    monkeypatch.delenv("LUSSCORE_KMEANS_ASSIGN", raising=False)
    x = kmeans_points(200_000, 32, dtype=torch.bfloat16, seed=26)
    c = kmeans_points(300, 32, seed=27)
    lg, vg = ops.kmeans_assign(x.cuda(), c.cuda(), "l2")
    monkeypatch.setenv("LUSSCORE_KMEANS_ASSIGN", "buffered")
    lb, vb = ops.kmeans_assign(x.cuda(), c.cuda(), "l2")
    assert torch.equal(lg, lb) and torch.equal(vg, vb)
    lc, vc = ops.kmeans_assign(x, c, "l2")
    assert torch.equal(lg.cpu(), lc) and torch.equal(vg.cpu(), vc)


CPU_KERNELS = ("generic", "avx2", "avx512")  # narrowest first


@pytest.mark.parametrize("kernel", CPU_KERNELS)
def test_assign_cpu_micro_kernels(monkeypatch, kernel):
    """Each CPU micro-kernel (LUSSCORE_KMEANS_CPU_KERNEL forces one; it is read at every call)
    gives the reference's labels and values, exact ties and all-equal centroids included; one
    this CPU lacks is an error naming it."""
    from lusscore._build import load_extension
    kernel_now = load_extension().kmeans_cpu_kernel
    monkeypatch.delenv("LUSSCORE_KMEANS_CPU_KERNEL", raising=False)
    widest = kernel_now()
    monkeypatch.setenv("LUSSCORE_KMEANS_CPU_KERNEL", kernel)
    if CPU_KERNELS.index(kernel) > CPU_KERNELS.index(widest):
        with pytest.raises(RuntimeError, match=f"LUSSCORE_KMEANS_CPU_KERNEL={kernel}"):
            ops.kmeans_assign(kmeans_points(8, 4), kmeans_points(3, 4, seed=1))
        return
    assert kernel_now() == kernel
    base = kmeans_points(40, 128, seed=9)
    cases = [(kmeans_points(701, 37, seed=1), kmeans_points(45, 37, seed=2)),
             (kmeans_points(50, 1, seed=3), kmeans_points(3, 1, seed=4)),
             (kmeans_points(1013, 128, seed=5), kmeans_points(919, 128, seed=6)),
             # each centroid three times, and rows exactly on them: ties across panels
             (torch.cat([kmeans_points(300, 128, seed=7), base]), torch.cat([base, base, base])),
             (kmeans_points(30, 20, seed=8), torch.ones(77, 20))]  # every centroid a candidate
    for x, c in cases:
        for dtype in (torch.float32, torch.bfloat16):
            for metric in ("l2", "ip"):
                labels, values = ops.kmeans_assign(x.to(dtype), c, metric)
                rl, rv = ref.kmeans_assign(x.to(dtype), c, metric)
                assert torch.equal(labels, rl), (x.shape, c.shape, dtype, metric)
                assert torch.allclose(values.double(), rv, rtol=1e-5, atol=1e-4)


def test_cpu_kernel_choice_errors(monkeypatch):
    monkeypatch.setenv("LUSSCORE_KMEANS_CPU_KERNEL", "sse9")
    with pytest.raises(RuntimeError, match="must be avx512, avx2 or generic, got 'sse9'"):
        ops.kmeans_assign(kmeans_points(8, 4), kmeans_points(3, 4, seed=1))


def test_assign_large_d_blas_path():
    """D above the CPU micro-kernel's limit (1024) goes through the BLAS tiles: same answers."""
    x = kmeans_points(60, 1100, seed=28)
    c = kmeans_points(9, 1100, seed=29)
    for metric in ("l2", "ip"):
        labels, values = ops.kmeans_assign(x, c, metric)
        check_assign(x, c, metric, labels, values)


def test_opcheck(device):
    x, c = kmeans_points(30, 5, device=device), kmeans_points(4, 5, seed=1, device=device)
    torch.library.opcheck(torch.ops.lusscore.kmeans_assign.default, (x, c, "l2"))
    torch.library.opcheck(torch.ops.lusscore.kmeans_assign.default, (x, c, "ip"))
    labels = torch.arange(30, device=device) % 4
    torch.library.opcheck(torch.ops.lusscore.kmeans_update.default, (x, labels, 4))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiles(device, backend):
    """aot_eager traces through the fake kernels; inductor also generates code around them."""
    def step(x, c):
        labels, _ = ops.kmeans_assign(x, c, "l2")
        sums, counts = ops.kmeans_update(x, labels, c.shape[0])
        return sums / counts.clamp_min(1)[:, None]

    x, c = kmeans_points(100, 6, device=device), kmeans_points(5, 6, seed=1, device=device)
    torch._dynamo.reset()
    out = torch.compile(step, fullgraph=True, backend=backend)(x, c)
    torch.testing.assert_close(out, step(x, c), atol=1e-6, rtol=1e-6)



# ------------------------------------------------------------------------------ one contract, both devices
# Grid caps of the CUDA k-means kernels (csrc/common/cuda_utils.cuh capped_blocks and the
# warp-per-row launches): rows past one grid go round the kernels' grid-stride loops.

def _sms() -> int:
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def _warp_rows_per_grid() -> int:
    """argmin_tile_kernel and rescore_candidates_kernel: min(rows / 8, 16 SMs) blocks of 8 warps,
    one row per warp."""
    return _sms() * 16 * 8


def _capped_items_per_grid() -> int:
    """capped_blocks(n): at most 32 blocks of 256 threads per SM (labels_to_keys_kernel,
    cluster_sums_kernel)."""
    return _sms() * 32 * 256


def _cpu_equal(x, c, metric, lg, vg):
    lc, vc = ops.kmeans_assign(x.cpu(), c.cpu(), metric)
    assert torch.equal(lg.cpu(), lc) and torch.equal(vg.cpu(), vc)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_assign_float64_centroids_are_rounded_to_float32(device, dtype):
    """float64 centroids with fp32/bf16/fp16 rows: accepted on both devices and rounded to
    float32 (the compute type), so the answer is the float32 centroids' one bit for bit; the
    reference mode rounds them the same way."""
    x = kmeans_points(500, 37, dtype=dtype, seed=30, device=device)
    c64 = torch.randn(45, 37, dtype=torch.float64, generator=torch.Generator().manual_seed(31)).to(device)
    assert not torch.equal(c64, c64.float().double())  # the rounding matters
    for metric in ("l2", "ip"):
        labels, values = ops.kmeans_assign(x, c64, metric)
        l32, v32 = ops.kmeans_assign(x, c64.float(), metric)
        assert values.dtype == torch.float32
        assert torch.equal(labels, l32) and torch.equal(values, v32)
        check_assign(x, c64.float(), metric, labels, values)
        ops.set_ops_mode("reference")
        try:
            lr, vr = ops.kmeans_assign(x, c64, metric)
            lr32, vr32 = ops.kmeans_assign(x, c64.float(), metric)
        finally:
            ops.set_ops_mode("fused")
        assert torch.equal(lr, lr32) and torch.equal(vr, vr32)
    if device.type == "cuda":  # float64 rows stay CPU-only, with an error saying so
        with pytest.raises(RuntimeError, match="x must have dtype .* on CUDA, got Double .*CPU only"):
            ops.kmeans_assign(x.double(), c64, "l2")
        with pytest.raises(RuntimeError, match="x must have dtype .* on CUDA, got Double .*CPU only"):
            ops.kmeans_update(x.double(), torch.zeros(500, dtype=torch.int64, device=device), 2)


def _past_fp16_range(device, top=1e5):
    """fp16 rows and fp32 centroids with entries past fp16's range (65504): rows 0..9 sit at
    65000 in column 0, nearest (l2) to centroid 9 whose column 0 is `top`."""
    x = (kmeans_points(600, 24, seed=40) * 100).half()
    c = kmeans_points(40, 24, seed=41) * 100
    c[9, 0] = top
    if top > 65520:
        c[5] *= 1000  # entries ~1e5 everywhere
        c[11, 3] = -70000.0
    near = c[9].repeat(10, 1) + kmeans_points(10, 24, seed=42)
    near[:, 0] = 65000.0
    x[:10] = near.half()
    assert torch.isfinite(x).all()
    return x.to(device), c.to(device)


@pytest.mark.parametrize("top", [1e5, 65520.0])
def test_assign_fp16_rows_centroids_past_fp16_range(device, top):
    """Centroids past fp16's range with fp16 rows: finite values and the float64 brute force's
    labels on every device (65520 is the smallest value that rounds to inf in fp16)."""
    x, c = _past_fp16_range(device, top)
    assert torch.isinf(c.half()).any()
    for metric in ("l2", "ip"):
        labels, values = ops.kmeans_assign(x, c, metric)
        assert torch.isfinite(values).all()
        check_assign(x, c, metric, labels, values)
        if metric == "l2":
            assert (labels[:10] == 9).all()


@requires_cuda
@pytest.mark.parametrize("path", ["fused", "buffered"])
def test_cuda_fp16_rows_centroids_past_fp16_range_match_cpu(monkeypatch, path):
    """Both CUDA paths fall back to fp32 (rows widened in chunks of 2^26 elements) for fp16 rows
    against centroids past fp16's range, and equal the CPU bit for bit; 2100 rows of D = 2^16
    take three chunks."""
    monkeypatch.setenv("LUSSCORE_KMEANS_ASSIGN", path)
    for top in (1e5, 65520.0):
        x, c = _past_fp16_range("cuda", top)
        for metric in ("l2", "ip"):
            lg, vg = ops.kmeans_assign(x, c, metric)
            _cpu_equal(x, c, metric, lg, vg)
            rl, _ = ref.kmeans_assign(x.cpu(), c.cpu(), metric)
            assert torch.equal(lg.cpu(), rl)
    x = (kmeans_points(2100, 1 << 16, seed=43) * 100).half()
    c = kmeans_points(4, 1 << 16, seed=44) * 100
    c[2, 0] = 1e5
    x[:5, 0] = 65000.0
    lg, vg = ops.kmeans_assign(x.cuda(), c.cuda(), "l2")
    assert (lg[:5] == 2).all()
    _cpu_equal(x, c, "l2", lg, vg)


def test_assign_update_d0(device, monkeypatch):
    """D = 0: every distance and similarity is 0, so label 0 and value 0 (the lowest index
    wins the tie); update sums are (K, 0) and counts still count."""
    x = torch.empty(300, 0, device=device)
    c = torch.empty(7, 0, device=device)
    paths = ["default", "buffered"] if device.type == "cuda" else ["default"]
    for path in paths:
        if path == "default":
            monkeypatch.delenv("LUSSCORE_KMEANS_ASSIGN", raising=False)
        else:
            monkeypatch.setenv("LUSSCORE_KMEANS_ASSIGN", path)
        for metric in ("l2", "ip"):
            labels, values = ops.kmeans_assign(x, c, metric)
            assert labels.shape == (300,) and (labels == 0).all()
            assert values.dtype == torch.float32 and (values == 0).all()
            _cpu_equal(x, c, metric, labels, values)
    if device.type == "cuda":
        monkeypatch.setenv("LUSSCORE_KMEANS_ASSIGN", "fused")
        with pytest.raises(RuntimeError, match=r"fused kernel cannot run here.*D >= 1 \(0\)"):
            ops.kmeans_assign(x, c, "l2")
    lab = torch.randint(0, 7, (300,), generator=torch.Generator().manual_seed(45)).to(device)
    sums, counts = ops.kmeans_update(x, lab, 7)
    assert sums.shape == (7, 0) and sums.dtype == torch.float32
    assert torch.equal(counts.cpu(), torch.bincount(lab.cpu(), minlength=7))


def test_update_k_limit(device):
    """k must fit the int32 sort keys; checked before any allocation."""
    x = kmeans_points(6, 3, device=device)
    with pytest.raises(RuntimeError, match=r"k \(the number of clusters\) must be < 2\^31"):
        ops.kmeans_update(x, torch.zeros(6, dtype=torch.int64, device=device), 2 ** 31)


@requires_cuda
def test_cuda_limits_are_checked_before_data_access(monkeypatch):
    """The CUDA limits, reached with stride-0 views (no memory behind them): the checks run
    before any copy. (The fused path's 2^31 blocks of 128 rows are not tested: the outputs of
    2^38 rows would have to be allocated first.)"""
    n = 2 ** 31
    x = torch.zeros(1, 1, device="cuda").expand(n, 1)
    labels = torch.zeros(1, dtype=torch.int64, device="cuda").expand(n)
    with pytest.raises(RuntimeError, match=r"at most 2\^31 - 1 rows per call, got 2147483648"):
        ops.kmeans_update(x, labels, 3)
    monkeypatch.setenv("LUSSCORE_KMEANS_ASSIGN", "fused")
    c = torch.zeros(1, 4, device="cuda").expand(2 ** 31 - 128, 4)
    with pytest.raises(RuntimeError, match=r"K < 2\^31 - 128 \(2147483520\)"):
        ops.kmeans_assign(kmeans_points(3, 4, device="cuda"), c, "l2", check_finite=False)


@requires_cuda
@pytest.mark.parametrize("path", ["fused", "buffered"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_assign_rows_past_one_grid(monkeypatch, path, dtype):
    """More than two grids of rows: every centroid is duplicated, so the fused scan flags every
    row and rescore_candidates_kernel loops; the buffered path's argmin_tile_kernel takes all
    rows in one launch and loops. Labels and values equal the CPU's; labels are the first
    copies."""
    monkeypatch.setenv("LUSSCORE_KMEANS_ASSIGN", path)
    n = 2 * _warp_rows_per_grid() + 123
    base = kmeans_points(50, 32, seed=46)
    c = torch.cat([base, base])
    x = kmeans_points(n, 32, dtype=dtype, seed=47)
    for metric in ("l2", "ip"):
        lg, vg = ops.kmeans_assign(x.cuda(), c.cuda(), metric)
        _cpu_equal(x, c, metric, lg, vg)
        assert (lg < 50).all()
        rl, _ = ref.kmeans_assign(x, base, metric)
        gap = ref.kmeans_assign_gap(x, base, metric)
        clear = gap > 1e-9 * (x.double().norm(dim=1) + base.double().norm(dim=1).max()) ** 2
        assert torch.equal(lg.cpu()[clear], rl[clear])


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_buffered_row_chunks_and_centroid_tiles(monkeypatch, dtype):
    """The buffered path with LUSSCORE_KMEANS_SCORE_MB=1 (its minimum): 2^18 scores, so rows go
    in chunks of max(1024, 2^18 / 8192) = 1024 (three for 3000 rows), each against two centroid
    tiles (8192 + 808), the running best carried across tiles. Equal to the CPU and to the
    default buffer; a duplicate across tiles goes to its first copy."""
    monkeypatch.setenv("LUSSCORE_KMEANS_ASSIGN", "buffered")
    c = kmeans_points(9000, 64, seed=48)
    c[8500] = c[5]
    x = kmeans_points(3000, 64, dtype=dtype, seed=49)
    x[:4] = c[5].to(dtype)
    x[2000:2004] = c[5].to(dtype)
    for metric in ("l2", "ip"):
        monkeypatch.setenv("LUSSCORE_KMEANS_SCORE_MB", "1")
        lg, vg = ops.kmeans_assign(x.cuda(), c.cuda(), metric)
        monkeypatch.delenv("LUSSCORE_KMEANS_SCORE_MB")
        lb, vb = ops.kmeans_assign(x.cuda(), c.cuda(), metric)
        assert torch.equal(lg, lb) and torch.equal(vg, vb)
        _cpu_equal(x, c, metric, lg, vg)
        assert not (lg == 8500).any()
        if metric == "l2" and dtype == torch.float32:
            assert (lg[:4] == 5).all() and (lg[2000:2004] == 5).all()


@requires_cuda
def test_cuda_fused_collect_passes_and_candidate_overflow(monkeypatch):
    """More flagged rows than one collect pass takes (2^22): every row ties between three
    copies of its centroid, so the fused path runs two collect passes. Rows on both sides of
    the pass boundary are near 17 copies of one point: more candidates than a list holds (16),
    so the buffered path resolves them, lowest index first (label 18)."""
    monkeypatch.setenv("LUSSCORE_KMEANS_ASSIGN", "fused")
    collect_rows = 1 << 22
    n = collect_rows + 3000
    base = kmeans_points(6, 8, seed=50) * 3
    p = torch.full((1, 8), 40.0)
    c = torch.cat([base, base, base, p.repeat(17, 1)])  # K = 35
    g = torch.Generator().manual_seed(51)
    ids = torch.randint(0, 6, (n,), generator=g)
    x = base[ids] + 0.3 * torch.randn(n, 8, generator=g)
    far = torch.cat([torch.arange(collect_rows - 500, collect_rows + 500), torch.arange(n - 700, n)])
    x[far] = p + 0.3 * torch.randn(len(far), 8, generator=g)
    x = x.to(torch.bfloat16)
    lg, vg = ops.kmeans_assign(x.cuda(), c.cuda(), "l2")
    _cpu_equal(x, c, "l2", lg, vg)
    lg = lg.cpu()
    assert (lg[far] == 18).all()
    near = torch.ones(n, dtype=torch.bool)
    near[far] = False
    assert (lg[near] < 6).all()
    sample = torch.nonzero(near)[:, 0][::200]
    rl, _ = ref.kmeans_assign(x[sample], base, "l2")
    gap = ref.kmeans_assign_gap(x[sample], base, "l2")
    assert torch.equal(lg[sample][gap > 1e-6], rl[gap > 1e-6])


@requires_cuda
def test_cuda_update_past_one_grid_and_grid_y():
    """kmeans_update past each launch's grid: more rows than labels_to_keys_kernel's grid, more
    sums than cluster_sums_kernel's, and D > 65535 x 128 columns (segment_sums_kernel's grid.y
    is capped at 65535 and loops over the rest). Bit-identical to the CPU, close to float64."""
    g = torch.Generator().manual_seed(52)
    cases = []
    n = _capped_items_per_grid() + 4321
    cases.append((kmeans_points(n, 3, seed=53), torch.randint(0, 5, (n,), generator=g), 5))
    k = 4096
    d = _capped_items_per_grid() // k + 7
    cases.append((kmeans_points(20000, d, seed=54), torch.randint(0, k, (20000,), generator=g), k))
    d = 65535 * 128 + 1000
    cases.append((kmeans_points(3, d, seed=55), torch.tensor([0, 1, 0]), 2))
    for x, labels, k in cases:
        sg, ng = ops.kmeans_update(x.cuda(), labels.cuda(), k)
        sc, nc = ops.kmeans_update(x, labels, k)
        assert torch.equal(sg.cpu(), sc) and torch.equal(ng.cpu(), nc)
        rs, rc = ref.kmeans_update(x, labels, k)
        assert torch.allclose(sc, rs, rtol=1e-6, atol=1e-5) and torch.equal(nc, rc)


@requires_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("path", ["fused", "buffered"])
def test_cuda_non_default_device(monkeypatch, path):
    """Tensors on cuda:1 while cuda:0 is current: outputs on cuda:1, equal to the CPU's (the
    kernels, their streams and the device properties follow the inputs' device)."""
    monkeypatch.setenv("LUSSCORE_KMEANS_ASSIGN", path)
    dev = torch.device("cuda:1")
    assert torch.cuda.current_device() == 0
    x, c = kmeans_points(3000, 40, seed=56), kmeans_points(100, 40, seed=57)
    c[70] = c[7]
    xh, ch = _past_fp16_range("cpu")
    for xx, cc in ((x, c), (x.to(torch.bfloat16), c), (xh, ch)):
        for metric in ("l2", "ip"):
            lg, vg = ops.kmeans_assign(xx.to(dev), cc.to(dev), metric)
            assert lg.device == dev and vg.device == dev
            _cpu_equal(xx, cc, metric, lg, vg)
    labels = torch.randint(0, 100, (3000,), generator=torch.Generator().manual_seed(58))
    sg, ng = ops.kmeans_update(x.to(dev), labels.to(dev), 100)
    assert sg.device == dev and ng.device == dev
    sc, nc = ops.kmeans_update(x, labels, 100)
    assert torch.equal(sg.cpu(), sc) and torch.equal(ng.cpu(), nc)

# ------------------------------------------------------------------------------ KMeans driver

def test_kmeans_recovers_blobs_and_predicts(device):
    x, ids = kmeans_blobs(2000, 16, 10, device=device)
    km = KMeans(10, niter=15, nredo=3, seed=0, init="kmeans++", progress=False).fit(x)
    assert km.centroids.shape == (10, 16) and km.centroids.dtype == torch.float32
    assert km.labels_.shape == (2000,) and km.labels_.device == x.device
    assert len(km.objective_history) == 15 and len(km.objectives) == 3
    assert km.objective == min(km.objectives) == km.objective_history[-1]
    # Every true blob maps onto one cluster.
    pairs = torch.unique(torch.stack([ids.cpu(), km.labels_.cpu()]), dim=1)
    assert pairs.shape[1] == 10
    assert torch.equal(km.predict(x), km.labels_)
    rl, _ = ref.kmeans_assign(x.cpu(), km.centroids.cpu())
    assert torch.equal(km.labels_.cpu(), rl)
    # The objective never increases (Lloyd), and is the sum of squared distances.
    hist = km.objective_history
    assert all(b <= a * (1 + 1e-6) for a, b in zip(hist, hist[1:]))


def test_kmeans_deterministic_for_seed():
    x = kmeans_points(3000, 8, seed=3)
    a = KMeans(20, niter=5, seed=7, progress=False).fit(x)
    b = KMeans(20, niter=5, seed=7, progress=False).fit(x)
    c = KMeans(20, niter=5, seed=8, progress=False).fit(x)
    assert torch.equal(a.centroids, b.centroids) and a.objective_history == b.objective_history
    assert not torch.equal(a.centroids, c.centroids)
    # Chunked passes give the same clustering.
    d = KMeans(20, niter=5, seed=7, progress=False, chunk_rows=700).fit(x)
    assert torch.allclose(a.centroids, d.centroids, atol=1e-5) and torch.equal(a.labels_, d.labels_)
    e = KMeans(20, niter=5, seed=7, init="kmeans++", progress=False).fit(x)
    f = KMeans(20, niter=5, seed=7, init="kmeans++", progress=False).fit(x)
    assert torch.equal(e.centroids, f.centroids)


def test_kmeans_random_init_is_points_of_x():
    x = kmeans_points(500, 4, seed=4)
    km = KMeans(12, niter=0, seed=1, progress=False).fit(x)
    dists = torch.cdist(km.centroids, x).min(1).values
    assert (dists == 0).all() and len(torch.unique(km.centroids, dim=0)) == 12


def test_kmeans_empty_cluster_is_split():
    x, _ = kmeans_blobs(600, 5, 3, seed=5)
    init = torch.cat([x[:3], torch.full((2, 5), 1e4)])  # two centroids far from every point
    km = KMeans(5, niter=1, seed=0, progress=False)
    km.fit(x, init_centroids=init)
    c = km.centroids
    assert torch.isfinite(c).all() and (c.abs() < 100).all()  # both refilled near the data
    # Each refill is a split: a pair of centroids at a relative distance of ~1/1024.
    close = torch.cdist(c, c) + torch.eye(5) * 1e9
    nearest = close.min(1).values / c.norm(dim=1)
    assert (nearest < 4.0 / 1024).sum() >= 2
    km2 = KMeans(5, niter=10, seed=0, progress=False).fit(x, init_centroids=init)
    assert len(torch.unique(km2.labels_)) == 5  # no empty cluster at the end


def test_kmeans_spherical_ip_and_max_points():
    x = l2_normalize(kmeans_points(2000, 12, seed=6))
    km = KMeans(8, niter=6, spherical=True, metric="ip", progress=False).fit(x)
    assert torch.allclose(km.centroids.norm(dim=1), torch.ones(8), atol=1e-5)
    hist = km.objective_history
    assert all(b >= a * (1 - 1e-6) for a, b in zip(hist, hist[1:]))  # similarity grows
    rl, _ = ref.kmeans_assign(x, km.centroids, "ip")
    assert torch.equal(km.labels_, rl)
    km2 = KMeans(8, niter=3, nredo=2, metric="ip", progress=False).fit(x)
    assert km2.objective == max(km2.objectives)
    sub = KMeans(8, niter=3, max_points_per_centroid=20, progress=False).fit(x)
    assert sub.labels_.shape == (2000,)
    assert sub.objective_history[0] < 160 * 4  # trained on 160 points, not 2000


def test_preprocessing():
    x = kmeans_points(400, 10, seed=7) * torch.linspace(0.1, 5, 10)
    y = preprocess_features(x)
    assert torch.allclose(y.norm(dim=1), torch.ones(400), atol=1e-5)
    w, transform = pca_whiten(x, dim=6)
    assert w.shape == (400, 6)
    cov = (w - w.mean(0)).T @ (w - w.mean(0)) / 399
    assert torch.allclose(cov, torch.eye(6), atol=1e-3)
    z = preprocess_features(x, pca_dim=6, whiten=True)
    assert z.shape == (400, 6) and torch.allclose(z.norm(dim=1), torch.ones(400), atol=1e-5)


def test_kmeans_errors():
    x = kmeans_points(50, 4)
    bad = x.clone()
    bad[17, 2] = float("nan")
    with pytest.raises(LusscoreError, match="1 row.*NaN or inf.*row 17"):
        KMeans(3, niter=2, progress=False).fit(bad)
    bad[17, 2] = float("inf")
    bad[30, 0] = -float("inf")
    with pytest.raises(LusscoreError, match="2 row"):
        KMeans(3, niter=2, progress=False).fit(bad)
    with pytest.raises(LusscoreError, match="larger than the number of points"):
        KMeans(51, progress=False).fit(x)
    km = KMeans(3, niter=2, progress=False).fit(x)
    with pytest.raises(LusscoreError, match="D = 5 columns"):
        km.predict(kmeans_points(4, 5))
    with pytest.raises(LusscoreError, match="must be float32"):
        KMeans(3, progress=False).fit(x.long())
    with pytest.raises(LusscoreError, match="2-D"):
        KMeans(3, progress=False).fit(x[0])
    with pytest.raises(LusscoreError, match="init must be"):
        KMeans(3, init="pp")
    with pytest.raises(LusscoreError, match="metric"):
        KMeans(3, metric="cos")
    with pytest.raises(LusscoreError, match="init_centroids must have shape"):
        KMeans(3, progress=False).fit(x, init_centroids=x[:2])
    with pytest.raises(LusscoreError, match="before predict"):
        KMeans(3).predict(x)


@pytest.mark.skipif(faiss is None, reason="faiss-cpu is not installed")
@pytest.mark.parametrize("spherical", [False, True])
def test_objective_matches_faiss(spherical):
    x, _ = kmeans_blobs(6000, 32, 40, spread=1.5, seed=8)
    if spherical:
        x = l2_normalize(x)
    init = x[torch.randperm(6000, generator=torch.Generator().manual_seed(0))[:40]].clone()
    fk = faiss.Kmeans(32, 40, niter=20, seed=1, spherical=spherical, max_points_per_centroid=100000,
                      verbose=False)
    fk.train(x.numpy(), init_centroids=init.numpy())
    metric = "ip" if spherical else "l2"
    km = KMeans(40, niter=20, spherical=spherical, metric=metric, progress=False).fit(x, init_centroids=init)
    ours, theirs = km.objective_history[-1], float(fk.obj[-1])
    assert abs(ours - theirs) <= 0.005 * abs(theirs)


@requires_cuda
def test_kmeans_cuda_matches_cpu_and_streams_from_host():
    x = kmeans_points(30000, 24, seed=9)
    cpu = KMeans(50, niter=5, seed=3, progress=False).fit(x)
    gpu = KMeans(50, niter=5, seed=3, progress=False).fit(x.cuda())
    streamed = KMeans(50, niter=5, seed=3, device="cuda", chunk_rows=4096, progress=False).fit(x)
    for other in (gpu, streamed):
        assert torch.allclose(other.centroids.cpu(), cpu.centroids, atol=1e-4)
        assert math.isclose(other.objective, cpu.objective, rel_tol=1e-4)
    assert torch.equal(gpu.centroids.cpu(), cpu.centroids)  # same labels, bit-identical sums
    assert streamed.labels_.device.type == "cpu"
    assert torch.equal(streamed.labels_, ref.kmeans_assign(x, streamed.centroids.cpu())[0])
    pinned = KMeans(50, niter=5, seed=3, device="cuda", chunk_rows=5000, progress=False).fit(x.pin_memory())
    assert torch.allclose(pinned.centroids.cpu(), cpu.centroids, atol=1e-4)
    bf16 = KMeans(50, niter=5, seed=3, device="cuda", dtype=torch.bfloat16, progress=False).fit(x)
    assert math.isclose(bf16.objective, cpu.objective, rel_tol=2e-2)


# ------------------------------------------------------------------------------ distributed

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank, world, port, x, kwargs, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        shard = torch.tensor_split(x, world)[rank]
        km = KMeans(**kwargs).fit(shard)
        out[rank] = (km.centroids, km.objective_history, km.labels_)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("init", ["random", "kmeans++"])
def test_distributed_two_ranks_match_one(init):
    x, _ = kmeans_blobs(1200, 6, 8, spread=0.8, seed=10)
    kwargs = dict(n_clusters=8, niter=6, seed=2, init=init, progress=False)
    single = KMeans(**kwargs).fit(x)
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_dist_worker, args=(2, _free_port(), x, kwargs, out), nprocs=2, join=True)
    (c0, h0, l0), (c1, h1, l1) = out[0], out[1]
    assert torch.equal(c0, c1) and h0 == h1  # all ranks identical, objective history included
    assert torch.allclose(c0, single.centroids, atol=1e-5)
    assert all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(h0, single.objective_history))
    assert torch.equal(torch.cat([l0, l1]), single.labels_)


def test_non_finite_rows_and_centroids_are_errors_naming_the_row(device):
    from lusscore.utils import LusscoreError
    x, c = kmeans_points(20, 6, device=device), kmeans_points(4, 6, seed=1, device=device)
    c[3, 0] = float("nan")
    with pytest.raises(LusscoreError, match="centroids: row 3 holds NaN"):
        ops.kmeans_assign(x, c, "l2")
    # x is scanned only when a value is not finite: every such row makes one so.
    for bad in (float("inf"), float("-inf"), float("nan")):
        x[7, 5] = bad
        for metric in ("l2", "ip"):
            with pytest.raises(LusscoreError, match="x: row 7 holds NaN or infinite"):
                ops.kmeans_assign(x, c[:3], metric)
            assert not torch.isfinite(ops.kmeans_assign(x, c[:3], metric, check_finite=False)[1][7])
