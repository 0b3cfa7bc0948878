"""PixelAttention: shapes, modes, parameter groups, pooling variants, agreement with the
unfused formula; the ResNet backbone helper and the attention checkpoint loader."""
import pytest
import torch
import torch.nn.functional as F

from lusscore.models import PixelAttention
from lusscore.models.backbone import (load_attention_checkpoint, resnet_backbone,
                                      save_attention_checkpoint)
from lusscore.utils import LusscoreError


def _unfused(module, z, pool_features):
    up = F.interpolate(z, scale_factor=module.upsample, mode="bilinear", align_corners=False)
    x = F.normalize(up, dim=1)
    c = torch.sigmoid(module.mlp(x) + module.theta.view(1, -1, 1, 1))
    feats = x if pool_features == "normalized" else up
    return (c * feats).mean(dim=(2, 3)), c.mean(dim=1)


def test_shapes_and_modes():
    torch.manual_seed(0)
    m = PixelAttention(16, hidden=8)
    z = torch.randn(3, 16, 5, 6)
    m.train()
    pooled = m(z)
    assert isinstance(pooled, torch.Tensor) and pooled.shape == (3, 16)
    m.eval()
    pooled, mean = m(z)
    assert pooled.shape == (3, 16) and mean.shape == (3, 20, 24)
    assert (mean > 0).all() and (mean < 1).all()
    assert torch.equal(m.theta.detach(), torch.zeros(16))
    assert m(z, return_attention=False).shape == (3, 16)


@pytest.mark.parametrize("pool_features", ["normalized", "raw"])
def test_matches_unfused_formula(pool_features):
    torch.manual_seed(1)
    m = PixelAttention(12, pool_features=pool_features).eval()
    with torch.no_grad():
        m.theta.normal_()
        for bn in (m.mlp[1], m.mlp[4]):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2)
    z = torch.randn(2, 12, 4, 3)
    pooled, mean = m(z)
    want_p, want_m = _unfused(m, z, pool_features)
    torch.testing.assert_close(pooled, want_p, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mean, want_m, atol=1e-5, rtol=1e-5)
    other = "raw" if pool_features == "normalized" else "normalized"
    assert not torch.allclose(m(z, pool_features=other)[0], pooled)


@pytest.mark.parametrize("upsample,hidden,shared", [(4, None, False), (2, 5, False), (3, 7, True),
                                                     (1, 6, False)])
def test_first_conv_at_map_resolution_matches_the_direct_formula(upsample, hidden, shared):
    """pixel_features runs M_A's first conv before the upsampling: the logits, and every
    gradient of a training step, equal those of M_A on the upsampled normalised map."""
    torch.manual_seed(4)
    m = PixelAttention(9, hidden=hidden, upsample=upsample, shared=shared).train()
    z = torch.randn(3, 9, 4, 5, dtype=torch.float64, requires_grad=True)
    m = m.double()
    up, x, a = m.pixel_features(z)
    want_up = F.interpolate(z, scale_factor=upsample, mode="bilinear", align_corners=False)
    want_a = m.mlp(F.normalize(want_up, dim=1))
    if shared:
        want_a = want_a.expand(-1, 9, -1, -1)
    torch.testing.assert_close(up, want_up)
    torch.testing.assert_close(x, F.normalize(want_up, dim=1))
    torch.testing.assert_close(a, want_a)
    weights = torch.randn_like(a)
    got = torch.autograd.grad((a * weights).sum(), [z, *m.mlp.parameters()])
    want = torch.autograd.grad((want_a * weights).sum(), [z, *m.mlp.parameters()])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_gradients_reach_mlp_and_theta():
    torch.manual_seed(2)
    m = PixelAttention(8).train()
    z = torch.randn(4, 8, 3, 3, requires_grad=True)
    m(z).square().sum().backward()
    assert m.theta.grad is not None and m.theta.grad.abs().sum() > 0
    for p in m.mlp.parameters():
        assert p.grad is not None
    assert z.grad is not None


def test_parameter_groups_cover_every_parameter_once():
    m = PixelAttention(10, hidden=6)
    groups = m.parameter_groups()
    assert [g["name"] for g in groups] == ["attention_mlp", "theta"]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(m.parameters()))
    assert groups[1]["params"] == [m.theta]
    opt = torch.optim.SGD([{k: v for k, v in g.items() if k != "name"} for g in groups], lr=0.1)
    assert len(opt.param_groups) == 2
    # conv1 (10->6), bn (6), conv2 (6->10), bn (10)
    assert sum(p.numel() for p in groups[0]["params"]) == 60 + 12 + 60 + 20


def test_bad_arguments():
    with pytest.raises(ValueError, match="pool_features"):
        PixelAttention(4, pool_features="mean")
    m = PixelAttention(4)
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\)"):
        m(torch.randn(2, 5, 3, 3))


def test_resnet_backbone_and_checkpoint(tmp_path):
    torch.manual_seed(3)
    net = resnet_backbone("resnet18").eval()
    out = net(torch.randn(1, 3, 64, 96))
    assert out.shape == (1, 512, 2, 3) and net.out_channels == 512
    att = PixelAttention(512, hidden=32)
    with torch.no_grad():
        att.theta.fill_(0.25)
    path = tmp_path / "attention.pth"
    save_attention_checkpoint(path, net, att, {"arch": "resnet18", "attention": {"hidden": 32}})
    net2, att2, cfg = load_attention_checkpoint(path)
    assert cfg["arch"] == "resnet18"
    assert torch.equal(att2.theta, att.theta)
    net2.eval()
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(net2(x), net(x))
    with pytest.raises(LusscoreError, match="unknown backbone"):
        resnet_backbone("vgg16")
    torch.save({"backbone": {}}, tmp_path / "bad.pth")
    with pytest.raises(LusscoreError, match="lacks"):
        load_attention_checkpoint(tmp_path / "bad.pth")
    save_attention_checkpoint(tmp_path / "wrong.pth", net, PixelAttention(512, hidden=16),
                              {"arch": "resnet18", "attention": {"hidden": 32}})
    with pytest.raises(LusscoreError, match="attention weights do not fit"):
        load_attention_checkpoint(tmp_path / "wrong.pth")


def test_compiles_fullgraph_with_gradients():
    torch.manual_seed(5)
    m = PixelAttention(8, hidden=4).train()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    z = torch.randn(2, 8, 3, 3)
    out = compiled(z)
    out.square().sum().backward()
    got = m.theta.grad.clone()
    m.zero_grad()
    torch.manual_seed(5)
    m2 = PixelAttention(8, hidden=4).train()
    m2.load_state_dict(m.state_dict())
    m2(z).square().sum().backward()
    torch.testing.assert_close(got, m2.theta.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", [(4, 256, 6, 6), (2, 64, 14, 14), (3, 16, 40, 40), (2, 8, 5, 7)])
def test_cpu_upsample_route_matches_interpolate(shape):
    """The CPU's channels-last route of the x4 upsampling: a contiguous result, the values and
    gradients of F.interpolate up to rounding, and exactly them on stage-4 sized maps."""
    from lusscore.models.pixel_attention import upsample_bilinear
    z = torch.randn(*shape, dtype=torch.float32, requires_grad=True)
    ref = F.interpolate(z, scale_factor=4, mode="bilinear", align_corners=False)
    out = upsample_bilinear(z, 4)
    assert out.shape == ref.shape and out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    if shape[1] >= 64 and shape[-1] <= 14:
        assert torch.equal(out, ref)
    g = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(out, z, g)[0], torch.autograd.grad(ref, z, g)[0],
                               rtol=0, atol=1e-5)
