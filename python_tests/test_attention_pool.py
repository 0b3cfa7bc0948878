"""attention_pool op against its reference: forward (both outputs), gradients, opcheck,
CPU/CUDA parity, low precision, layouts, empty inputs, errors and torch.compile."""
import pytest
import torch

import lusscore.ops as ops
from conftest import requires_cuda
from lusscore.reference import attention_pool as ref
from samples import assert_close_to_scale, attention_pool_inputs

SHAPES = [(2, 5, 3, 4), (3, 7, 7, 7), (2, 33, 1, 1), (1, 3, 1, 5), (2, 40, 9, 11), (1, 70, 2, 3)]


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
    with pytest.raises(RuntimeError, match="x must have dtype in"):
        ops.attention_pool(x, a, theta)


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
