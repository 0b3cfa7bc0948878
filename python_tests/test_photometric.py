"""The batched photometric augmentation against torchvision's per-image operations."""
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from lusscore.data.photometric import (BLUR, BRIGHTNESS, CONTRAST, GRAY, HUE, INVERT, JITTER,
                                       N_UNIFORMS, ORDER, SATURATION, SIGMA, PhotometricAugment)
import lusscore.ops as ops
import lusscore.reference.photometric as ref
from lusscore.reference.photometric import (adjust_brightness, adjust_contrast, adjust_hue,
                                            adjust_saturation, gaussian_blur)
from lusscore.data.views import MultiCropTransform


def crops(n=6, size=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


@pytest.mark.parametrize("ours, theirs", [(adjust_brightness, TF.adjust_brightness),
                                          (adjust_contrast, TF.adjust_contrast),
                                          (adjust_saturation, TF.adjust_saturation)])
def test_jitter_ops_match_torchvision_per_image(ours, theirs):
    x = crops()
    factors = torch.tensor([0.2, 0.5, 1.0, 1.3, 1.8, 0.0])
    got = ours(x.clone(), factors)
    for i in range(len(x)):
        torch.testing.assert_close(got[i], theirs(x[i], float(factors[i])), atol=1e-6, rtol=0)


def test_hue_matches_torchvision_per_image():
    x = crops(8)
    x[0] = 0.5  # grey: no hue
    x[1, :, :4] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)  # pure red, at the wrap-around
    shifts = torch.tensor([0.1, -0.2, 0.2, 0.0, -0.05, 0.13, -0.17, 0.5])
    got = adjust_hue(x.clone(), shifts)
    for i in range(len(x)):
        torch.testing.assert_close(got[i], TF.adjust_hue(x[i], float(shifts[i])), atol=2e-6, rtol=0)


def test_blur_matches_torchvision_per_image():
    x = crops(4, size=24)
    sigmas = torch.tensor([0.1, 0.7, 1.3, 2.0])
    got = gaussian_blur(x, sigmas, 13)
    for i in range(len(x)):
        want = TF.gaussian_blur(x[i], [13, 13], [float(sigmas[i])] * 2)
        torch.testing.assert_close(got[i], want, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="13-tap kernel"):
        gaussian_blur(crops(1, size=6), sigmas[:1], 13)


def one_crop_with_torchvision(aug: PhotometricAugment, x, u):
    """The recipe applied to one crop with torchvision's functional ops, from the same draws."""
    lo, hi = aug.factor_range
    if u[JITTER] < aug.color_p:
        ops = [lambda t: TF.adjust_brightness(t, lo + (hi - lo) * float(u[BRIGHTNESS])),
               lambda t: TF.adjust_contrast(t, lo + (hi - lo) * float(u[CONTRAST])),
               lambda t: TF.adjust_saturation(t, lo + (hi - lo) * float(u[SATURATION])),
               lambda t: TF.adjust_hue(t, aug.hue_range[0] + (aug.hue_range[1] - aug.hue_range[0])
                                       * float(u[HUE]))]
        for k in u[ORDER].argsort().tolist():
            x = ops[k](x)
    if u[GRAY] < aug.grayscale_p:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if u[INVERT] < aug.invert_p:
        x = 1.0 - x
    if u[BLUR] < aug.blur_p:
        sigma = aug.blur_sigma[0] + (aug.blur_sigma[1] - aug.blur_sigma[0]) * float(u[SIGMA])
        x = TF.gaussian_blur(x, [aug.kernel_size] * 2, [sigma, sigma])
    return x


def test_batch_matches_the_recipe_crop_by_crop():
    torch.manual_seed(0)
    aug = PhotometricAugment(jitter_strength=1.0, color_p=0.8, grayscale_p=0.3, blur_p=0.5,
                             invert_p=0.3)
    x = (crops(40, size=16) * 255).round().to(torch.uint8)
    u = torch.stack([aug.draw() for _ in range(len(x))])
    got = aug.apply(x, u)
    assert got.dtype == torch.float32 and got.shape == x.shape
    assert float(got.min()) >= 0 and float(got.max()) <= 1
    for i in range(len(x)):
        want = one_crop_with_torchvision(aug, x[i].float() / 255, u[i])
        torch.testing.assert_close(got[i], want, atol=2e-5, rtol=0)
    # Every branch was taken by some crop and skipped by another.
    for col, p in ((JITTER, 0.8), (GRAY, 0.3), (INVERT, 0.3), (BLUR, 0.5)):
        taken = u[:, col] < p
        assert bool(taken.any()) and not bool(taken.all())


def test_draws_are_independent_of_the_settings():
    torch.manual_seed(5)
    a = PhotometricAugment().draw()
    torch.manual_seed(5)
    b = PhotometricAugment(color_p=0, blur_p=0, invert_p=0.5).draw()
    assert a.shape == (N_UNIFORMS,) and torch.equal(a, b)


def test_nothing_drawn_changes_nothing_and_bad_shapes_are_named():
    aug = PhotometricAugment(color_p=0, grayscale_p=0, blur_p=0)
    x = crops(3)
    torch.testing.assert_close(aug.apply(x, torch.rand(3, N_UNIFORMS)), x)
    with pytest.raises(ValueError, match=r"RGB crops \(N, 3, H, W\)"):
        aug.apply(x[:, :1], torch.rand(3, N_UNIFORMS))
    with pytest.raises(ValueError, match="expected uniforms"):
        aug.apply(x, torch.rand(2, N_UNIFORMS))


def test_collate_augments_each_crop_as_drawn():
    torch.manual_seed(1)
    t = MultiCropTransform([24, 16], [1, 1], [0.5, 0.2], [1.0, 0.5], grayscale_p=0.5)
    image = (crops(1, size=40)[0] * 255).to(torch.uint8)
    samples = [t(image) for _ in range(4)]
    batch = t.collate([(s, i) for i, s in enumerate(samples)])
    for k, size in enumerate((24, 16)):
        assert batch.images[k].shape == (4, 3, size, size)
        for i, s in enumerate(samples):
            want = t.photometric.apply(s.crops[k][None], s.photometric[k][None])
            torch.testing.assert_close(batch.images[k][i], ((want - t.mean) / t.std)[0])


# ---- The photometric_augment op against its reference.

def op_inputs(n=12, h=17, w=23, dtype=torch.float32, seed=3):
    """Crops and parameters that take every branch: each op first and last, grey crops,
    saturated channels, no jitter, gray, invert and blur each on and off."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, h, w, generator=g)
    x[0] = 0.5
    x[1, 0] = 1.0
    x[2, :, :3] = 0.0
    if dtype == torch.uint8:
        x = (x * 255).round().to(torch.uint8)
    factors = torch.cat([0.2 + 1.6 * torch.rand(n, 3, generator=g),
                         0.4 * torch.rand(n, 1, generator=g) - 0.2], dim=1)
    factors[3, :3] = 0.0
    order = torch.stack([torch.randperm(4, generator=g) for _ in range(n)])
    flags = torch.rand(n, 3, generator=g) < torch.tensor([0.8, 0.3, 0.3])
    flags[:4, 0] = True
    flags[4] = torch.tensor([False, True, True])
    sigma = torch.where(torch.rand(n, generator=g) < 0.5, 0.1 + 1.9 * torch.rand(n, generator=g), 0.0)
    sigma[5], sigma[6] = 2.0, 0.0
    return x, factors, order, flags, sigma


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
@pytest.mark.parametrize("h, w, kernel_size", [(17, 23, 13), (48, 48, 13), (8, 9, 5), (1, 1, 1)])
def test_op_matches_reference(dtype, h, w, kernel_size):
    args = op_inputs(h=h, w=w, dtype=dtype)
    got = ops.photometric_augment(*args, kernel_size)
    want = ref.photometric_augment(*args, kernel_size)
    assert got.dtype == torch.float32 and got.shape == args[0].shape and got.is_contiguous()
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    assert not torch.equal(got, args[0].float() / (255 if dtype == torch.uint8 else 1))


@pytest.mark.parametrize("level", ("generic", "avx2", "avx512"))
def test_op_cpu_isa_levels(monkeypatch, level):
    """LUSSCORE_PHOTOMETRIC_CPU_KERNEL forces a level (AVX-512 CPUs run the AVX2 code); a
    level this CPU lacks is an error naming it."""
    monkeypatch.setenv("LUSSCORE_PHOTOMETRIC_CPU_KERNEL", level)
    args = op_inputs(seed=9)
    try:
        got = ops.photometric_augment(*args, 13)
    except RuntimeError as e:
        assert f"LUSSCORE_PHOTOMETRIC_CPU_KERNEL={level}" in str(e)
        assert level != "generic"
        return
    torch.testing.assert_close(got, ref.photometric_augment(*args, 13), atol=2e-5, rtol=0)


def test_op_non_contiguous_empty_and_opcheck():
    x, factors, order, flags, sigma = op_inputs(n=8)
    wide = torch.rand(8, 3, 17, 46)
    wide[..., ::2] = x
    strided = wide[..., ::2]
    assert not strided.is_contiguous()
    torch.testing.assert_close(ops.photometric_augment(strided, factors, order, flags, sigma, 13),
                               ops.photometric_augment(x, factors, order, flags, sigma, 13))
    empty = ops.photometric_augment(x[:0], factors[:0], order[:0], flags[:0], sigma[:0], 13)
    assert empty.shape == (0, 3, 17, 23) and empty.dtype == torch.float32
    torch.library.opcheck(torch.ops.lusscore.photometric_augment.default,
                          (x, factors, order, flags, sigma, 13))


def test_op_reference_mode_runs_the_reference():
    args = op_inputs(seed=4)
    with ops.use_reference():
        got = ops.photometric_augment(*args, 13)
    assert torch.equal(got, ref.photometric_augment(*args, 13))


def test_op_errors_name_the_argument():
    x, factors, order, flags, sigma = op_inputs(n=8, h=10, w=10)
    bad_order = order.clone()
    bad_order[2] = torch.tensor([0, 1, 1, 3])
    with pytest.raises(RuntimeError, match=r"order\[2\] must be a permutation"):
        ops.photometric_augment(x, factors, bad_order, flags, sigma, 13)
    with pytest.raises(RuntimeError, match="factors must be"):
        ops.photometric_augment(x, factors[:, :3], order, flags, sigma, 13)
    with pytest.raises(RuntimeError, match="crops must"):
        ops.photometric_augment(x.double(), factors, order, flags, sigma, 13)
    with pytest.raises(RuntimeError, match="kernel_size must be odd"):
        ops.photometric_augment(x, factors, order, flags, sigma, 12)
    sigma = torch.full((8,), 1.0)
    with pytest.raises(RuntimeError, match="13-tap blur needs crops over 6 px"):
        ops.photometric_augment(x[..., :5, :5], factors, order, flags, sigma, 13)
