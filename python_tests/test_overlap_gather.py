"""overlap_gather against the F.grid_sample reference, its gradients and determinism."""
import pytest
import torch

import lusscore.ops as ops
from conftest import cuda_usable, requires_cuda
from lusscore.reference import overlap_gather as ref
from samples import overlap_boxes, overlap_maps


requires_two_gpus = pytest.mark.skipif(
    not cuda_usable() or torch.cuda.device_count() < 2,
    reason="needs two CUDA GPUs (cuda:1) and lusscore built with CUDA kernels")


def run_both(f1, f2, pairs, size=7, cell_centers=False):
    ours = ops.overlap_gather(f1, f2, *pairs, size=size, cell_centers=cell_centers)
    theirs = ref.overlap_gather(f1, f2, *pairs, size=size, cell_centers=cell_centers)
    return ours, theirs


def grads_of(fn, f1, f2, w1, w2):
    a, b = f1.detach().clone().requires_grad_(), f2.detach().clone().requires_grad_()
    g1, g2, _ = fn(a, b)
    ((g1 * w1).sum() + (g2 * w2).sum()).backward()
    return a.grad, b.grad


def check_against_reference(f1, f2, pairs, size=7, cell_centers=False, atol=1e-5):
    (g1, g2, valid), (r1, r2, rvalid) = run_both(f1, f2, pairs, size, cell_centers)
    assert g1.shape == r1.shape and g2.shape == r2.shape
    assert torch.equal(valid, rvalid)
    torch.testing.assert_close(g1, r1, atol=atol, rtol=atol)
    torch.testing.assert_close(g2, r2, atol=atol, rtol=atol)
    w1, w2 = torch.randn_like(r1), torch.randn_like(r2)
    ours = grads_of(lambda a, b: ops.overlap_gather(a, b, *pairs, size=size,
                                                    cell_centers=cell_centers), f1, f2, w1, w2)
    theirs = grads_of(lambda a, b: ref.overlap_gather(a, b, *pairs, size=size,
                                                      cell_centers=cell_centers), f1, f2, w1, w2)
    torch.testing.assert_close(ours[0], theirs[0], atol=atol, rtol=atol)
    torch.testing.assert_close(ours[1], theirs[1], atol=atol, rtol=atol)
    return valid


@pytest.mark.parametrize("cell_centers", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_grid_sample(device, dtype, cell_centers):
    pairs = overlap_boxes(12, seed=1, device=device)
    f1 = overlap_maps(12, 5, 7, 9, seed=2, dtype=dtype, device=device)
    f2 = overlap_maps(12, 3, 6, 5, seed=3, dtype=dtype, device=device)
    # float64: the kernel's geometry mirrors the reference's to rounding.
    atol = 1e-10 if dtype == torch.float64 else 1e-5
    valid = check_against_reference(f1, f2, pairs, 7, cell_centers, atol=atol)
    assert 0 < int(valid.sum()) < 12, "the sample must mix overlapping and disjoint pairs"


@pytest.mark.parametrize("size", [1, 2, 14])
def test_lattice_sizes_including_larger_than_map(device, size):
    pairs = overlap_boxes(6, seed=4, disjoint_every=0, device=device)
    f1 = overlap_maps(6, 4, 4, 3, seed=5, device=device)
    f2 = overlap_maps(6, 4, 7, 7, seed=6, device=device)
    check_against_reference(f1, f2, pairs, size)
    check_against_reference(f1, f2, pairs, size, cell_centers=True)


def test_boxes_touching_the_border_and_identical(device):
    # Identical full-image boxes: the edge lattice sits on the map border (-0.5 px), where
    # half of each border sample falls on the zero padding.
    boxes1 = torch.tensor([[0.0, 0.0, 100.0, 80.0], [0.0, 0.0, 100.0, 80.0],
                           [10.0, 0.0, 90.0, 80.0], [0.0, 30.0, 50.0, 50.0]], device=device)
    boxes2 = torch.tensor([[0.0, 0.0, 100.0, 80.0], [50.0, 40.0, 50.0, 40.0],
                           [0.0, 20.0, 100.0, 60.0], [40.0, 0.0, 60.0, 80.0]], device=device)
    flips1 = torch.tensor([False, True, False, True], device=device)
    flips2 = torch.tensor([True, False, True, True], device=device)
    pairs = (boxes1, boxes2, flips1, flips2)
    f1 = overlap_maps(4, 3, 7, 7, seed=7, device=device)
    f2 = overlap_maps(4, 3, 5, 6, seed=8, device=device)
    assert bool(check_against_reference(f1, f2, pairs).all())
    # Flipping one full-image view only mirrors its lattice.
    g1, g2, _ = ops.overlap_gather(f1[:1], f1[:1], boxes1[:1], boxes1[:1], flips1[:1], ~flips1[:1])
    torch.testing.assert_close(g2, g1.flip(-1))


def test_geometry_by_hand():
    # A map whose value is its column index (x) and 10 x its row index (y): cell-centre
    # sampling of the whole image with S = W lands exactly on the pixel centres.
    H, W = 4, 5
    f = (torch.arange(W, dtype=torch.float64)[None, :] + 10 * torch.arange(H)[:, None]
         ).expand(1, 1, H, W).contiguous()
    box = torch.tensor([[0.0, 0.0, 50.0, 40.0]], dtype=torch.float64)
    # Resample a 5 x 5 lattice: square lattice over a 4-row map -> rows at 4*(k+.5)/5 - .5.
    g1, g2, valid = ops.overlap_gather(f, f, box, box, torch.tensor([False]),
                                       torch.tensor([True]), size=W, cell_centers=True)
    rows = 4 * (torch.arange(W, dtype=torch.float64) + 0.5) / W - 0.5
    ys = rows.clamp(0, H - 1) * 10
    expect = torch.arange(W, dtype=torch.float64)[None, :] + ys[:, None]
    # Rows outside [0, H-1] blend with zero padding: only the interior rows are exact.
    inner = (rows >= 0) & (rows <= H - 1)
    torch.testing.assert_close(g1[0, 0][inner], expect[inner])
    torch.testing.assert_close(g2[0, 0][inner], expect[inner].flip(-1))
    assert bool(valid[0])
    # The second view's box is the right half of the first: its lattice covers x in [25, 50).
    half = torch.tensor([[25.0, 0.0, 25.0, 40.0]], dtype=torch.float64)
    g1, _, _ = ops.overlap_gather(f, f, box, half, torch.tensor([0]), torch.tensor([0]),
                                  size=1)
    # S = 1: the centre of the overlap, x = 37.5 of 50 -> pixel 0.75 * 5 - 0.5 = 3.25,
    # y = 0.5 * 4 - 0.5 = 1.5.
    torch.testing.assert_close(g1[0, 0, 0, 0], torch.tensor(3.25 + 15.0, dtype=torch.float64))


def test_disjoint_and_degenerate_boxes_give_zeros_and_no_gradient(device):
    boxes1 = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0],
                           [0.0, 0.0, 0.0, 10.0], [0.0, 0.0, float("nan"), 10.0]], device=device)
    boxes2 = torch.tensor([[20.0, 0.0, 10.0, 10.0], [10.0, 0.0, 10.0, 10.0],
                           [0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]], device=device)
    flips = torch.zeros(4, dtype=torch.bool, device=device)
    f1 = overlap_maps(4, 3, 5, 5, device=device).requires_grad_()
    f2 = overlap_maps(4, 3, 5, 5, seed=1, device=device).requires_grad_()
    g1, g2, valid = ops.overlap_gather(f1, f2, boxes1, boxes2, flips, flips)
    assert not bool(valid.any())  # apart, touching edges, zero width, NaN
    assert not bool(g1.any()) and not bool(g2.any())
    (g1.sum() + g2.sum()).backward()
    assert not bool(f1.grad.any()) and not bool(f2.grad.any())


@pytest.mark.parametrize("flip_dtype", [torch.uint8, torch.int32, torch.int64])
def test_flip_and_box_dtypes(device, flip_dtype):
    b1, b2, fl1, fl2 = overlap_boxes(8, seed=9, device=device)
    f1 = overlap_maps(8, 4, 6, 6, seed=10, device=device)
    f2 = overlap_maps(8, 4, 6, 6, seed=11, device=device)
    base = ops.overlap_gather(f1, f2, b1, b2, fl1, fl2)
    other = ops.overlap_gather(f1, f2, b1.double(), b2.double(), fl1.to(flip_dtype),
                               fl2.to(flip_dtype))
    for x, y in zip(base, other):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)


def test_channels_last_noncontiguous_and_empty(device):
    pairs = overlap_boxes(8, seed=12, device=device)
    f1 = overlap_maps(8, 16, 7, 7, seed=13, device=device)
    f2 = overlap_maps(8, 16, 6, 8, seed=14, device=device)
    base = ops.overlap_gather(f1, f2, *pairs)
    cl1, cl2 = (f.contiguous(memory_format=torch.channels_last) for f in (f1, f2))
    g1, g2, valid = ops.overlap_gather(cl1, cl2, *pairs)
    assert g1.is_contiguous(memory_format=torch.channels_last) and not g1.is_contiguous()
    torch.testing.assert_close(g1, base[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g2, base[1], atol=1e-6, rtol=1e-6)
    check_against_reference(cl1, cl2, pairs)  # channels-last gradients too
    # Non-contiguous maps (a transposed view) and non-contiguous boxes.
    t1 = f1.transpose(2, 3).contiguous().transpose(2, 3)
    boxes_nc = torch.stack([pairs[0], pairs[0]], dim=2)[..., 0]
    assert not t1.is_contiguous()
    check_against_reference(t1, f2, (boxes_nc,) + pairs[1:])
    # Mixed layouts.
    check_against_reference(cl1, f2, pairs)
    # Empty batch and zero channels.
    e = ops.overlap_gather(f1[:0], f2[:0], *(p[:0] for p in pairs))
    assert e[0].shape == (0, 16, 7, 7) and e[2].shape == (0,)
    z1, z2, v = ops.overlap_gather(f1[:, :0], f2, *pairs)
    assert z1.shape == (8, 0, 7, 7) and torch.equal(v, base[2])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(device, dtype):
    pairs = overlap_boxes(8, seed=15, device=device)
    f1 = overlap_maps(8, 32, 7, 7, seed=16, dtype=torch.float64, device=device)
    f2 = overlap_maps(8, 32, 9, 9, seed=17, dtype=torch.float64, device=device)
    exact = ref.overlap_gather(f1, f2, *pairs)
    if device.type == "cpu" and dtype == torch.float16:
        # grid_sample has no CPU half kernel: judge by the rounding of the fp64 result.
        theirs = [t.to(dtype) for t in exact[:2]]
    else:
        theirs = ref.overlap_gather(f1.to(dtype), f2.to(dtype), *pairs)[:2]
    ours = ops.overlap_gather(f1.to(dtype), f2.to(dtype), *pairs)
    for o, t, e in zip(ours[:2], theirs, exact[:2]):
        assert o.dtype == dtype
        err_ours = (o.double() - e).abs().max().item()
        err_theirs = (t.double() - e).abs().max().item()
        assert err_ours <= 1.5 * err_theirs + 1e-3, (err_ours, err_theirs)
    # Backward in low precision: compare with the fp64 gradient.
    w1 = torch.randn(8, 32, 7, 7, dtype=torch.float64, device=device)
    w2 = torch.randn(8, 32, 7, 7, dtype=torch.float64, device=device)
    ours_g = grads_of(lambda a, b: ops.overlap_gather(a, b, *pairs), f1.to(dtype), f2.to(dtype),
                      w1.to(dtype), w2.to(dtype))
    exact_g = grads_of(lambda a, b: ref.overlap_gather(a, b, *pairs), f1, f2, w1, w2)
    for o, e in zip(ours_g, exact_g):
        assert o.dtype == dtype
        scale = e.abs().max().item()
        assert (o.double() - e).abs().max().item() <= 2e-2 * scale


def test_gradcheck_float64(device):
    pairs = overlap_boxes(3, image_hw=(30, 40), seed=18, disjoint_every=3, device=device)
    f1 = overlap_maps(3, 2, 4, 5, seed=19, dtype=torch.float64, device=device).requires_grad_()
    f2 = overlap_maps(3, 2, 3, 3, seed=20, dtype=torch.float64, device=device).requires_grad_()
    for size, cell in ((3, False), (4, True), (1, False)):
        fn = lambda a, b: ops.overlap_gather(a, b, *pairs, size=size, cell_centers=cell)[:2]  # noqa: E731
        assert torch.autograd.gradcheck(fn, (f1, f2))
        assert torch.autograd.gradgradcheck(fn, (f1, f2))


def test_deterministic_gradients(device):
    pairs = overlap_boxes(16, seed=21, device=device)
    for cl in (False, True):
        f1 = overlap_maps(16, 24, 7, 7, seed=22, device=device, channels_last=cl)
        f2 = overlap_maps(16, 24, 14, 14, seed=23, device=device, channels_last=cl)
        w1 = torch.randn(16, 24, 5, 5, device=device)
        w2 = torch.randn(16, 24, 5, 5, device=device)
        fn = lambda a, b: ops.overlap_gather(a, b, *pairs, size=5)  # noqa: E731
        first = grads_of(fn, f1, f2, w1, w2)
        second = grads_of(fn, f1, f2, w1, w2)
        assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_opcheck(device):
    pairs = overlap_boxes(4, seed=24, device=device)
    f1 = overlap_maps(4, 3, 5, 6, seed=25, device=device).requires_grad_()
    f2 = overlap_maps(4, 2, 4, 4, seed=26, device=device).requires_grad_()
    torch.library.opcheck(torch.ops.lusscore.overlap_gather.default, (f1, f2, *pairs, 3, False))
    cl = f1.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.library.opcheck(torch.ops.lusscore.overlap_gather.default, (cl, f2, *pairs, 4, True))
    gg1 = torch.randn(4, 3, 3, 3, device=device)
    gg2 = torch.randn(4, 2, 3, 3, device=device)
    torch.library.opcheck(torch.ops.lusscore.overlap_gather_backward.default,
                          (gg1, gg2, *pairs, 5, 6, 4, 4, 3, False))


def test_compiles():
    pairs = overlap_boxes(4, seed=27)
    f1 = overlap_maps(4, 3, 5, 5, seed=28).requires_grad_()
    f2 = overlap_maps(4, 3, 5, 5, seed=29).requires_grad_()

    def fn(a, b):
        g1, g2, valid = ops.overlap_gather(a * 2, b, *pairs, size=3)
        return (g1 * g2).sum(dim=1) * valid[:, None, None]

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(f1, f2)
    torch.testing.assert_close(out, fn(f1, f2))
    out.sum().backward()
    got = f1.grad.clone(), f2.grad.clone()
    f1.grad = f2.grad = None
    fn(f1, f2).sum().backward()  # the same gradients as eager, not just some
    assert got[0].abs().sum() > 0
    torch.testing.assert_close(got[0], f1.grad)
    torch.testing.assert_close(got[1], f2.grad)


def test_errors(device):
    pairs = overlap_boxes(2, device=device)
    f = overlap_maps(2, 3, 4, 4, device=device)
    with pytest.raises(RuntimeError, match="f1 must have 4 dimensions"):
        ops.overlap_gather(f[0], f, *pairs)
    with pytest.raises(RuntimeError, match="f1 must have dtype"):
        ops.overlap_gather(f.int(), f.int(), *pairs)
    with pytest.raises(RuntimeError, match="same dtype"):
        ops.overlap_gather(f, f.double(), *pairs)
    with pytest.raises(RuntimeError, match="same batch size"):
        ops.overlap_gather(f, f[:1], *pairs)
    with pytest.raises(RuntimeError, match=r"boxes1 must have shape \(B, 4\)"):
        ops.overlap_gather(f, f, pairs[0][:, :3], *pairs[1:])
    with pytest.raises(RuntimeError, match="boxes2 must have dtype"):
        ops.overlap_gather(f, f, pairs[0], pairs[1].half(), *pairs[2:])
    with pytest.raises(RuntimeError, match="flips1 must have shape"):
        ops.overlap_gather(f, f, *pairs[:2], pairs[2][:1], pairs[3])
    with pytest.raises(RuntimeError, match="flips2 must have dtype"):
        ops.overlap_gather(f, f, *pairs[:3], pairs[3].float())
    with pytest.raises(RuntimeError, match="size must be in"):
        ops.overlap_gather(f, f, *pairs, size=0)
    with pytest.raises(RuntimeError, match="same device"):
        ops.overlap_gather(f, f, pairs[0].to("meta"), *pairs[1:])


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cpu_cuda_parity(dtype, channels_last):
    pairs = overlap_boxes(10, seed=30)
    f1 = overlap_maps(10, 64, 7, 7, seed=31, dtype=dtype, channels_last=channels_last)
    f2 = overlap_maps(10, 64, 28, 28, seed=32, dtype=dtype, channels_last=channels_last)
    cuda_pairs = tuple(p.cuda() for p in pairs)
    for size, cell in ((7, False), (14, True)):
        cpu = ops.overlap_gather(f1, f2, *pairs, size=size, cell_centers=cell)
        gpu = ops.overlap_gather(f1.cuda(), f2.cuda(), *cuda_pairs, size=size, cell_centers=cell)
        tol = 1e-5 if dtype in (torch.float32, torch.float64) else 1e-2
        for c, g in zip(cpu, gpu):
            torch.testing.assert_close(g.cpu(), c, atol=tol, rtol=tol)
        w1, w2 = torch.randn_like(cpu[0]), torch.randn_like(cpu[1])
        gc = grads_of(lambda a, b: ops.overlap_gather(a, b, *pairs, size=size, cell_centers=cell),
                      f1, f2, w1, w2)
        gg = grads_of(lambda a, b: ops.overlap_gather(a, b, *cuda_pairs, size=size,
                                                      cell_centers=cell),
                      f1.cuda(), f2.cuda(), w1.cuda(), w2.cuda())
        for c, g in zip(gc, gg):
            torch.testing.assert_close(g.cpu(), c, atol=tol, rtol=tol)


@requires_cuda
def test_cuda_misaligned_channels_last_falls_back():
    # A channels-last map whose storage starts off a 16-byte boundary takes the scalar path.
    pairs = tuple(p.cuda() for p in overlap_boxes(4, seed=33))
    base = overlap_maps(4, 16, 5, 5, seed=34, device="cuda", channels_last=True)
    storage = torch.empty(base.numel() + 1, device="cuda")
    shifted = storage[1:].as_strided(base.shape, base.stride())
    shifted.copy_(base)
    torch.testing.assert_close(ops.overlap_gather(shifted, shifted, *pairs)[0],
                               ops.overlap_gather(base, base, *pairs)[0])


# ------------------------------------------------------------------ CUDA paths beyond the parity test
def _forward_backward(f1, f2, pairs, gg1, gg2, size, device, cell_centers=False):
    """g1, g2, valid and the backward op's gf1, gf2 for maps and grads moved to `device`."""
    dev = [t.to(device) for t in (f1, f2, gg1, gg2)]  # .to() keeps channels-last
    p = tuple(t.to(device) for t in pairs)
    g1, g2, valid = ops.overlap_gather(dev[0], dev[1], *p, size=size, cell_centers=cell_centers)
    gf1, gf2 = torch.ops.lusscore.overlap_gather_backward(
        dev[2], dev[3], *p, f1.shape[2], f1.shape[3], f2.shape[2], f2.shape[3], size, cell_centers)
    return g1, g2, valid, gf1, gf2


def _is_channels_last(t):
    # As the kernels decide: channels-last only when not also plain contiguous.
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _same_device(got, device):
    """got is `device`; a device without an index means the current one of its type."""
    want = torch.device(device)
    if want.index is None:
        return got.type == want.type and got.index in (None, torch.cuda.current_device())
    return got == want


def _assert_cuda_equals_cpu(f1, f2, pairs, size, tol, device="cuda", cell_centers=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    gg1 = torch.randn(f1.shape[0], f1.shape[1], size, size, generator=g, dtype=torch.float64)
    gg2 = torch.randn(f2.shape[0], f2.shape[1], size, size, generator=g, dtype=torch.float64)
    # The grads laid out like their maps, so that the backward runs in the maps' layout too.
    gg1, gg2 = (gg.to(f.dtype).contiguous(memory_format=torch.channels_last if _is_channels_last(f)
                                          else torch.contiguous_format)
                for gg, f in ((gg1, f1), (gg2, f2)))
    cpu = _forward_backward(f1, f2, pairs, gg1, gg2, size, "cpu", cell_centers)
    dev = _forward_backward(f1, f2, pairs, gg1, gg2, size, device, cell_centers)
    for c, d in zip(cpu, dev):
        assert _same_device(d.device, device) and d.dtype == c.dtype and d.shape == c.shape
        assert d.stride() == c.stride()  # the same layout on both devices
        torch.testing.assert_close(d.cpu(), c, atol=tol, rtol=tol)
    return cpu, dev


def _tap_bytes(dtype):
    # OverlapTap<acc_t>: two int32 indices and two acc_t weights (float, double for fp64).
    return 24 if dtype == torch.float64 else 16


def _backward_shared_bytes(size, h, w, dtype):
    # launch_scatter: 2 x S taps plus an int2 touching range per map row and column.
    return 2 * size * _tap_bytes(dtype) + (h + w) * 8


def _optin():
    return torch.cuda.get_device_properties(torch.cuda.current_device()).shared_memory_per_block_optin


@requires_cuda
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype,size,h,w", [
    (torch.float32, 7, 4, 6200),     # the W + H ranges push the block past 48 KB
    (torch.float64, 1024, 8, 8),     # fp64 taps alone are 48 KB at S = 1024
    (torch.bfloat16, 64, 6000, 4),   # a tall map
])
def test_cuda_backward_above_48kb_of_shared_memory(dtype, size, h, w, channels_last):
    """The backward kernel opts in to more than 48 KB of dynamic shared memory (up to the
    device's opt-in maximum); the values equal the CPU's."""
    need = _backward_shared_bytes(size, h, w, dtype)
    assert 48 * 1024 < need <= _optin()
    pairs = overlap_boxes(2, seed=50, disjoint_every=0)
    f1 = overlap_maps(2, 3, h, w, seed=51, dtype=dtype, channels_last=channels_last)
    f2 = overlap_maps(2, 2, 6, 5, seed=52, dtype=dtype, channels_last=channels_last)
    tol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, 2e-2)
    _assert_cuda_equals_cpu(f1, f2, pairs, size, tol, seed=53)


@requires_cuda
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_backward_above_the_shared_memory_optin_falls_back(channels_last):
    """Ranges that do not fit even after opting in are found per thread: same values."""
    size = 7
    w = (_optin() - 2 * size * _tap_bytes(torch.float32)) // 8 + 64
    assert _backward_shared_bytes(size, 2, w, torch.float32) > _optin()
    pairs = overlap_boxes(2, seed=54, disjoint_every=0)
    f1 = overlap_maps(2, 2, 2, w, seed=55, channels_last=channels_last)
    f2 = overlap_maps(2, 4, 2, w, seed=56, channels_last=channels_last)
    _assert_cuda_equals_cpu(f1, f2, pairs, size, 1e-5, seed=57)


@requires_cuda
@pytest.mark.parametrize("channels,channels_last", [(2, False), (8, True), (3, True)])
def test_cuda_grid_stride_past_one_grid(channels, channels_last):
    """More (item, chunk) blocks than one grid holds (sms * 32 blocks): the block-stride loops
    of both kernels must cover the rest."""
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    B = sms * 32 + 77  # one chunk per item here
    pairs = overlap_boxes(B, seed=58)
    f1 = overlap_maps(B, channels, 5, 6, seed=59, channels_last=channels_last)
    f2 = overlap_maps(B, channels, 7, 7, seed=60, channels_last=channels_last)
    cpu, _ = _assert_cuda_equals_cpu(f1, f2, pairs, 7, 1e-5, seed=61)
    assert 0 < int(cpu[2].sum()) < B  # disjoint pairs past the first grid too


@requires_cuda
@pytest.mark.parametrize("misaligned", [False, True])
@pytest.mark.parametrize("channels", [13, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_channels_last_backward_matches_cpu(dtype, channels, misaligned):
    """Channels-last forward and backward, vectorised (C % vec == 0, 16-byte aligned) and
    scalar (C = 13, or the map/grad storage one element off 16 bytes), against the CPU."""
    pairs = overlap_boxes(6, seed=62)
    f1 = overlap_maps(6, channels, 7, 7, seed=63, dtype=dtype, channels_last=True)
    f2 = overlap_maps(6, channels, 9, 5, seed=64, dtype=dtype, channels_last=True)
    g = torch.Generator().manual_seed(65)
    gg1, gg2 = (torch.randn(6, channels, 7, 7, generator=g).to(dtype)
                .contiguous(memory_format=torch.channels_last) for _ in range(2))

    def on_cuda(t):
        if not misaligned:
            return t.cuda()
        storage = torch.empty(t.numel() + 1, dtype=dtype, device="cuda")
        out = storage[1:].as_strided(t.shape, t.stride())
        out.copy_(t)
        assert out.data_ptr() % 16 != 0
        return out

    cuda_in = [on_cuda(t) for t in (f1, f2, gg1, gg2)]
    for t in cuda_in:
        assert t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    cuda_pairs = tuple(p.cuda() for p in pairs)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    cpu = (*ops.overlap_gather(f1, f2, *pairs),
           *torch.ops.lusscore.overlap_gather_backward(gg1, gg2, *pairs, 7, 7, 9, 5, 7, False))
    gpu = (*ops.overlap_gather(cuda_in[0], cuda_in[1], *cuda_pairs),
           *torch.ops.lusscore.overlap_gather_backward(cuda_in[2], cuda_in[3], *cuda_pairs,
                                                       7, 7, 9, 5, 7, False))
    for i, (c, d) in enumerate(zip(cpu, gpu)):
        if i != 2:  # all but valid are laid out channels-last, as their input
            assert d.is_contiguous(memory_format=torch.channels_last) and not d.is_contiguous()
        torch.testing.assert_close(d.cpu(), c, atol=tol, rtol=tol)
    # and through autograd (the gradient of a channels-last map, CPU vs CUDA)
    w1, w2 = torch.randn_like(cpu[0]), torch.randn_like(cpu[1])
    gc = grads_of(lambda a, b: ops.overlap_gather(a, b, *pairs), f1, f2, w1, w2)
    gd = grads_of(lambda a, b: ops.overlap_gather(a, b, *cuda_pairs), cuda_in[0], cuda_in[1],
                  w1.cuda(), w2.cuda())
    for c, d in zip(gc, gd):
        torch.testing.assert_close(d.cpu(), c, atol=tol, rtol=tol)


@requires_two_gpus
def test_cuda_non_default_device():
    """Inputs on cuda:1 while cuda:0 is current: outputs on cuda:1, equal to the CPU's; the
    shared-memory opt-in is per device, so a > 48 KB backward runs on cuda:0 first, then on
    cuda:1."""
    assert torch.cuda.current_device() == 0
    pairs = overlap_boxes(8, seed=66)
    f1 = overlap_maps(8, 16, 7, 7, seed=67)
    f2 = overlap_maps(8, 16, 9, 9, seed=68, channels_last=True)
    _assert_cuda_equals_cpu(f1, f2, pairs, 7, 1e-5, device="cuda:1", seed=69)
    wide = overlap_maps(2, 3, 4, 6200, seed=70)
    wide_pairs = overlap_boxes(2, seed=71, disjoint_every=0)
    assert _backward_shared_bytes(7, 4, 6200, torch.float32) > 48 * 1024
    for device in ("cuda:0", "cuda:1"):
        _assert_cuda_equals_cpu(wide, wide, wide_pairs, 7, 1e-5, device=device, seed=72)
    assert torch.cuda.current_device() == 0


def test_limit_errors(device):
    pairs = overlap_boxes(2, device=device)
    f = overlap_maps(2, 3, 4, 4, device=device)
    with pytest.raises(RuntimeError, match=r"size must be in \[1, 1024\], got 1025"):
        ops.overlap_gather(f, f, *pairs, size=1025)
    g = torch.zeros(2, 3, 7, 7, device=device)
    with pytest.raises(RuntimeError, match="map sizes must be non-negative, got -1x4 and 4x4"):
        torch.ops.lusscore.overlap_gather_backward(g, g, *pairs, -1, 4, 4, 4, 7, False)
    # The taps hold int32 indices: a map 2^31 wide is refused on both devices (checked before
    # any data is read, so an expanded view costs nothing).
    wide = torch.zeros(1, 1, 1, 1, device=device).expand(2, 1, 1, 2 ** 31)
    with pytest.raises(RuntimeError, match=r"f2 must have H and W below 2\^31, got 1x2147483648"):
        ops.overlap_gather(f, wide, *pairs)
    with pytest.raises(RuntimeError, match=r"the map of view 1 \(height1 x width1\) must have H "
                                           r"and W below 2\^31, got 2147483648x4"):
        torch.ops.lusscore.overlap_gather_backward(g, g, *pairs, 2 ** 31, 4, 4, 4, 7, False)


@requires_cuda
def test_cuda_slice_limit_error():
    """CUDA indexes inside one batch item with 32 bits: an item of 2^31 elements or more is an
    error naming the tensor (checked before anything is copied or allocated, so an expanded
    view costs nothing)."""
    pairs = tuple(p.cuda() for p in overlap_boxes(1, disjoint_every=0))
    huge = torch.zeros(1, 1, 1, 1, dtype=torch.float16, device="cuda").expand(1, 2048, 1024, 1024)
    small = torch.zeros(1, 2048, 4, 4, dtype=torch.float16, device="cuda")
    with pytest.raises(RuntimeError, match=r"one batch item of f1 may hold at most 2\^31 - 1 "
                                           r"elements, got C x H x W = 2048 x 1024 x 1024"):
        ops.overlap_gather(huge, small, *pairs)
    with pytest.raises(RuntimeError, match="one batch item of f2 may hold at most"):
        ops.overlap_gather(small, huge, *pairs)
    gg = torch.zeros(1, 2048, 7, 7, dtype=torch.float16, device="cuda")
    with pytest.raises(RuntimeError, match="one batch item of the gradient of f1 may hold"):
        torch.ops.lusscore.overlap_gather_backward(gg, gg, *pairs, 1024, 1024, 4, 4, 7, False)
    with pytest.raises(RuntimeError, match="one batch item of the gradient of f2 may hold"):
        torch.ops.lusscore.overlap_gather_backward(gg, gg, *pairs, 4, 4, 1024, 1024, 7, False)
