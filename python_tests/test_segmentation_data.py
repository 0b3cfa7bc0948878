"""LabeledImages: one random crop of the image and of its label map, aligned (also when
mirrored), at their two sizes, ids unchanged."""
import numpy as np
import torch
from PIL import Image

from lusscore.data.label_io import write_label_png
from lusscore.data.segmentation import LabeledImages
from lusscore.data.transforms import IMAGENET_MEAN, IMAGENET_STD

COLOURS = {0: (0, 0, 0), 3: (255, 0, 0), 7: (0, 255, 0), 1000: (0, 0, 255)}


def striped_pair(tmp_path, h=60, w=90):
    """Vertical stripes 15 px wide: an image coloured by id and its label map."""
    ids = np.array(list(COLOURS))[(np.arange(w) // 15) % len(COLOURS)]
    label = np.broadcast_to(ids, (h, w)).astype(np.int64)
    image = np.array([COLOURS[int(i)] for i in label.flat], dtype=np.uint8).reshape(h, w, 3)
    Image.fromarray(image).save(tmp_path / "a.png")
    write_label_png(tmp_path / "a_label.png", label)
    return tmp_path / "a.png", tmp_path / "a_label.png"


def test_crops_of_image_and_label_are_aligned(tmp_path):
    dataset = LabeledImages([striped_pair(tmp_path)], crop=32, label_size=16, scale=(0.2, 1.0))
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    palette = torch.tensor([COLOURS[i] for i in COLOURS], dtype=torch.float32) / 255
    ids = torch.tensor(list(COLOURS))
    torch.manual_seed(0)
    first_columns, agreement = set(), []
    for _ in range(30):
        x, y = dataset[0]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert y.shape == (16, 16) and y.dtype == torch.int64
        assert set(y.unique().tolist()) <= set(COLOURS)
        rgb = torch.nn.functional.avg_pool2d(x * std + mean, 2)  # each label cell's image pixels
        nearest = ids[(rgb.permute(1, 2, 0)[..., None, :] - palette).abs().sum(-1).argmin(-1)]
        agreement.append(float((nearest == y).float().mean()))
        first_columns.add(int(y[0, 0]))
    # All but some cells along the stripes' blurred edges agree; a crop or mirror that missed
    # the label would agree on about a third.
    assert min(agreement) > 0.75 and sum(agreement) / len(agreement) > 0.9, agreement
    assert len(first_columns) > 1  # the crops differ
