"""PASS_p: PixPro's positive mask and pixel propagation against per-pixel loop references,
its loss, the momentum network, and pretrain.method pixpro in the pretraining stage."""
import pytest
import torch

from samples import multicrop_batch
from lusscore.config import load_config
from lusscore.losses.pass_loss import pixpro_options
from lusscore.losses.pixpro import (PixelPropagation, PixProBranch, momentum_at,
                                    pixpro_positive_mask, pixpro_regression_loss)
from lusscore.models.pass_models import PASSPretrainModel
from lusscore.reference import pixpro as ref
from lusscore.utils import LusscoreError

MODEL = {"arch": "resnet18", "width": 8, "output_stride": 16, "hidden_mlp": 32, "feat_dim": 16,
         "num_prototypes": 10}


def _crops(seed=0):
    g = torch.Generator().manual_seed(seed)
    boxes1 = torch.rand(6, 4, generator=g) * torch.tensor([40., 40., 80., 60.]) + torch.tensor([0, 0, 10, 10])
    boxes2 = torch.rand(6, 4, generator=g) * torch.tensor([40., 40., 80., 60.]) + torch.tensor([0, 0, 10, 10])
    boxes2[5] = torch.tensor([500., 500., 10., 10.])  # no overlap: no positive pair
    flips1 = torch.tensor([False, True, False, True, False, True])
    flips2 = torch.tensor([False, False, True, True, True, False])
    return boxes1, flips1, boxes2, flips2


@pytest.mark.parametrize("hw,threshold", [((4, 5), 0.7), ((3, 3), 1.5), ((6, 2), 0.3)])
def test_positive_mask_matches_the_per_pair_reference(hw, threshold):
    boxes1, flips1, boxes2, flips2 = _crops()
    got = pixpro_positive_mask(boxes1, flips1, boxes2, flips2, *hw, threshold)
    want = ref.positive_mask(boxes1, flips1, boxes2, flips2, *hw, threshold)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=0)
    assert got[5].sum() == 0 and got[:5].sum() > 0


def test_a_crop_and_its_mirror_pair_the_mirrored_bins():
    """The same box, one view mirrored: bin (r, c) of one is bin (r, w-1-c) of the other."""
    box = torch.tensor([[10., 20., 40., 40.]])
    mask = pixpro_positive_mask(box, torch.tensor([False]), box, torch.tensor([True]), 4, 4, 0.1)[0]
    want = torch.zeros(16, 16)
    for r in range(4):
        for c in range(4):
            want[r * 4 + c, r * 4 + 3 - c] = 1
    torch.testing.assert_close(mask, want, rtol=0, atol=0)


@pytest.mark.parametrize("gamma,layers", [(2.0, 1), (1.0, 0), (0.5, 2)])
def test_propagation_matches_the_per_pixel_reference(gamma, layers):
    torch.manual_seed(0)
    ppm = PixelPropagation(6, gamma, layers).double().eval()
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ppm(x), ref.propagate(x, ppm.transform(x), gamma))


def test_propagation_gradcheck():
    torch.manual_seed(0)
    ppm = PixelPropagation(4, 2.0, 1).double()
    x = torch.randn(2, 4, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ppm, (x,))


def test_regression_loss_is_minus_two_mean_cosine_over_positive_pairs():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 5, 2, 2), torch.randn(2, 5, 2, 2)
    mask = torch.zeros(2, 4, 4)
    mask[0, 0, 1] = mask[0, 2, 3] = mask[1, 1, 1] = 1
    p = torch.nn.functional.normalize(pred.flatten(2), dim=1)
    t = torch.nn.functional.normalize(target.flatten(2), dim=1)
    img0 = (p[0, :, 0] @ t[0, :, 1] + p[0, :, 2] @ t[0, :, 3]) / 2
    img1 = p[1, :, 1] @ t[1, :, 1]
    torch.testing.assert_close(pixpro_regression_loss(pred, target, mask), -2 * (img0 + img1) / 2,
                               rtol=1e-5, atol=1e-6)
    # Identical features on every positive pair: the minimum, -2.
    assert abs(float(pixpro_regression_loss(pred, pred, torch.eye(4).expand(2, 4, 4))) + 2) < 1e-5


def test_momentum_schedule_and_update():
    assert momentum_at(0.99, 0, 100) == pytest.approx(0.99)
    assert momentum_at(0.99, 100, 100) == pytest.approx(1.0)
    assert 0.99 < momentum_at(0.99, 50, 100) < 1.0
    model = PASSPretrainModel(MODEL, {"swav": 1.0}, pixpro=pixpro_options(
        {**load_config("demo")["pretrain"], "method": "pixpro"}))
    online = dict(model.backbone.named_parameters())
    target = dict(model.pixpro.momentum_backbone.named_parameters())
    assert all(not p.requires_grad for p in target.values())
    before = {k: v.clone() for k, v in target.items()}
    with torch.no_grad():
        for p in online.values():
            p.add_(1.0)
    model.pixpro.momentum_update(model.backbone, 0, 10)  # m = 0.99
    for k, p in target.items():
        torch.testing.assert_close(p, 0.99 * before[k] + 0.01 * online[k])




def test_pixpro_loss_trains_the_online_network_only():
    torch.manual_seed(0)
    branch_model = PASSPretrainModel(MODEL, {"swav": 1.0}, pixpro={"momentum": 0.99, "gamma": 2.0,
                                                                   "threshold": 0.7,
                                                                   "transform_layers": 1})
    batch = multicrop_batch()
    groups = batch.by_size()
    out = branch_model(groups)
    loss = branch_model.pixpro.loss(out["large_maps"], out["large_images"], batch.boxes[:2],
                                    batch.flips[:2])
    assert loss.dim() == 0 and -4 <= float(loss.detach()) <= 4
    loss.backward()
    assert branch_model.pixpro.projector[0].weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for p in branch_model.backbone.parameters())
    assert all(p.grad is None for p in branch_model.pixpro.momentum_backbone.parameters())


def test_pixpro_options_are_checked():
    pcfg = {**load_config("demo")["pretrain"], "method": "pixpro"}
    assert pixpro_options({**pcfg, "method": "swav"}) is None
    assert pixpro_options(pcfg)["gamma"] == 2.0
    with pytest.raises(LusscoreError, match="pretrain.method"):
        pixpro_options({**pcfg, "method": "byol"})
    with pytest.raises(LusscoreError, match="unknown keys"):
        pixpro_options({**pcfg, "pixpro": {**pcfg["pixpro"], "temperature": 0.2}})
    with pytest.raises(LusscoreError, match="momentum"):
        pixpro_options({**pcfg, "pixpro": {**pcfg["pixpro"], "momentum": 1.5}})
    with pytest.raises(LusscoreError, match="transform_layers"):
        pixpro_options({**pcfg, "pixpro": {**pcfg["pixpro"], "transform_layers": 3}})
    with pytest.raises(ValueError, match="threshold"):
        PixProBranch(torch.nn.Identity(), 4, 4, 4, threshold=0)
