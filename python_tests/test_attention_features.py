"""Image-level attention-pooled features for clustering: equal to a per-image reference."""
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lusscore.models import PixelAttention
from lusscore.stages.attention_features import load_center_crop, pooled_features


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
