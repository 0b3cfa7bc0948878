"""PASS as the paper and the reference code define it: D2S on the large crops (and its
ablation switches), the ImageNet-S configs' recipe values."""
import pytest
import torch
import torch.nn.functional as F

from samples import multicrop_batch
from lusscore.config import apply_overrides, load_config
from lusscore.losses.pass_loss import d2s_loss, d2s_options, pass_losses
from lusscore.losses.swav import sinkhorn
from lusscore.models.pass_models import PASSPretrainModel
from lusscore.models.resnet import build_trunk
from lusscore.utils import LusscoreError

MODEL = {"arch": "resnet18", "width": 8, "output_stride": 16, "hidden_mlp": 32, "feat_dim": 16,
         "num_prototypes": 10}
WEIGHTS = {"swav": 0.5, "d2s": 0.5}
BS = 4




def _pcfg(**d2s):
    pcfg = load_config("demo")["pretrain"]
    pcfg["d2s"] = {**pcfg["d2s"], **d2s}
    return pcfg


def _model(stages=(3,)):
    torch.manual_seed(0)
    return PASSPretrainModel(MODEL, WEIGHTS, d2s_stages=stages).eval()  # eval: BN per sample


def _losses(model, groups, pcfg):
    out = model(groups)
    return pass_losses(out, BS, 4, WEIGHTS, pcfg, None, model.prototypes.weight)[1], out


def test_d2s_sees_the_two_large_crops_only():
    """The small crops change SwAV's loss, never D2S's (paper Eq. 4, reference d2s_loss)."""
    model, pcfg = _model(), _pcfg()
    groups = multicrop_batch().by_size()
    parts, out = _losses(model, groups, pcfg)
    assert out["d2s_scores"]["stage3"].shape == (2 * BS, MODEL["num_prototypes"])
    other_small = [groups[0], torch.randn_like(groups[1])]
    parts2, _ = _losses(model, other_small, pcfg)
    assert not torch.allclose(parts["swav"], parts2["swav"])
    torch.testing.assert_close(parts["d2s"], parts2["d2s"], rtol=0, atol=0)


def _by_hand(shallow, codes, view, temp=0.1):
    s = shallow.split(BS)
    terms = []
    for i in range(2):
        v = 1 - i if view == "cross" else i
        terms.append(-(codes[i] * F.log_softmax(s[v] / temp, dim=1)).sum(1).mean())
    return sum(terms) / 2


@pytest.mark.parametrize("view", ["cross", "same"])
def test_d2s_is_the_swapped_prediction_of_the_large_crops_codes(view):
    torch.manual_seed(1)
    shallow = {"stage3": torch.randn(2 * BS, 10)}
    codes = [torch.softmax(torch.randn(BS, 10), 1) for _ in range(2)] + [None, None]
    pcfg = _pcfg(view=view)
    got = d2s_loss(shallow, codes, BS, pcfg)
    torch.testing.assert_close(got, _by_hand(shallow["stage3"], codes, view))
    other = d2s_loss(shallow, codes, BS, _pcfg(view="same" if view == "cross" else "cross"))
    assert not torch.allclose(got, other)


def test_d2s_same_stage_takes_the_codes_of_the_shallow_scores():
    torch.manual_seed(2)
    shallow = {"stage3": torch.randn(2 * BS, 10)}
    deep = [torch.softmax(torch.randn(BS, 10), 1) for _ in range(2)]
    pcfg = _pcfg(target="same_stage")
    own = [sinkhorn(c, pcfg["epsilon"], pcfg["sinkhorn_iterations"]) for c in shallow["stage3"].split(BS)]
    got = d2s_loss(shallow, deep, BS, pcfg)
    torch.testing.assert_close(got, _by_hand(shallow["stage3"], own, "cross"))
    assert not torch.allclose(got, d2s_loss(shallow, deep, BS, _pcfg()))


def test_d2s32_supervises_stages_3_and_2_and_sums_their_terms():
    model = _model((3, 2))
    assert set(model.d2s) == {"stage3", "stage2"}
    assert model.d2s["stage2"].conv[0].in_channels == model.backbone.stage_channels[2]
    pcfg = _pcfg(stages=[3, 2])
    parts, out = _losses(model, multicrop_batch().by_size(), pcfg)
    codes = [sinkhorn(s.detach(), pcfg["epsilon"], pcfg["sinkhorn_iterations"])
             for s in out["scores"].split(BS)[:2]]
    want = sum(_by_hand(out["d2s_scores"][k], codes, "cross") for k in ("stage3", "stage2"))
    torch.testing.assert_close(parts["d2s"], want)
    parts["d2s"].backward()
    assert model.d2s["stage2"].conv[0].weight.grad.abs().sum() > 0
    assert model.backbone.layer2[0].conv1.weight.grad.abs().sum() > 0
    assert model.prototypes.weight.grad is None  # D2S scores use the detached prototypes


@pytest.mark.parametrize("d2s, message", [({"stages": [4]}, "stages"), ({"stages": []}, "stages"),
                                          ({"view": "both"}, "view"), ({"target": "x"}, "target")])
def test_bad_d2s_options_are_errors(d2s, message):
    with pytest.raises(LusscoreError, match=f"pretrain.d2s.{message}"):
        d2s_options(_pcfg(**d2s))


def test_d2s_switches_reach_the_pretrain_stage_by_set():
    cfg = apply_overrides(load_config("demo"), ["pretrain.d2s.stages=[3, 2]",
                                                "pretrain.d2s.view=same"])
    assert d2s_options(cfg["pretrain"]) == {"stages": [3, 2], "view": "same", "target": "deep"}


def test_resnet_starts_with_nonzero_residual_branches_as_the_reference():
    trunk = build_trunk({**MODEL})
    assert all(b.bn2.weight.abs().sum() > 0 for b in trunk.layer1)
    zero = build_trunk({**MODEL, "zero_init_residual": True})
    assert all(b.bn2.weight.abs().sum() == 0 for b in zero.layer1)


@pytest.mark.parametrize("subset, attention_lr", [(50, 6.0), (300, 0.6), (919, 0.6)])
def test_imagenet_s_configs_follow_the_reference_scripts(subset, attention_lr):
    cfg = load_config(f"imagenet_s{subset}")
    acfg = cfg["attention"]
    assert acfg["optimizer"] == "lars" and acfg["base_lr"] == attention_lr
    assert acfg["min_scale"] == 0.08 and acfg["final_lr"] == 0.0006
    assert cfg["model"]["zero_init_residual"] is False
    assert cfg["pretrain"]["final_lr"] == 0.0006  # the reference's; the paper says 6e-6
    assert d2s_options(cfg["pretrain"]) == {"stages": [3], "view": "cross", "target": "deep"}


# ------------------------------------------------------------------ P2P kinds (Tab 8a-b)
def _p2p_inputs(seed=3):
    from lusscore.losses.p2p import P2PLoss  # noqa: F401
    from samples import overlap_boxes
    g = torch.Generator().manual_seed(seed)
    z1, z2 = torch.randn(4, 6, 5, 5, generator=g), torch.randn(4, 6, 5, 5, generator=g)
    boxes1, boxes2, flips1, flips2 = overlap_boxes(4, seed=seed)
    return z1, z2, boxes1, boxes2, flips1, flips2


def test_contrastive_p2p_is_infonce_over_the_lattice_points():
    from lusscore.losses.p2p import P2PLoss
    from lusscore.ops.overlap_gather import overlap_gather
    torch.manual_seed(0)
    loss_fn = P2PLoss(6, hidden_dim=8, out_dim=4, size=3, kind="contrastive", temperature=0.5).eval()
    z1, z2, b1, b2, f1, f2 = _p2p_inputs()
    got = loss_fn(z1, z2, b1, b2, f1, f2)
    v1, v2, valid = overlap_gather(loss_fn.pixel_mlp(z1), loss_fn.pixel_mlp(z2), b1, b2, f1, f2, 3)
    assert 0 < valid.sum() < 4  # the hand computation below takes valid pairs only
    a = F.normalize(v1[valid].permute(0, 2, 3, 1).reshape(-1, 4), dim=1)
    b = F.normalize(v2[valid].permute(0, 2, 3, 1).reshape(-1, 4), dim=1)
    logits = a @ b.t() / 0.5
    want = 0.5 * (-torch.log_softmax(logits, 1).diagonal().mean()
                  - torch.log_softmax(logits.t(), 1).diagonal().mean())
    torch.testing.assert_close(got, want)
    assert loss_fn.predictor is None


def test_clustering_p2p_is_the_swapped_prediction_per_lattice_point():
    from lusscore.losses.p2p import P2PLoss
    from lusscore.ops.overlap_gather import overlap_gather
    torch.manual_seed(0)
    loss_fn = P2PLoss(6, hidden_dim=8, out_dim=4, size=3, kind="clustering", temperature=0.1).eval()
    protos = F.normalize(torch.randn(5, 4), dim=1)
    z1, z2, b1, b2, f1, f2 = _p2p_inputs()
    got = loss_fn(z1, z2, b1, b2, f1, f2, prototypes=protos)
    v1, v2, valid = overlap_gather(loss_fn.pixel_mlp(z1), loss_fn.pixel_mlp(z2), b1, b2, f1, f2, 3)
    a = F.normalize(v1.permute(0, 2, 3, 1).reshape(-1, 4), dim=1) @ protos.t()
    b = F.normalize(v2.permute(0, 2, 3, 1).reshape(-1, 4), dim=1) @ protos.t()
    q1, q2 = sinkhorn(a), sinkhorn(b)
    per = -0.5 * ((q1 * F.log_softmax(b / 0.1, 1)).sum(1) + (q2 * F.log_softmax(a / 0.1, 1)).sum(1))
    keep = valid.repeat_interleave(9)
    torch.testing.assert_close(got, per[keep].mean())
    with pytest.raises(ValueError, match="prototypes"):
        loss_fn(z1, z2, b1, b2, f1, f2)


def test_p2p_without_the_pixel_mlp_aligns_the_stage4_lattices():
    from lusscore.losses.p2p import P2PLoss
    loss_fn = P2PLoss(6, hidden_dim=8, out_dim=4, size=3, use_pixel_mlp=False)
    assert isinstance(loss_fn.pixel_mlp, torch.nn.Identity)
    assert loss_fn.predictor[0].in_channels == 6 and loss_fn.predictor[-1].out_channels == 6
    z1, z2, b1, b2, f1, f2 = _p2p_inputs()
    z1.requires_grad_(True)
    loss_fn(z1, z2, b1, b2, f1, f2).backward()
    assert z1.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["noncontrastive", "contrastive", "clustering"])
def test_each_p2p_kind_trains_in_the_pretrain_loss(kind):
    from lusscore.losses.pass_loss import add_p2p, p2p_options
    pcfg = load_config("demo")["pretrain"]
    pcfg["p2p"] = {**pcfg["p2p"], "kind": kind}
    weights = {"swav": 0.5, "d2s": 0.5, "p2p": 1.0}
    torch.manual_seed(0)
    model = PASSPretrainModel(MODEL, weights, p2p=p2p_options(pcfg))
    batch = multicrop_batch()
    out = model(batch.by_size())
    total, parts = pass_losses(out, BS, 4, weights, pcfg, None, model.prototypes.weight)
    total = add_p2p(model, out, batch, BS, weights, total, parts, pcfg)
    total.backward()
    assert model.p2p.kind == kind and torch.isfinite(parts["p2p"])
    assert model.p2p.pixel_mlp[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("p2p, message", [({"kind": "x"}, "kind"), ({"pixel_mlp": "no"}, "pixel_mlp"),
                                          ({"temperature": 0.0}, "temperature")])
def test_bad_p2p_options_are_errors(p2p, message):
    from lusscore.losses.pass_loss import p2p_options
    pcfg = load_config("demo")["pretrain"]
    pcfg["p2p"] = {**pcfg["p2p"], **p2p}
    with pytest.raises(LusscoreError, match=f"pretrain.p2p.{message}"):
        p2p_options(pcfg)


# ------------------------------------------------------------------ shared attention (Tab 10c)
def test_shared_attention_is_one_map_for_every_channel(tmp_path):
    from lusscore.models.backbone import load_attention_checkpoint, save_attention_checkpoint
    from lusscore.models.pixel_attention import PixelAttention
    from lusscore.models.resnet import ResNetTrunk
    torch.manual_seed(0)
    att = PixelAttention(6, hidden=4, shared=True).eval()
    assert att.theta.shape == (1,) and att.mlp[-2].out_channels == 1
    z = torch.randn(2, 6, 3, 3)
    pooled, mean = att(z)
    up, x, _ = att.pixel_features(z)
    c = torch.sigmoid(att.mlp(x) + att.theta.view(1, -1, 1, 1))  # (B, 1, H, W)
    torch.testing.assert_close(pooled, (c * x).mean(dim=(2, 3)))
    torch.testing.assert_close(mean, c[:, 0])
    att.train()
    att(z, return_attention=False).sum().backward()
    assert att.theta.grad.shape == (1,) and att.theta.grad.abs().sum() > 0
    per_channel = PixelAttention(6, hidden=4)
    assert per_channel.theta.shape == (6,)
    backbone = ResNetTrunk("resnet18", width=8, stage4_only=True)
    config = {"model": {"arch": "resnet18", "width": 8, "output_stride": 32},
              "attention": {"hidden": 4, "shared": True}}
    saved = PixelAttention(backbone.out_channels, hidden=4, shared=True)
    saved.theta.data.fill_(0.3)
    save_attention_checkpoint(tmp_path / "a.pt", backbone, saved, config)
    _, loaded, _ = load_attention_checkpoint(tmp_path / "a.pt")
    assert loaded.shared and torch.equal(loaded.theta, saved.theta)
