"""Image-level attention-pooled features for clustering: equal to a per-image reference."""
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lusscore.models import PixelAttention
from lusscore.data.transforms import load_center_crop
from lusscore.stages.attention_features import pooled_features


def test_pooled_features_match_per_image_reference(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(90, 120), (120, 90), (100, 100), (90, 120), (77, 140)]):
        p = tmp_path / f"{i}.JPEG"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 16, stride=16), torch.nn.ReLU()).eval()
    attention = PixelAttention(16, hidden=8).eval()
    with torch.no_grad():
        attention.theta.normal_()
    for mode in ("raw", "normalized"):
        feats = pooled_features(backbone, attention, paths, batch_size=2, resize=64, crop=48,
                                pool_features=mode)
        assert feats.shape == (5, 16) and feats.dtype == torch.float32
        torch.testing.assert_close(feats.norm(dim=1), torch.ones(5))
        for i, p in enumerate(paths):
            img = load_center_crop(p, 64, 48)
            assert img.shape == (3, 48, 48)
            with torch.no_grad():
                z = backbone(img[None])
                up = F.interpolate(z, scale_factor=4, mode="bilinear", align_corners=False)
                x = F.normalize(up, dim=1)
                c = torch.sigmoid(attention.mlp(x) + attention.theta.view(1, -1, 1, 1))
                want = F.normalize((c * (up if mode == "raw" else x)).mean(dim=(2, 3)), dim=1)[0]
            torch.testing.assert_close(feats[i], want, atol=1e-5, rtol=1e-4)
    assert pooled_features(backbone, attention, []).shape == (0, 16)
    mean = pooled_features(backbone, None, paths[:2], batch_size=2, resize=64, crop=48)
    for i, p in enumerate(paths[:2]):  # image-level pooling: the plain spatial mean
        with torch.no_grad():
            want = F.normalize(backbone(load_center_crop(p, 64, 48)[None]).mean(dim=(2, 3)), dim=1)[0]
        torch.testing.assert_close(mean[i], want, atol=1e-5, rtol=1e-4)


def test_cluster_scores():
    from lusscore.metrics import hungarian_accuracy, nmi
    truth = np.array([1, 1, 2, 2, 3, 3])
    assert nmi(np.array([5, 5, 0, 0, 7, 7]), truth) == 1.0  # a relabelled perfect clustering
    assert hungarian_accuracy(np.array([2, 2, 0, 0, 1, 1]), truth) == 1.0
    assert hungarian_accuracy(np.array([0, 0, 0, 0, 1, 1]), truth) == 4 / 6
    assert nmi(np.zeros(6, int), truth) == 0.0
    assert 0.0 < nmi(np.array([0, 0, 0, 1, 1, 1]), truth) < 1.0
