"""P2P loss on hand-made cases, and multi-crop views whose recorded geometry matches pixels."""
import pytest
import torch

from lusscore.data.photometric import N_UNIFORMS
from lusscore.data.views import (IMAGENET_MEAN, IMAGENET_STD, REFERENCE_STD, MultiCropSample,
                                 MultiCropTransform, collate_multicrop)
from lusscore.losses import P2PLoss, p2p_cosine_loss
from samples import overlap_boxes


# --- loss -----------------------------------------------------------------------------------

def test_identical_features_give_minus_one():
    v = torch.randn(3, 8, 4, 4)
    assert torch.allclose(p2p_cosine_loss(v, v, v, v), torch.tensor(-1.0))
    # Scale does not matter, orientation does.
    assert torch.allclose(p2p_cosine_loss(2 * v, 3 * v, v, v), torch.tensor(-1.0))
    assert torch.allclose(p2p_cosine_loss(-v, -v, v, v), torch.tensor(1.0))


def test_stop_gradient_on_targets():
    p1, p2 = torch.randn(2, 4, 3, 3, requires_grad=True), torch.randn(2, 4, 3, 3, requires_grad=True)
    v1, v2 = torch.randn(2, 4, 3, 3, requires_grad=True), torch.randn(2, 4, 3, 3, requires_grad=True)
    p2p_cosine_loss(p1, p2, v1, v2).backward()
    assert p1.grad.abs().sum() > 0 and p2.grad.abs().sum() > 0
    assert v1.grad is None and v2.grad is None


def test_reductions_count_invalid_pairs_as_zero():
    v = torch.randn(4, 8, 2, 2)
    zero = v.clone()
    zero[2:] = 0  # two pairs without overlap: zero features on both sides
    valid = torch.tensor([True, True, False, False])
    faithful = p2p_cosine_loss(zero, zero, zero, zero, valid)
    assert torch.allclose(faithful, torch.tensor(-0.5))  # half the pairs count as 0
    only_valid = p2p_cosine_loss(zero, zero, zero, zero, valid, valid_only=True)
    assert torch.allclose(only_valid, torch.tensor(-1.0))
    none = p2p_cosine_loss(zero, zero, zero, zero, torch.zeros(4, dtype=torch.bool), True)
    assert none.item() == 0.0
    with pytest.raises(ValueError, match="valid"):
        p2p_cosine_loss(v, v, v, v, None, valid_only=True)


def test_p2p_module_forward_backward():
    torch.manual_seed(0)
    loss_fn = P2PLoss(in_channels=16, hidden_dim=32, out_dim=8, size=5)
    assert isinstance(loss_fn.pixel_mlp[-1], torch.nn.BatchNorm2d)
    assert not loss_fn.pixel_mlp[-1].affine
    b1, b2, f1, f2 = overlap_boxes(6, seed=3)
    z1 = torch.randn(6, 16, 7, 7, requires_grad=True)
    z2 = torch.randn(6, 16, 7, 7, requires_grad=True)
    loss = loss_fn(z1, z2, b1, b2, f1, f2)
    assert loss.shape == () and -1.0 <= loss.item() <= 1.0
    loss.backward()
    assert z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0
    assert all(p.grad is not None for p in loss_fn.predictor.parameters())
    # Same crop and map in both views with an identity predictor: P(v1) = v2 -> -1; a
    # disjoint pair counts as 0 in the faithful mean and is left out with valid_only.
    loss_fn.predictor = torch.nn.Identity()
    z = torch.randn(2, 16, 7, 7)
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
    other = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 0.0, 10.0, 10.0]])
    flips = torch.zeros(2, dtype=torch.bool)
    assert torch.allclose(loss_fn(z, z, box, box, flips, flips), torch.tensor(-1.0))
    assert torch.allclose(loss_fn(z, z, box, other, flips, flips), torch.tensor(-0.5))
    loss_fn.valid_only = True
    assert torch.allclose(loss_fn(z, z, box, other, flips, flips), torch.tensor(-1.0))


# --- views ----------------------------------------------------------------------------------

def ramp_image(h=120, w=160):
    """Channel 0 = x, channel 1 = y (pixel-centre coordinates), channel 2 = 0."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32),
                            torch.arange(w, dtype=torch.float32), indexing="ij")
    return torch.stack([xs, ys, torch.zeros_like(xs)])


def plain_transform(**kw):
    return MultiCropTransform(color_p=0.0, grayscale_p=0.0, blur_p=0.0, mean=(0, 0, 0),
                              std=(1, 1, 1), **kw)


def test_recorded_boxes_and_flips_match_the_pixels():
    torch.manual_seed(0)
    t = plain_transform(size_crops=(32, 16), nmb_crops=(3, 3), min_scale_crops=(0.2, 0.05),
                        max_scale_crops=(1.0, 0.2))
    img = ramp_image()
    seen_flip = set()
    for _ in range(6):
        sample = t(img)
        assert len(sample.crops) == 6 and sample.boxes.shape == (6, 4)
        for crop, box, flip in zip(sample.crops, sample.boxes, sample.flips):
            left, top, width, height = box.tolist()
            s = crop.shape[-1]
            assert left >= 0 and top >= 0 and left + width <= 160 and top + height <= 120
            # Pixel centre c of the output samples input x = left + (c + 0.5) * width / s - 0.5.
            centres = (torch.arange(s, dtype=torch.float32) + 0.5) / s
            want_x = left + centres * width - 0.5
            want_y = top + centres * height - 0.5
            if flip:
                want_x = want_x.flip(0)
            inner = slice(2, s - 2)  # away from the antialias filter's border effects
            got_x, got_y = crop[0, s // 2, inner], crop[1, inner, s // 2]
            assert torch.allclose(got_x, want_x[inner], atol=0.1 * width / s + 0.05), (got_x, want_x)
            assert torch.allclose(got_y, want_y[inner], atol=0.1 * height / s + 0.05)
            seen_flip.add(bool(flip))
    assert seen_flip == {False, True}


def test_scale_ranges_and_collate():
    torch.manual_seed(1)
    t = plain_transform(size_crops=(24, 8), nmb_crops=(2, 2), min_scale_crops=(0.5, 0.05),
                        max_scale_crops=(1.0, 0.1))
    img = ramp_image(100, 100)
    samples = [t(img) for _ in range(5)]
    for s in samples:
        area = (s.boxes[:, 2] * s.boxes[:, 3]) / (100 * 100)
        assert (area[:2] >= 0.5 - 0.03).all() and (area[2:] <= 0.1 + 0.03).all()
    batch = collate_multicrop([(s, i) for i, s in enumerate(samples)])
    assert [tuple(x.shape) for x in batch.images] == [(5, 3, 24, 24)] * 2 + [(5, 3, 8, 8)] * 2
    assert [tuple(b.shape) for b in batch.boxes] == [(5, 4)] * 4
    assert [tuple(f.shape) for f in batch.flips] == [(5,)] * 4 and batch.flips[0].dtype == torch.bool
    assert torch.equal(batch.labels, torch.arange(5))
    assert torch.equal(batch.boxes[1][3], samples[3].boxes[1])
    assert [tuple(g.shape) for g in batch.by_size()] == [(10, 3, 24, 24), (10, 3, 8, 8)]
    with pytest.raises(ValueError, match="same length"):
        MultiCropTransform(size_crops=(224, 96), nmb_crops=(2,))
    with pytest.raises(ValueError, match="scale range"):
        MultiCropTransform(min_scale_crops=(0.0,))


def test_full_recipe_and_normalisation(tmp_path):
    from PIL import Image
    torch.manual_seed(2)
    pil = Image.fromarray((torch.rand(50, 70, 3) * 255).to(torch.uint8).numpy())
    transform = MultiCropTransform(size_crops=(32,), nmb_crops=(2,))
    sample = transform(pil)
    assert isinstance(sample, MultiCropSample)
    assert all(c.dtype == torch.uint8 and c.shape == (3, 32, 32) for c in sample.crops)
    assert sample.photometric.shape == (2, N_UNIFORMS)
    batch = transform.collate([sample])
    assert all(c.dtype == torch.float32 and c.shape == (1, 3, 32, 32) for c in batch.images)
    assert MultiCropTransform().std.flatten().tolist() == pytest.approx(IMAGENET_STD)
    quirk = MultiCropTransform(std_quirk=True).std.flatten().tolist()
    assert quirk == pytest.approx(REFERENCE_STD) and quirk[0] == pytest.approx(0.228)
    # Constant white image, no colour ops: the normalised value is (1 - mean) / std.
    white = torch.full((3, 20, 20), 255, dtype=torch.uint8)
    plain = MultiCropTransform(size_crops=(8,), color_p=0, grayscale_p=0, blur_p=0, std_quirk=True)
    out = plain.collate([plain(white)]).images[0][0]
    torch.testing.assert_close(out[0], torch.full((8, 8), (1 - 0.485) / 0.228))
    with pytest.raises(ValueError, match="RGB image"):
        plain(torch.zeros(1, 20, 20, dtype=torch.uint8))


def test_views_and_overlap_gather_align_the_same_pixels():
    # The crops of a coordinate ramp, sampled by overlap_gather with the recorded boxes and
    # flips, must show the same original-image coordinates in both views.
    import lusscore.ops as ops
    torch.manual_seed(3)
    t = plain_transform(size_crops=(48,), nmb_crops=(2,), min_scale_crops=(0.3,),
                        max_scale_crops=(1.0,))
    batch = collate_multicrop([t(ramp_image()) for _ in range(8)])
    g1, g2, valid = ops.overlap_gather(batch.images[0], batch.images[1], batch.boxes[0],
                                       batch.boxes[1], batch.flips[0], batch.flips[1], size=5,
                                       cell_centers=True)
    assert int(valid.sum()) >= 4
    scale = (torch.stack(batch.boxes)[..., 2:] / 48).max().item()  # input pixels per crop pixel
    diff = (g1 - g2)[valid][:, :2].abs().max().item()
    assert diff < 0.25 * scale + 0.1, diff
    # Ignoring the flips breaks the alignment wherever one view was mirrored.
    mixed = valid & (batch.flips[0] != batch.flips[1])
    assert bool(mixed.any()), "the seeded sample must mirror exactly one view of some pair"
    h1, h2, _ = ops.overlap_gather(batch.images[0], batch.images[1], batch.boxes[0],
                                   batch.boxes[1], torch.zeros_like(batch.flips[0]),
                                   torch.zeros_like(batch.flips[1]), size=5, cell_centers=True)
    assert (h1 - h2)[mixed][:, 0].abs().max().item() > 1.0


def test_augment_options_from_the_config():
    """`pretrain.augment` reaches the crops' photometric pipeline; mistakes are named."""
    from lusscore.data.views import augment_options
    assert augment_options(None) == {}
    opts = augment_options({"blur_p": 0.0, "color_p": 0.0, "grayscale_p": 0.0,
                            "blur_sigma": [0.1, 1.0]})
    assert opts["blur_sigma"] == (0.1, 1.0)
    # A flat image stays its colour with every photometric step off, and not with jitter on.
    image = torch.zeros(3, 40, 40, dtype=torch.uint8)
    image[0], image[1], image[2] = 200, 90, 30
    expected = (torch.tensor([200, 90, 30]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.manual_seed(0)

    def crops(**options):
        t = MultiCropTransform((32,), (2,), (0.5,), (1.0,), **{**opts, **options})
        return t.collate([t(image)]).images

    for crop in crops():
        assert torch.allclose(crop, expected[:, None, None].expand_as(crop), atol=1e-5)
    assert not any(torch.allclose(c, expected[:, None, None].expand_as(c), atol=1e-2)
                   for c in crops(color_p=1.0))
    assert all(torch.allclose(c[:, 0] * 0.229 + 0.485, c[:, 1] * 0.224 + 0.456, atol=1e-5)
               for c in crops(grayscale_p=1.0))  # grayscale: equal channels before normalisation
    flipped = (torch.tensor([55, 165, 225]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert all(torch.allclose(c, flipped[:, None, None].expand_as(c), atol=1e-5)
               for c in crops(invert_p=1.0))  # invert: 255 - every 8-bit value
    for bad, match in (({"hue": 0.1}, "unknown keys"), ({"blur_p": 1.5}, "blur_p"),
                       ({"blur_sigma": [2.0, 1.0]}, "blur_sigma"), ({"invert_p": -0.1}, "invert_p")):
        with pytest.raises(ValueError, match=match):
            augment_options(bad)
