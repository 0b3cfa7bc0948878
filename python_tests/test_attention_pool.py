"""attention_pool op against its reference: forward (both outputs), gradients, opcheck,
CPU/CUDA parity, low precision, layouts, empty inputs, errors and torch.compile."""
import pytest
import torch

import lusscore.ops as ops
from conftest import cuda_usable, requires_cuda
from lusscore.reference import attention_pool as ref
from samples import assert_close_to_scale, attention_pool_inputs

SHAPES = [(2, 5, 3, 4), (3, 7, 7, 7), (2, 33, 1, 1), (1, 3, 1, 5), (2, 40, 9, 11), (1, 70, 2, 3)]
FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

requires_two_gpus = pytest.mark.skipif(
    not cuda_usable() or torch.cuda.device_count() < 2,
    reason="needs two CUDA GPUs (cuda:1) and lusscore built with CUDA kernels")


def _grads(fn, x, a, theta, gp, gm=None):
    x, a, theta = (t.detach().clone().requires_grad_(True) for t in (x, a, theta))
    pooled, mean = fn(x, a, theta, gm is not None)
    loss = (pooled * gp).sum() + ((mean * gm).sum() if gm is not None else 0)
    loss.backward()
    return x.grad, a.grad, theta.grad


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_reference(device, shape):
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    x, a, theta = attention_pool_inputs(*shape, dtype=dtype, seed=sum(shape), device=device)
    pooled, mean = ops.attention_pool(x, a, theta, True)
    rp, rm = ref.attention_pool(x, a, theta, True)
    assert pooled.shape == shape[:2] and mean.shape == (shape[0],) + shape[2:]
    assert pooled.dtype == dtype and mean.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(pooled, rp, atol=tol, rtol=tol)
    torch.testing.assert_close(mean, rm, atol=tol, rtol=tol)
    only, empty = ops.attention_pool(x, a, theta)
    assert empty.numel() == 0
    torch.testing.assert_close(only, pooled, atol=0, rtol=0)


@pytest.mark.parametrize("with_mean", [False, True])
@pytest.mark.parametrize("shape", SHAPES[:4])
def test_backward_matches_reference(device, shape, with_mean):
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    x, a, theta = attention_pool_inputs(*shape, dtype=dtype, seed=1, device=device)
    g = torch.Generator().manual_seed(2)
    gp = torch.randn(shape[:2], generator=g, dtype=dtype).to(device)
    gm = torch.randn((shape[0],) + shape[2:], generator=g, dtype=dtype).to(device) if with_mean else None
    ours = _grads(ops.attention_pool, x, a, theta, gp, gm)
    want = _grads(ref.attention_pool, x, a, theta, gp, gm)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for o, w in zip(ours, want):
        torch.testing.assert_close(o, w, atol=tol, rtol=tol)


def test_gradcheck_float64():
    x, a, theta = attention_pool_inputs(2, 3, 3, 4, dtype=torch.float64, seed=3, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: ops.attention_pool(*t, True), (x, a, theta))
    assert torch.autograd.gradcheck(lambda *t: ops.attention_pool(*t, False)[0], (x, a, theta))
    # Only the mean attention used: the pooled gradient is absent.
    assert torch.autograd.gradcheck(lambda *t: ops.attention_pool(*t, True)[1], (x, a, theta))


def test_grad_x_skipped_when_not_needed(device):
    x, a, theta = attention_pool_inputs(2, 6, 4, 4, device=device)
    a.requires_grad_(True)
    theta.requires_grad_(True)
    pooled, _ = ops.attention_pool(x, a, theta)
    ga, gt = torch.autograd.grad(pooled.sum(), (a, theta))
    wa, wt = _grads(ref.attention_pool, x, a, theta, torch.ones_like(pooled))[1:]
    torch.testing.assert_close(ga, wa, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gt, wt, atol=1e-6, rtol=1e-5)
    grad_x, _, _ = torch.ops.lusscore.attention_pool_backward(
        torch.ones_like(pooled), None, x, a.detach(), theta.detach(), False)
    assert grad_x.numel() == 0


def test_opcheck(device):
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    x, a, theta = attention_pool_inputs(2, 4, 3, 5, dtype=dtype, device=device, requires_grad=True)
    for flag in (False, True):
        torch.library.opcheck(torch.ops.lusscore.attention_pool.default, (x, a, theta, flag))
    gp = torch.randn(2, 4, dtype=dtype, device=device)
    gm = torch.randn(2, 3, 5, dtype=dtype, device=device)
    for gm_arg, gx in ((None, True), (gm, False)):
        torch.library.opcheck(torch.ops.lusscore.attention_pool_backward.default,
                              (gp, gm_arg, x.detach(), a.detach(), theta.detach(), gx))


@pytest.mark.parametrize("layout", ["channels_last", "permuted", "sliced"])
def test_noncontiguous_inputs(device, layout):
    x, a, theta = attention_pool_inputs(3, 8, 5, 6, device=device, seed=4)
    if layout == "channels_last":
        xs, as_ = x.to(memory_format=torch.channels_last), a.to(memory_format=torch.channels_last)
    elif layout == "permuted":
        xs, as_ = x.transpose(2, 3).contiguous().transpose(2, 3), a.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)
    else:
        big_x = torch.randn(3, 16, 5, 12, device=device)
        big_a = torch.randn(3, 16, 5, 12, device=device)
        big_x[:, ::2, :, ::2] = x
        big_a[:, ::2, :, ::2] = a
        xs, as_ = big_x[:, ::2, :, ::2], big_a[:, ::2, :, ::2]
    assert not xs.is_contiguous() and not as_.is_contiguous()
    ts = torch.randn(16, device=device)[::2]
    ts.copy_(theta)
    gp = torch.randn(3, 8, device=device)
    gm = torch.randn(3, 5, 6, device=device)
    pooled, mean = ops.attention_pool(xs, as_, ts, True)
    rp, rm = ref.attention_pool(x, a, theta, True)
    torch.testing.assert_close(pooled, rp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mean, rm, atol=1e-5, rtol=1e-5)
    for o, w in zip(_grads(ops.attention_pool, xs, as_, ts, gp, gm),
                    _grads(ref.attention_pool, x, a, theta, gp, gm)):
        torch.testing.assert_close(o, w, atol=1e-5, rtol=1e-5)


def test_misaligned_storage_offset(device):
    # An odd storage offset defeats 16-byte vector loads: the kernels must still be right.
    x, a, theta = attention_pool_inputs(2, 9, 5, 5, device=device, seed=5)
    xs = torch.empty(x.numel() + 1, device=device)[1:].view(x.shape).copy_(x)
    as_ = torch.empty(a.numel() + 1, device=device)[1:].view(a.shape).copy_(a)
    gp = torch.randn(2, 9, device=device)
    torch.testing.assert_close(ops.attention_pool(xs, as_, theta)[0], ref.attention_pool(x, a, theta)[0],
                               atol=1e-5, rtol=1e-5)
    for o, w in zip(_grads(ops.attention_pool, xs, as_, theta, gp), _grads(ref.attention_pool, x, a, theta, gp)):
        torch.testing.assert_close(o, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(0, 4, 3, 3), (2, 0, 3, 3), (2, 4, 0, 3)])
def test_empty_inputs(device, shape):
    x, a, theta = attention_pool_inputs(*shape, device=device, requires_grad=True)
    pooled, mean = ops.attention_pool(x, a, theta, True)
    rp, rm = ref.attention_pool(x, a, theta, True)
    assert pooled.shape == rp.shape and mean.shape == rm.shape
    torch.testing.assert_close(pooled, rp, equal_nan=True)
    torch.testing.assert_close(mean, rm, equal_nan=True)
    pooled.sum().backward()
    assert x.grad.shape == x.shape and a.grad.shape == a.shape
    assert theta.grad.shape == theta.shape and (theta.grad == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_bound(device, dtype):
    """Our error (vs an fp64 truth) must not exceed eager PyTorch's in the same dtype."""
    shape = (4, 64, 14, 14)
    x64, a64, t64 = attention_pool_inputs(*shape, dtype=torch.float64, seed=6, device=device)
    x, a, theta = (t.to(dtype) for t in (x64, a64, t64))
    # The truth is computed from the rounded inputs, so only the op's arithmetic is judged.
    tp, tm = ref.attention_pool(x.double(), a.double(), theta.double(), True)
    gp = torch.randn(shape[:2], dtype=torch.float64, device=device)
    truth_grads = _grads(ref.attention_pool, x.double(), a.double(), theta.double(), gp)
    ours = ops.attention_pool(x, a, theta, True)
    eager = ref.attention_pool(x, a, theta, True)
    for o, e, t in zip(ours, eager, (tp, tm)):
        assert o.dtype == dtype
        err_o = (o.double() - t).abs().max().item()
        err_e = (e.double() - t).abs().max().item()
        assert err_o <= err_e * 1.01 + 1e-6, (err_o, err_e)
    ours_g = _grads(ops.attention_pool, x, a, theta, gp.to(dtype))
    eager_g = _grads(ref.attention_pool, x, a, theta, gp.to(dtype))
    for o, e, t in zip(ours_g, eager_g, truth_grads):
        err_o = (o.double() - t).abs().max().item()
        err_e = (e.double() - t).abs().max().item()
        assert err_o <= 2 * err_e + 1e-6, (err_o, err_e)


def test_cpu_low_precision_is_close():
    x, a, theta = attention_pool_inputs(2, 16, 6, 6, seed=7)
    want = ref.attention_pool_fp32(x, a, theta, True)
    for dtype in (torch.bfloat16, torch.float16):
        got = ops.attention_pool(x.to(dtype), a.to(dtype), theta, True)
        for g, w in zip(got, want):
            assert_close_to_scale(g, w, 2e-2)


def test_theta_dtype_may_differ(device):
    x, a, theta = attention_pool_inputs(2, 6, 4, 4, dtype=torch.bfloat16, device=device)
    theta32 = theta.float().requires_grad_(True)
    pooled, _ = ops.attention_pool(x, a, theta32)
    pooled.float().sum().backward()
    assert theta32.grad.dtype == torch.float32 and theta32.grad.shape == (6,)


def test_grad_theta_is_deterministic(device):
    x, a, theta = attention_pool_inputs(16, 40, 7, 7, device=device, seed=8)
    gp = torch.randn(16, 40, device=device)
    first = _grads(ops.attention_pool, x, a, theta, gp)
    for _ in range(3):
        again = _grads(ops.attention_pool, x, a, theta, gp)
        for f, g in zip(first, again):
            assert torch.equal(f, g)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 37, 7, 7), (2, 64, 28, 28), (5, 33, 3, 1), (1, 1, 1, 1)])
def test_cpu_cuda_parity(dtype, shape):
    x, a, theta = attention_pool_inputs(*shape, dtype=dtype, seed=9)
    g = torch.Generator().manual_seed(10)
    gp = torch.randn(shape[:2], generator=g).to(dtype)
    gm = torch.randn((shape[0],) + shape[2:], generator=g).to(dtype)
    cpu = ops.attention_pool(x, a, theta, True)
    cuda = ops.attention_pool(x.cuda(), a.cuda(), theta.cuda(), True)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for c, d in zip(cpu, cuda):
        assert_close_to_scale(d.cpu(), c, tol)
    cpu_g = _grads(ops.attention_pool, x, a, theta, gp, gm)
    cuda_g = _grads(ops.attention_pool, x.cuda(), a.cuda(), theta.cuda(), gp.cuda(), gm.cuda())
    for c, d in zip(cpu_g, cuda_g):  # gradients sum many rounded terms: twice the slack
        assert_close_to_scale(d.cpu(), c, 2 * tol)


@requires_cuda
def test_cuda_rejects_float64():
    x, a, theta = attention_pool_inputs(1, 2, 2, 2, dtype=torch.float64, device="cuda")
    with pytest.raises(RuntimeError, match="x must have dtype in .*float64 x and a are CPU-only"):
        ops.attention_pool(x, a, theta)
    with pytest.raises(RuntimeError, match="float64 x and a are CPU-only"):
        torch.ops.lusscore.attention_pool_backward(torch.ones(1, 2, device="cuda"), None, x, a,
                                                   theta, True)


def _forward_and_grads(x, a, theta, gp, gm):
    """Both outputs and the three gradients of one call with return_mean_attention."""
    x, a, theta = (t.detach().clone().requires_grad_(True) for t in (x, a, theta))
    pooled, mean = ops.attention_pool(x, a, theta, True)
    ((pooled * gp).sum() + (mean * gm).sum()).backward()
    return pooled.detach(), mean.detach(), x.grad, a.grad, theta.grad


@pytest.mark.parametrize("theta_dtype", FLOATS)
@pytest.mark.parametrize("x_dtype", FLOATS)
def test_theta_dtypes_one_contract(device, x_dtype, theta_dtype):
    """Every float theta with every x dtype the device takes: outputs and x/a gradients in x's
    dtype, theta's gradient in theta's; the values of the fp32 reference on the rounded
    inputs (fp64 for fp64 x); CUDA equal to the CPU. float64 x is CPU-only: CUDA says so."""
    shape = (3, 37, 5, 7)
    x, a, theta = attention_pool_inputs(*shape, seed=40)
    x, a, theta = x.to(x_dtype), a.to(x_dtype), theta.to(theta_dtype)
    if device.type == "cuda" and x_dtype == torch.float64:
        with pytest.raises(RuntimeError, match="float64 x and a are CPU-only"):
            ops.attention_pool(x.cuda(), a.cuda(), theta.cuda())
        return
    g = torch.Generator().manual_seed(41)
    gp = torch.randn(shape[:2], generator=g).to(x_dtype)
    gm = torch.randn((shape[0],) + shape[2:], generator=g).to(x_dtype)
    ours = _forward_and_grads(*(t.to(device) for t in (x, a, theta, gp, gm)))
    for t, want in zip(ours, (x_dtype,) * 4 + (theta_dtype,)):
        assert t.dtype == want and t.device.type == device.type
    # The reference in the accumulation type of x (theta rounded to theta_dtype first).
    acc = torch.float64 if x_dtype == torch.float64 else torch.float32
    xs, as_, ts = (t.to(acc).requires_grad_(True) for t in (x, a, theta))
    rp, rm = ref.attention_pool(xs, as_, ts, True)
    ((rp * gp.to(acc)).sum() + (rm * gm.to(acc)).sum()).backward()
    want = (rp.detach(), rm.detach(), xs.grad, as_.grad, ts.grad)
    low = x_dtype in (torch.bfloat16, torch.float16) or theta_dtype in (torch.bfloat16, torch.float16)
    tol = 2e-2 if low else (1e-10 if acc == torch.float64 and theta_dtype == torch.float64 else 1e-5)
    for o, w in zip(ours, want):
        assert_close_to_scale(o.cpu(), w, tol)
    if device.type == "cuda":
        cpu = _forward_and_grads(x, a, theta, gp, gm)
        for o, c in zip(ours, cpu):
            assert o.dtype == c.dtype
            assert_close_to_scale(o.cpu(), c, 2e-2 if low else 1e-5)


def _same_device(got, device):
    """got is `device`; a device without an index means the current one of its type."""
    want = torch.device(device)
    if want.index is None:
        return got.type == want.type and got.index in (None, torch.cuda.current_device())
    return got == want


def _cuda_vs_cpu(x, a, theta, gp, gm, tol, device="cuda"):
    """Forward (both outputs) and the gradients on `device` equal the CPU's."""
    cpu = _forward_and_grads(x, a, theta, gp, gm)
    dev = _forward_and_grads(*(t.to(device) for t in (x, a, theta, gp, gm)))
    for c, d in zip(cpu, dev):
        assert _same_device(d.device, device) and d.dtype == c.dtype
        assert_close_to_scale(d.cpu(), c, tol)


def _sms():
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


@requires_cuda
def test_cuda_grid_stride_past_one_grid_rows_and_channels():
    """More rows than one grid of the segment kernels holds (sms * 16 blocks x 8 warps x 32
    rows) and more channels than one grid of the theta-gradient kernel (sms * 8 blocks x 32
    channels): the grid-stride loops must cover the rest."""
    sms = _sms()
    L = sms * 8 * 32 + 37
    B = 17  # B * L > sms * 16 * 8 * 32 rows
    assert B * L > sms * 16 * 8 * 32
    x, a, theta = attention_pool_inputs(B, L, 1, 3, seed=42)  # 3 pixels: packs cross rows
    g = torch.Generator().manual_seed(43)
    gp = torch.randn(B, L, generator=g)
    gm = torch.randn(B, 1, 3, generator=g)
    _cuda_vs_cpu(x, a, theta, gp, gm, 1e-5)


@requires_cuda
def test_cuda_grid_stride_past_one_grid_mean_attention():
    """More pixels than one grid of the mean-attention kernel covers (capped_blocks: sms * 32
    blocks of 256 threads)."""
    sms = _sms()
    B, L, H = 2, 3, 64
    W = -(-(sms * 32 * 256 // B + 1000) // H)
    assert B * H * W > sms * 32 * 256 and H * W < 2 ** 25
    x, a, theta = attention_pool_inputs(B, L, H, W, seed=44)
    g = torch.Generator().manual_seed(45)
    gp = torch.randn(B, L, generator=g)
    gm = torch.randn(B, H, W, generator=g)
    _cuda_vs_cpu(x, a, theta, gp, gm, 1e-5)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 37, 7, 7), (2, 5, 3, 1), (1, 70, 2, 3), (2, 40, 9, 11)])
def test_cuda_backward_scalar_path_with_grad_mean(dtype, shape):
    """x and a one element off a 16-byte boundary: the kernels take the scalar (VEC = 1) path,
    backward with the mean-attention gradient included; the values must equal the CPU's."""
    x, a, theta = attention_pool_inputs(*shape, dtype=dtype, seed=46)
    g = torch.Generator().manual_seed(47)
    gp = torch.randn(shape[:2], generator=g).to(dtype)
    gm = torch.randn((shape[0],) + shape[2:], generator=g).to(dtype)

    def shifted(t):
        out = torch.empty(t.numel() + 1, dtype=dtype, device="cuda")[1:].view(t.shape)
        return out.copy_(t)

    xs, as_ = shifted(x), shifted(a)
    assert xs.data_ptr() % 16 != 0 and as_.data_ptr() % 16 != 0 and xs.is_contiguous()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    cpu = _forward_and_grads(x, a, theta, gp, gm)
    # The ops called directly: autograd would save clones (16-byte aligned) of xs and as_.
    pooled, mean = torch.ops.lusscore.attention_pool(xs, as_, theta.cuda(), True)
    assert_close_to_scale(pooled.cpu(), cpu[0], tol)
    assert_close_to_scale(mean.cpu(), cpu[1], tol)
    for compute_grad_x in (True, False):  # both GRAD_X instantiations of the scalar kernel
        grad_x, grad_a, grad_theta = torch.ops.lusscore.attention_pool_backward(
            gp.cuda(), gm.cuda(), xs, as_, theta.cuda(), compute_grad_x)
        if compute_grad_x:
            assert_close_to_scale(grad_x.cpu(), cpu[2], 2 * tol)
        else:
            assert grad_x.numel() == 0
        assert_close_to_scale(grad_a.cpu(), cpu[3], 2 * tol)
        assert_close_to_scale(grad_theta.cpu(), cpu[4], 2 * tol)


@requires_two_gpus
def test_cuda_non_default_device():
    """Inputs on cuda:1 while cuda:0 is current: outputs and gradients land on cuda:1 and
    equal the CPU's."""
    assert torch.cuda.current_device() == 0
    shape = (3, 37, 7, 7)
    x, a, theta = attention_pool_inputs(*shape, seed=48)
    g = torch.Generator().manual_seed(49)
    gp = torch.randn(shape[:2], generator=g)
    gm = torch.randn((shape[0],) + shape[2:], generator=g)
    _cuda_vs_cpu(x, a, theta, gp, gm, 1e-5, device="cuda:1")
    assert torch.cuda.current_device() == 0


def test_pixel_limit(device):
    """H*W must stay below 2^25 on both devices (checked before any data is read, so an
    expanded view costs nothing)."""
    x = torch.zeros(1, 1, 1, 1, device=device).expand(1, 2, 2 ** 13, 2 ** 12)
    theta = torch.zeros(2, device=device)
    with pytest.raises(RuntimeError, match=r"fewer than 2\^25 pixels per map, got H\*W = 33554432"):
        ops.attention_pool(x, x, theta)
    with pytest.raises(RuntimeError, match=r"fewer than 2\^25 pixels per map"):
        torch.ops.lusscore.attention_pool_backward(torch.ones(1, 2, device=device), None, x, x,
                                                   theta, True)


def test_errors(device):
    x, a, theta = attention_pool_inputs(2, 4, 3, 3, device=device)
    with pytest.raises(RuntimeError, match="4 dimensions"):
        ops.attention_pool(x[0], a[0], theta)
    with pytest.raises(RuntimeError, match="a must have the shape of x"):
        ops.attention_pool(x, a[:, :3], theta)
    with pytest.raises(RuntimeError, match="a must have the dtype of x"):
        ops.attention_pool(x, a.double(), theta)
    with pytest.raises(RuntimeError, match="theta must have L = 4"):
        ops.attention_pool(x, a, theta[:3])
    with pytest.raises(RuntimeError, match="x must have dtype in"):
        ops.attention_pool(x.int(), a.int(), theta)
    with pytest.raises(RuntimeError, match="grad_pooled must have shape"):
        torch.ops.lusscore.attention_pool_backward(torch.ones(2, 3, device=device), None, x, a, theta, True)
    with pytest.raises(RuntimeError, match="grad_mean_attention must have shape"):
        torch.ops.lusscore.attention_pool_backward(torch.ones(2, 4, device=device),
                                                   torch.ones(2, 3, 4, device=device), x, a, theta, True)


@requires_cuda
def test_errors_mixed_devices():
    x, a, theta = attention_pool_inputs(2, 4, 3, 3)
    with pytest.raises(RuntimeError, match="same device"):
        ops.attention_pool(x.cuda(), a, theta)
    with pytest.raises(RuntimeError, match="same device"):
        ops.attention_pool(x.cuda(), a.cuda(), theta)


def test_compiles_fullgraph():
    x, a, theta = attention_pool_inputs(2, 6, 4, 5, seed=11, requires_grad=True)

    def f(x, a, theta):
        pooled, mean = ops.attention_pool(x, a * 2, theta, True)
        return (pooled.square().sum() + mean.sum()) * 0.5

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x, a, theta)
    grads = torch.autograd.grad(out, (x, a, theta))
    want_out = f(x, a, theta)
    want = torch.autograd.grad(want_out, (x, a, theta))
    torch.testing.assert_close(out, want_out)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w)


def test_scaled_tolerance_rejects_zero_gradients():
    """The low-precision comparisons above must fail for an all-zero result (a fixed atol of
    0.1 passed it: bf16 gradients here are about 1e-3)."""
    x, a, theta = attention_pool_inputs(3, 37, 7, 7, dtype=torch.bfloat16, seed=9)
    gp = torch.randn(3, 37).to(torch.bfloat16)
    grads = _grads(ops.attention_pool, x, a, theta, gp)
    for g in grads[:2]:
        assert g.abs().max() < 0.1  # small enough that a fixed atol of 0.1 would not notice
        with pytest.raises(AssertionError):
            assert_close_to_scale(torch.zeros_like(g), g, 2e-2)
    want = _grads(ref.attention_pool, x.float(), a.float(), theta.float(), gp.float())
    for g, w in zip(grads, want):  # and the bf16 op passes it against fp32 eager
        assert_close_to_scale(g, w, 2e-2)


CPU_LEVELS = ("generic", "avx2", "avx512")  # narrowest first


@pytest.mark.parametrize("level", CPU_LEVELS)
def test_cpu_isa_levels(monkeypatch, level):
    """Each ISA level of the CPU float kernels (LUSSCORE_ATTENTION_POOL_CPU_KERNEL forces one,
    read at every call) matches the float64 reference, forward and backward, with and without
    the mean attention, in every floating dtype; a level this CPU lacks is an error naming it."""
    from lusscore._build import load_extension
    level_now = load_extension().attention_pool_cpu_kernel
    monkeypatch.delenv("LUSSCORE_ATTENTION_POOL_CPU_KERNEL", raising=False)
    widest = level_now()
    monkeypatch.setenv("LUSSCORE_ATTENTION_POOL_CPU_KERNEL", level)
    x, a, theta = attention_pool_inputs(2, 40, 9, 11, dtype=torch.float32, seed=7)
    if CPU_LEVELS.index(level) > CPU_LEVELS.index(widest):
        with pytest.raises(RuntimeError, match=f"LUSSCORE_ATTENTION_POOL_CPU_KERNEL={level}"):
            ops.attention_pool(x, a, theta)
        return
    assert level_now() == level
    g = torch.Generator().manual_seed(8)
    gp, gm = torch.randn(2, 40, generator=g), torch.randn(2, 9, 11, generator=g)
    want = _grads(ref.attention_pool, x.double(), a.double(), theta.double(), gp.double(), gm.double())
    want_out = ref.attention_pool(x.double(), a.double(), theta.double(), True)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)):
        xs, as_ = x.to(dtype), a.to(dtype)
        pooled, mean = ops.attention_pool(xs, as_, theta, True)
        torch.testing.assert_close(pooled.double(), want_out[0], atol=tol, rtol=tol)
        torch.testing.assert_close(mean.double(), want_out[1], atol=tol, rtol=tol)
        for gm_used in (None, gm):
            got = _grads(ops.attention_pool, xs, as_, theta, gp.to(dtype),
                         gm_used.to(dtype) if gm_used is not None else None)
            expect = want if gm_used is not None else _grads(
                ref.attention_pool, x.double(), a.double(), theta.double(), gp.double())
            for o, w in zip(got, expect):
                torch.testing.assert_close(o.double(), w, atol=tol * 10, rtol=tol * 10)
