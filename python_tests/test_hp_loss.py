"""hp_contrastive_loss against its reference: Philox known answers, forward and backward over
several tiles, rho and lam, gradcheck, opcheck, low precision, layouts, empty inputs, errors,
CPU/CUDA parity."""
import pytest
import torch

import lusscore.ops as ops
from conftest import requires_cuda
from lusscore.reference import hp_loss as ref


def hp_inputs(n, d=6, d_f=8, d_s=5, dtype=torch.float64, seed=0, device="cpu", lattice=False):
    """Codes z (normalised) and features f, s with thresholds phi = each row's best match in a
    random pool (as HP's reference pools), so that every anchor has a few positives.

    lattice: f and s on a grid of quarters and thresholds halfway between grid values, so the
    similarities are exact in fp32 and no mask depends on rounding (exact CPU/CUDA parity)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)

    def features(dim):
        if lattice:
            x = torch.randint(-2, 3, (n, dim), generator=g).double() / 2
            pool = torch.randint(-2, 3, (16, dim), generator=g).double() / 2
            phi = (x @ pool.T).max(1).values + 0.125
            return x, phi
        x = torch.nn.functional.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=1)
        pool = torch.nn.functional.normalize(torch.randn(24, dim, generator=g, dtype=torch.float64), dim=1)
        return x, (x @ pool.T).max(1).values

    f, phi_f = features(d_f)
    s, phi_s = features(d_s)
    return [t.to(dtype=dtype, device=device) for t in (z, f, phi_f, s, phi_s)]


def _loss_and_grad(fn, inputs, args, grad_out):
    z = inputs[0].detach().clone().requires_grad_(True)
    loss, weight = fn(z, *inputs[1:], *args)
    (loss * grad_out).sum().backward()
    return loss.detach(), weight, z.grad


def test_philox_known_answers():
    """Random123's published Philox4x32-10 known-answer vectors."""
    cases = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for counter, key, want in cases:
        got = ref.philox4x32_10(tuple(torch.tensor(c) for c in counter), key)
        assert [int(w) for w in got] == list(want)


def test_draws_have_rate_rho_and_depend_on_seed():
    i = torch.arange(300)[:, None]
    j = torch.arange(300)[None]
    draws = ref.denominator_draws(7, i, j)
    for rho in (0.02, 0.25, 0.5):
        rate = ((draws >> 8) < ref.keep_threshold(rho)).double().mean().item()
        assert abs(rate - rho) < 4 * (rho * (1 - rho) / draws.numel()) ** 0.5 + 1e-4
    assert not torch.equal(draws, ref.denominator_draws(8, i, j))
    assert not torch.equal(draws, draws.T)  # keyed by the ordered pair


@pytest.mark.parametrize("n", [1, 2, 7, 33, 530])
@pytest.mark.parametrize("rho,lam", [(0.0, 1.0), (0.3, 0.5), (1.0, 0.0), (0.02, 1.0)])
def test_matches_reference(device, n, rho, lam):
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    inputs = hp_inputs(n, dtype=dtype, seed=n, device=device)
    grad_out = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=dtype).to(device)
    args = (0.2, rho, lam, 12345)
    loss, weight, grad = _loss_and_grad(ops.hp_contrastive_loss, inputs, args, grad_out)
    want_loss, want_weight, want_grad = _loss_and_grad(ref.hp_contrastive_loss, inputs, args, grad_out)
    assert loss.dtype == dtype and weight.dtype == dtype and grad.dtype == dtype
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(weight, want_weight, atol=0, rtol=0)
    torch.testing.assert_close(loss, want_loss, atol=tol, rtol=tol)
    torch.testing.assert_close(grad, want_grad, atol=tol, rtol=tol)


def test_several_tiles_in_both_directions():
    """N spans three CPU tiles (512) with a ragged last one."""
    inputs = hp_inputs(1100, d=16, seed=3)
    grad_out = torch.rand(1100, dtype=torch.float64)
    args = (0.1, 0.05, 0.7, 99)
    ours = _loss_and_grad(ops.hp_contrastive_loss, inputs, args, grad_out)
    want = _loss_and_grad(ref.hp_contrastive_loss, inputs, args, grad_out)
    for o, w in zip(ours, want):
        torch.testing.assert_close(o, w, atol=1e-10, rtol=1e-10)
    assert (ours[1] > 0).float().mean() > 0.5  # most anchors have positives: the test means something


def test_semantics_by_hand():
    """Three anchors with hand-picked features: positives, the lam weight and rho = 1."""
    z = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]],
                                                   dtype=torch.float64), dim=1)
    f = torch.tensor([[1.0], [1.0], [-1.0]], dtype=torch.float64)  # 0~1 agnostic positives
    s = torch.tensor([[1.0], [-1.0], [1.0]], dtype=torch.float64)  # 0~2 specific positives
    phi = torch.full((3,), 0.5, dtype=torch.float64)
    tau, lam = 0.5, 0.25
    loss, weight = ops.hp_contrastive_loss(z, f, phi, s, phi, tau, 1.0, lam, 0)
    x = z @ z.T / tau
    torch.testing.assert_close(weight, torch.tensor([1.25, 1.0, 0.25], dtype=torch.float64))
    lse = [torch.logsumexp(x[i, [j for j in range(3) if j != i]], 0) for i in range(3)]
    want = torch.stack([lse[0] - (x[0, 1] + lam * x[0, 2]) / 1.25, lse[1] - x[1, 0],
                        lse[2] - x[2, 0]])
    torch.testing.assert_close(loss, want)
    # rho = 0: the denominators hold the positives only.
    loss0, _ = ops.hp_contrastive_loss(z, f, phi, s, phi, tau, 0.0, lam, 0)
    torch.testing.assert_close(loss0[1], torch.zeros((), dtype=torch.float64), atol=1e-12, rtol=0)


def test_anchor_without_positives_has_zero_loss_and_gradient():
    z, f, phi_f, s, phi_s = hp_inputs(6, seed=4)
    phi_f[2] = phi_s[2] = 10.0  # anchor 2 pairs with no one: phi_j could still pull j in
    f[2] = -f[2]
    big = torch.full((6,), 10.0, dtype=torch.float64)
    z.requires_grad_(True)
    loss, weight = ops.hp_contrastive_loss(z, f, big, s, big, 0.1, 0.5, 1.0, 0)
    assert (weight == 0).all() and (loss == 0).all()
    loss.sum().backward()
    assert (z.grad == 0).all()


def test_gradcheck_float64():
    z, f, phi_f, s, phi_s = hp_inputs(9, d=4, seed=5)
    z.requires_grad_(True)
    for rho in (0.0, 0.5, 1.0):
        assert torch.autograd.gradcheck(
            lambda t: ops.hp_contrastive_loss(t, f, phi_f, s, phi_s, 0.3, rho, 0.6, 11)[0], (z,))


def test_opcheck(device):
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    z, f, phi_f, s, phi_s = hp_inputs(10, dtype=dtype, seed=6, device=device)
    z.requires_grad_(True)
    args = (z, f, phi_f, s, phi_s, 0.2, 0.4, 0.5, 3)
    torch.library.opcheck(torch.ops.lusscore.hp_contrastive_loss.default, args)
    loss, weight, lse = torch.ops.lusscore.hp_contrastive_loss(*args)
    torch.library.opcheck(torch.ops.lusscore.hp_contrastive_loss_backward.default,
                          (torch.ones_like(loss), z.detach(), f, phi_f, s, phi_s, weight, lse,
                           0.2, 0.4, 0.5, 3))


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_noncontiguous_inputs(device, layout):
    inputs = hp_inputs(40, device=device, dtype=torch.float32, seed=7, lattice=True)
    if layout == "transposed":
        strided = [t.T.contiguous().T if t.dim() == 2 else t for t in inputs]
    else:
        strided = [torch.stack([t, torch.zeros_like(t)], dim=-1)[..., 0] for t in inputs]
    assert not strided[0].is_contiguous() and not strided[1].is_contiguous()
    args = (0.2, 0.1, 1.0, 5)
    grad_out = torch.ones(40, device=device)
    for o, w in zip(_loss_and_grad(ops.hp_contrastive_loss, strided, args, grad_out),
                    _loss_and_grad(ops.hp_contrastive_loss, inputs, args, grad_out)):
        torch.testing.assert_close(o, w, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_fp32(device, dtype):
    """Low-precision inputs give exactly the fp32 computation on the rounded inputs; the
    gradient comes back in z's dtype."""
    inputs = [t.to(dtype) for t in hp_inputs(50, device=device, dtype=torch.float32, seed=8)]
    args = (0.1, 0.3, 1.0, 2)
    grad_out = torch.ones(50, device=device)
    loss, weight, grad = _loss_and_grad(ops.hp_contrastive_loss, inputs, args, grad_out)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    want = _loss_and_grad(ops.hp_contrastive_loss, [t.float() for t in inputs], args, grad_out)
    torch.testing.assert_close(loss, want[0], atol=0, rtol=0)
    torch.testing.assert_close(weight, want[1], atol=0, rtol=0)
    torch.testing.assert_close(grad, want[2].to(dtype), atol=0, rtol=0)


def test_mixed_dtypes(device):
    z, f, phi_f, s, phi_s = hp_inputs(30, device=device, dtype=torch.float32, seed=9, lattice=True)
    mixed = ops.hp_contrastive_loss(z, f.half(), phi_f.double(), s.bfloat16(), phi_s, 0.2, 0.2, 1.0, 1)
    plain = ops.hp_contrastive_loss(z, f.half().float(), phi_f, s.bfloat16().float(), phi_s, 0.2, 0.2, 1.0, 1)
    for m, p in zip(mixed, plain):
        torch.testing.assert_close(m, p, atol=0, rtol=0)


@pytest.mark.parametrize("n", [0, 1])
def test_empty_and_single(device, n):
    z, f, phi_f, s, phi_s = hp_inputs(n, device=device, dtype=torch.float32)
    z.requires_grad_(True)
    loss, weight = ops.hp_contrastive_loss(z, f, phi_f, s, phi_s, 0.1, 0.5, 1.0, 0)
    assert loss.shape == (n,) and weight.shape == (n,)
    assert (loss == 0).all() and (weight == 0).all()
    loss.sum().backward()
    assert z.grad.shape == z.shape and (z.grad == 0).all()


def test_reference_mode_gives_the_reference():
    inputs = hp_inputs(20, seed=10)
    with ops.use_reference():
        got = ops.hp_contrastive_loss(*inputs, 0.2, 0.3, 1.0, 4)
    want = ref.hp_contrastive_loss(*inputs, 0.2, 0.3, 1.0, 4)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=0, rtol=0)


def test_seed_changes_only_the_sampled_denominator():
    inputs = hp_inputs(60, seed=11)
    a = ops.hp_contrastive_loss(*inputs, 0.2, 0.3, 1.0, 1)
    b = ops.hp_contrastive_loss(*inputs, 0.2, 0.3, 1.0, 2)
    assert torch.equal(a[1], b[1]) and not torch.equal(a[0], b[0])
    full = [ops.hp_contrastive_loss(*inputs, 0.2, 1.0, 1.0, seed)[0] for seed in (1, 2)]
    assert torch.equal(full[0], full[1])


@pytest.mark.parametrize("change,message", [
    (lambda a: a.update(z=a["z"][:, None]), r"z \(N, d\) must have 2 dimensions"),
    (lambda a: a.update(f=a["f"][:-1]), "rows"),
    (lambda a: a.update(phi_s=a["phi_s"][:-1]), "rows"),
    (lambda a: a.update(z=a["z"].long()), "dtype"),
    (lambda a: a.update(tau=0.0), "tau must be a positive number"),
    (lambda a: a.update(rho=1.5), r"rho must lie in \[0, 1\]"),
    (lambda a: a.update(lam=-1.0), "lam must be a finite number >= 0"),
])
def test_errors_name_the_problem(change, message):
    z, f, phi_f, s, phi_s = hp_inputs(5, dtype=torch.float32)
    args = dict(z=z, f=f, phi_f=phi_f, s=s, phi_s=phi_s, tau=0.1, rho=0.5, lam=1.0, seed=0)
    change(args)
    with pytest.raises(RuntimeError, match=message):
        ops.hp_contrastive_loss(**args)


@requires_cuda
def test_device_mismatch_is_an_error():
    z, f, phi_f, s, phi_s = hp_inputs(5, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="device"):
        ops.hp_contrastive_loss(z.cuda(), f, phi_f, s, phi_s, 0.1, 0.5, 1.0, 0)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [5, 4099, 9000])
def test_cpu_cuda_parity(dtype, n):
    """Same masks and draws on both devices (lattice features: exact similarities), over
    several CUDA tiles (4096) and CPU tiles (512)."""
    inputs = [t.to(dtype) for t in hp_inputs(n, d=32, dtype=torch.float32, seed=12, lattice=True)]
    grad_out = torch.rand(n, generator=torch.Generator().manual_seed(3))
    args = (0.1, 0.02, 1.0, 2024)
    cpu = _loss_and_grad(ops.hp_contrastive_loss, inputs, args, grad_out)
    cuda = _loss_and_grad(ops.hp_contrastive_loss, [t.cuda() for t in inputs], args, grad_out.cuda())
    torch.testing.assert_close(cuda[1].cpu(), cpu[1], atol=0, rtol=0)
    torch.testing.assert_close(cuda[0].cpu(), cpu[0], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(cuda[2].cpu().float(), cpu[2].float(), atol=2e-4, rtol=2e-3)
