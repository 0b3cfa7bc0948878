"""Pixel pseudo-label generation: PNGs valid and equal to a slow per-image reference,
batching by size, resume after an interrupted run, the tau helper and the `luss label` CLI."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lusscore.cli import main as luss
from lusscore.data import read_label_png
from lusscore.models import PixelAttention
from lusscore.models.backbone import resnet_backbone, save_attention_checkpoint
from lusscore.stages import label as label_stage

# (wnid, name, H, W): two pairs share a size (batched together), the rest differ.
IMAGES = [("n001", "a", 70, 90), ("n001", "b", 70, 90), ("n001", "c", 90, 64),
          ("n002", "d", 64, 64), ("n002", "e", 100, 75), ("n002", "f", 100, 75)]


def _write_dataset(root):
    rng = np.random.default_rng(0)
    for wnid, name, h, w in IMAGES:
        d = root / "train" / wnid
        d.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((w, h), Image.NEAREST)
        img.save(d / f"{name}.JPEG", quality=95)
    return root


class TinyBackbone(torch.nn.Module):
    """Images -> a stride-32 map with 24 channels (a stand-in for a ResNet)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 24, kernel_size=32, stride=32, padding=8)

    def forward(self, x):
        return torch.relu(self.conv(x))


def _models(seed=0):
    torch.manual_seed(seed)
    backbone = TinyBackbone().eval()
    attention = PixelAttention(24, hidden=12).eval()
    with torch.no_grad():
        attention.theta.normal_(0, 0.5)
    centroids = torch.randn(5, 24)
    return backbone, attention, centroids


def _slow_reference(backbone, attention, centroids, image_path, tau, resize):
    """One image, no fused op, no batching: the label map the stage must produce."""
    img = label_stage.load_image_tensor(image_path, resize)[None]
    with torch.no_grad():
        z = backbone(img)
        up = F.interpolate(z, scale_factor=4, mode="bilinear", align_corners=False)
        x = up / up.norm(dim=1, keepdim=True).clamp_min(1e-12)
        c = torch.sigmoid(attention.mlp(x) + attention.theta.view(1, -1, 1, 1))
        mean_att = c.mean(dim=1)[0]
        cn = centroids / centroids.norm(dim=1, keepdim=True)
        ids = torch.einsum("lhw,kl->khw", x[0], cn).argmax(0) + 1
    with Image.open(image_path) as im:
        h, w = im.height, im.width
    full = F.interpolate(ids[None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
    att = F.interpolate(mean_att[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    full[att < tau] = 0
    return full.numpy(), mean_att.numpy()


def _items(root, out, save_attention=True):
    paths = sorted((root / "train").rglob("*.JPEG"))
    return label_stage.plan_items(paths, root / "train", out, save_attention)


def _median_attention(backbone, attention, root):
    img = label_stage.load_image_tensor(root / "train" / "n001" / "a.JPEG", 64)[None]
    with torch.no_grad():
        return float(attention(backbone(img), return_attention=True)[1].median())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return _write_dataset(tmp_path_factory.mktemp("data"))


def test_labels_match_slow_reference(dataset, tmp_path):
    backbone, attention, centroids = _models()
    tau = _median_attention(backbone, attention, dataset)  # about half the pixels are 'other'
    items = _items(dataset, tmp_path / "out")
    stats = label_stage.label_images(backbone, attention, centroids, items, tau, batch_size=4,
                                     resize=64, progress=False)
    assert stats["labelled"] == len(IMAGES) and stats["skipped"] == 0
    other_fraction = []
    for item in items:
        with Image.open(item.label) as im:
            assert im.mode == "RGB" and im.format == "PNG"
        got = read_label_png(item.label)
        want, want_att = _slow_reference(backbone, attention, centroids, item.image, tau, 64)
        assert got.shape == want.shape
        assert got.min() >= 0 and got.max() <= 5
        assert (got == want).mean() > 0.995, (item.image, (got == want).mean())
        att = np.load(item.attention)
        assert att.dtype == np.float32 and att.shape == want_att.shape
        np.testing.assert_allclose(att, want_att, atol=1e-5)
        other_fraction.append((got == 0).mean())
    assert 0.05 < np.mean(other_fraction) < 0.95
    assert not list((tmp_path / "out").rglob("*.tmp*"))


def test_apply_tau_matches_stage_threshold(dataset, tmp_path):
    backbone, attention, centroids = _models(1)
    tau = _median_attention(backbone, attention, dataset)
    unmasked = _items(dataset, tmp_path / "t0")
    label_stage.label_images(backbone, attention, centroids, unmasked, 0.0, resize=64, progress=False)
    masked = _items(dataset, tmp_path / "tau", save_attention=False)
    label_stage.label_images(backbone, attention, centroids, masked, tau, resize=64, progress=False)
    for u, m in zip(unmasked, masked):
        base = torch.from_numpy(read_label_png(u.label))
        assert (base > 0).all()
        again = label_stage.apply_tau(base, torch.from_numpy(np.load(u.attention)), tau)
        assert np.array_equal(again.numpy(), read_label_png(m.label))


def test_resume_after_interruption(dataset, tmp_path, monkeypatch):
    backbone, attention, centroids = _models(2)
    tau = _median_attention(backbone, attention, dataset)
    clean = _items(dataset, tmp_path / "clean")
    label_stage.label_images(backbone, attention, centroids, clean, tau, resize=64, progress=False)

    items = _items(dataset, tmp_path / "out")
    real_write = label_stage.write_label_png
    calls = {"n": 0}

    def dying_write(path, label):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        real_write(path, label)

    monkeypatch.setattr(label_stage, "write_label_png", dying_write)
    with pytest.raises(KeyboardInterrupt):
        label_stage.label_images(backbone, attention, centroids, items, tau, batch_size=2,
                                 resize=64, writers=1, progress=False)
    monkeypatch.setattr(label_stage, "write_label_png", real_write)
    done = [it for it in items if it.label.exists()]
    assert 1 <= len(done) < len(items)
    assert not list((tmp_path / "out").rglob("*.tmp*")), "an interrupted write leaves no temp file"
    # A corrupt file (not written by us) must be redone too.
    done[0].label.write_bytes(b"garbage")
    stats = label_stage.label_images(backbone, attention, centroids, items, tau, resize=64,
                                     progress=False)
    assert stats["skipped"] == len(done) - 1
    assert stats["labelled"] == len(items) - len(done) + 1
    for c, it in zip(clean, items):
        assert np.array_equal(read_label_png(c.label), read_label_png(it.label))
        assert np.array_equal(np.load(c.attention), np.load(it.attention))
    again = label_stage.label_images(backbone, attention, centroids, items, tau, resize=64,
                                     progress=False)
    assert again["labelled"] == 0 and again["skipped"] == len(items)


def test_batches_group_equal_sizes_and_shards_cover_everything():
    sizes = [(2, 3), (4, 5), (2, 3), (2, 3), (4, 5)]
    batches = label_stage.same_size_batches(sizes, 2)
    assert sorted(i for b in batches for i in b) == list(range(5))
    for b in batches:
        assert len({sizes[i] for i in b}) == 1 and len(b) <= 2
    items = list(range(11))
    parts = [label_stage.shard(items, r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == items
    assert label_stage.resized_size(375, 500, 256) == (256, 341)
    assert label_stage.resized_size(500, 375, 256) == (341, 256)


def test_bad_centroids(dataset, tmp_path):
    backbone, attention, _ = _models()
    with pytest.raises(ValueError, match=r"centroids must have shape \(K, 24\)"):
        label_stage.label_images(backbone, attention, torch.randn(4, 7), _items(dataset, tmp_path),
                                 0.5, progress=False)


def test_cli_label_with_resnet_checkpoint(dataset, tmp_path, capsys):
    torch.manual_seed(4)
    backbone = resnet_backbone("resnet18")
    attention = PixelAttention(512, hidden=16)
    ckpt = tmp_path / "attention.pth"
    save_attention_checkpoint(ckpt, backbone, attention, {"arch": "resnet18",
                                                          "attention": {"hidden": 16}, "tau": 0.45})
    np.save(tmp_path / "centroids.npy", np.random.default_rng(0).normal(size=(3, 512)).astype(np.float32))
    args = ["label", "--data", str(dataset), "--split", "train", "--checkpoint", str(ckpt),
            "--centroids", str(tmp_path / "centroids.npy"), "--out", str(tmp_path / "labels"),
            "--resize", "64", "--workers", "0", "--device", "cpu", "--save-attention"]
    assert luss(args) == 0
    assert "6 labelled" in capsys.readouterr().out
    pngs = sorted((tmp_path / "labels").rglob("*.png"))
    assert len(pngs) == len(IMAGES) and len(list((tmp_path / "labels").rglob("*.npy"))) == len(IMAGES)
    for (wnid, name, h, w) in IMAGES:
        lab = read_label_png(tmp_path / "labels" / wnid / f"{name}.png")
        assert lab.shape == (h, w) and lab.max() <= 3
    assert luss(args) == 0
    assert "0 labelled, 6 already done" in capsys.readouterr().out
    log = (tmp_path / "labels" / "label_log.rank0.jsonl").read_text().splitlines()
    assert [json.loads(line)["labelled"] for line in log] == [6, 0]
    assert json.loads(log[0])["tau"] == 0.45
    bad = args[:]
    bad[bad.index(str(tmp_path / "centroids.npy"))] = str(tmp_path / "missing.npy")
    assert luss(bad) == 2
    assert "centroids file not found" in capsys.readouterr().err


# ------------------------------------------------------------------ label.method (Tab 10a)
def _features(backbone, attention, img):
    with torch.no_grad():
        z = backbone(img)
        up = F.interpolate(z, scale_factor=4, mode="bilinear", align_corners=False)
        x = F.normalize(up, dim=1)
    return z, up, x


@pytest.mark.parametrize("pooling", ["attention", "mean"])
def test_image_level_labels_put_the_image_cluster_where_its_cam_map_passes_tau(tmp_path, pooling):
    root = _write_dataset(tmp_path)
    backbone, attention, centroids = _models(3)
    rule = label_stage.LabelRule("image", pooling=pooling, pool_features="raw")
    path = root / "train" / "n002" / "e.JPEG"
    img = label_stage.load_image_tensor(path, 64)[None]
    labels, maps = label_stage.label_batch(backbone, attention, centroids, img, [(100, 75)], 0.5,
                                           rule=rule)
    z, up, x = _features(backbone, attention, img)
    cent = F.normalize(centroids, dim=1)
    if pooling == "mean":
        pooled = F.normalize(z.mean(dim=(2, 3)), dim=1)
    else:
        pooled = F.normalize(attention(z, return_attention=False, pool_features="raw"), dim=1)
    k = int((pooled @ cent.t()).argmax())
    cam = torch.einsum("blhw,l->bhw", x, cent[k])[0]
    cam = (cam - cam.min()) / (cam.max() - cam.min())
    torch.testing.assert_close(maps[0], cam)
    assert maps[0].min() == 0 and maps[0].max() == pytest.approx(1)
    want = label_stage.apply_tau(torch.full((100, 75), k + 1, dtype=torch.int32), cam, 0.5)
    assert torch.equal(labels[0], want)
    assert set(labels[0].unique().tolist()) == {0, k + 1}


def test_pixel_kmeans_labels_map_the_other_cluster_to_0_and_ignore_tau(tmp_path):
    root = _write_dataset(tmp_path)
    backbone, attention, centroids = _models(4)
    path = root / "train" / "n001" / "c.JPEG"
    img = label_stage.load_image_tensor(path, 64)[None]
    rule = label_stage.LabelRule("pixel_kmeans", other_cluster=2)
    labels, maps = label_stage.label_batch(backbone, attention, centroids, img, [(90, 64)], 0.9,
                                           rule=rule)
    _, _, x = _features(backbone, attention, img)
    nearest = torch.einsum("blhw,kl->bkhw", x, F.normalize(centroids, dim=1)).argmax(1)[0]
    lut = torch.tensor([1, 2, 0, 3, 4])  # cluster 2 is 'other'; the rest keep their order
    full = F.interpolate(lut[nearest][None, None].float(), size=(90, 64), mode="nearest")[0, 0]
    assert torch.equal(labels[0], full.to(torch.int32))  # tau 0.9 masks nothing
    assert torch.equal(maps[0], torch.ones_like(maps[0]))
    with pytest.raises(Exception, match="other"):
        label_stage.LabelRule("pixel_kmeans")
    with pytest.raises(Exception, match="label.method"):
        label_stage.LabelRule("cam")
