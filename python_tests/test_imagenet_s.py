"""The ImageNet-S layout reader: category lists, names files, samples, errors."""
import numpy as np
import pytest
from PIL import Image

from lusscore.data import (ImageNetS, benchmark_categories, benchmark_names, check_same_size,
                           load_segmentation_pair, read_names, write_categories, write_label_png,
                           write_names)
from lusscore.utils import LusscoreError

WNIDS = ["n00000002", "n00000001", "n00000003"]  # written unsorted on purpose


def make_root(tmp_path, with_lists=True):
    root = tmp_path / "ds"
    rng = np.random.default_rng(0)
    for split in ("train", "validation"):
        for w in WNIDS:
            for i in range(2):
                img = root / split / w / f"{w}_{i}.JPEG"
                img.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(img, "JPEG")
                if split == "validation":
                    write_label_png(root / "validation-segmentation" / w / f"{w}_{i}.png",
                                    np.full((10, 12), int(w[-1])))
    if with_lists:
        write_categories(root / "categories.txt", WNIDS)
        write_names(root / "names" / "validation.txt",
                    [(f"{w}/{w}_0.JPEG", f"{w}/{w}_0.png") for w in sorted(WNIDS)])
    return root


def test_benchmark_lists_are_packaged():
    for k, n_val in ((50, 752), (300, 4097), (919, 12419)):
        cats = benchmark_categories(k)
        assert len(cats) == k and cats == sorted(cats)
        assert len(benchmark_names(k, "validation")) == n_val
        assert len(benchmark_names(k, "train-semi")) > 0
    with pytest.raises(LusscoreError, match="not 51"):
        benchmark_categories(51)


def test_class_ids_follow_sorted_categories(tmp_path):
    ds = ImageNetS(make_root(tmp_path))
    assert ds.wnids == sorted(WNIDS)
    assert [ds.class_id(w) for w in sorted(WNIDS)] == [1, 2, 3]
    with pytest.raises(LusscoreError, match="n99"):
        ds.class_id("n99")
    train = ds.image_samples("train")
    assert len(train) == 6
    assert {cid for _, cid in train} == {1, 2, 3}
    for path, cid in train:
        assert path.parent.name == ds.wnids[cid - 1]


def test_segmentation_samples_from_names_and_scan(tmp_path):
    root = make_root(tmp_path)
    ds = ImageNetS(root)
    listed = ds.segmentation_samples("validation")
    assert [s.name for s in listed] == [f"{w}/{w}_0.png" for w in sorted(WNIDS)]
    img, label = load_segmentation_pair(listed[1])
    assert label.shape == (img.height, img.width) and (label == 2).all()
    (root / "names" / "validation.txt").unlink()
    scanned = ds.segmentation_samples("validation")
    assert len(scanned) == 6 and all(s.image.is_file() and s.label.is_file() for s in scanned)


def test_without_category_file_uses_train_folders_or_benchmark(tmp_path):
    root = make_root(tmp_path, with_lists=False)
    assert ImageNetS(root).wnids == sorted(WNIDS)
    assert ImageNetS(root, num_classes=50).num_classes == 50


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageNetS(tmp_path / "nowhere")
    root = make_root(tmp_path)
    with pytest.raises(LusscoreError, match="3 classes but num_classes=50"):
        ImageNetS(root, num_classes=50)
    ds = ImageNetS(root)
    with pytest.raises(FileNotFoundError, match="names file not found"):
        ds.segmentation_samples("validation", names=root / "none.txt")
    with pytest.raises(LusscoreError, match="splits with labels"):
        ds.segmentation_samples("train")
    (root / "bad.txt").write_text("a.JPEG\n")
    with pytest.raises(LusscoreError, match="bad.txt:1"):
        read_names(root / "bad.txt")
    (root / "categories.txt").write_text("b\na\n")
    with pytest.raises(LusscoreError, match="sorted"):
        ImageNetS(root)


def test_label_image_size_mismatch_names_both(tmp_path):
    root = make_root(tmp_path)
    ds = ImageNetS(root)
    sample = ds.segmentation_samples("validation")[0]
    write_label_png(sample.label, np.zeros((9, 12), np.int64))
    with pytest.raises(LusscoreError, match=r"label size 9x12.*10x12"):
        load_segmentation_pair(sample)
    with pytest.raises(LusscoreError, match="size mismatch"):
        check_same_size(sample.label, sample.image)
