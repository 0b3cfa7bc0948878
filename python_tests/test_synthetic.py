"""The synthetic ImageNet-S-layout dataset: determinism, layout, statistics, reuse."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from lusscore.data import IGNORE_INDEX, ImageNetS, read_label_png, read_names
from lusscore.data.synthetic import (
    LABEL_FOLDERS,
    PENDING_FILE,
    SUMMARY_FILE,
    SynthConfig,
    generate_dataset,
    render_sample,
    size_bucket,
    wnids,
)
from lusscore.utils import LusscoreError

TINY = SynthConfig(classes=3, train_per_class=3, val_per_class=2, semi_per_class=1,
                   test_per_class=2, size=40)
# Big enough for stable statistics, small enough to generate in about a second.
MEDIUM = SynthConfig(classes=6, train_per_class=30, val_per_class=6, semi_per_class=2,
                     test_per_class=3, size=64)


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    root = tmp_path_factory.mktemp("medium")
    summary = generate_dataset(root, MEDIUM, progress=False)
    return root, summary


# ----------------------------------------------------------------------------- config

@pytest.mark.parametrize("kwargs", [
    dict(classes=0), dict(classes=1000), dict(size=31), dict(size=5000),
    dict(train_per_class=0), dict(val_per_class=-1), dict(semi_per_class=-2),
    dict(test_per_class=-1), dict(seed=-1),
    dict(classes=2.5), dict(size="96"), dict(classes=True),
])
def test_bad_config_is_refused(kwargs):
    with pytest.raises(LusscoreError):
        SynthConfig(**kwargs)


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(LusscoreError, match="workers"):
        generate_dataset(tmp_path / "a", TINY, progress=False, workers=0)
    with pytest.raises(LusscoreError, match="SynthConfig"):
        generate_dataset(tmp_path / "b", {"classes": 3}, progress=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(LusscoreError, match="not a folder"):
        generate_dataset(tmp_path / "file", TINY, progress=False)


def test_defaults():
    c = SynthConfig()
    assert (c.classes, c.train_per_class, c.val_per_class, c.semi_per_class, c.test_per_class,
            c.size, c.seed) == (6, 80, 12, 4, 20, 96, 0)
    assert c.num_images == 6 * (80 + 12 + 4 + 20)


def test_size_bucket_edges():
    # ceil(100 * n / N): <=5, <=25, <=50, >50
    assert [size_bucket(n, 100) for n in (1, 5, 6, 25, 26, 50, 51, 100)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert size_bucket(1, 10_000) == 0
    assert size_bucket(501, 10_000) == 1  # 5.01% rounds up to 6


# ----------------------------------------------------------------------------- determinism

def test_same_seed_gives_identical_files(tmp_path):
    generate_dataset(tmp_path / "a", TINY, progress=False)
    generate_dataset(tmp_path / "b", TINY, progress=False)
    a, b = files_of(tmp_path / "a"), files_of(tmp_path / "b")
    assert sorted(a) == sorted(b)
    assert any(k.endswith(".JPEG") for k in a) and any(k.endswith(".png") for k in a)
    for k in a:
        assert a[k] == b[k], k


def test_different_seed_differs(tmp_path):
    generate_dataset(tmp_path / "a", TINY, progress=False)
    other = SynthConfig(**{**TINY.__dict__, "seed": 1})
    generate_dataset(tmp_path / "b", other, progress=False)
    a, b = files_of(tmp_path / "a"), files_of(tmp_path / "b")
    jpegs = [k for k in a if k.endswith(".JPEG")]
    pngs = [k for k in a if k.endswith(".png")]
    assert set(jpegs) <= set(b)  # same names, different content
    assert all(a[k] != b[k] for k in jpegs)
    assert sum(a[k] != b[k] for k in pngs) > len(pngs) // 2


def test_workers_and_order_do_not_matter(tmp_path):
    generate_dataset(tmp_path / "one", TINY, progress=False, workers=1)
    generate_dataset(tmp_path / "two", TINY, progress=False, workers=2)
    assert files_of(tmp_path / "one") == files_of(tmp_path / "two")
    # An image rendered alone equals the same image rendered after others.
    img_a, lab_a, _ = render_sample(TINY, "validation", 3)
    for j in range(3):
        render_sample(TINY, "validation", j)
    img_b, lab_b, _ = render_sample(TINY, "validation", 3)
    assert np.array_equal(img_a, img_b) and np.array_equal(lab_a, lab_b)


# ----------------------------------------------------------------------------- layout

def test_layout_is_readable_by_imagenet_s(tmp_path):
    root = tmp_path / "ds"
    summary = generate_dataset(root, TINY, progress=False)
    ds = ImageNetS(root)
    assert ds.wnids == wnids(3) == sorted(ds.wnids)
    assert all(len(w) == 9 and w.startswith("n9") and w[1:].isdigit() for w in ds.wnids)

    train = ds.image_samples("train")
    assert len(train) == 3 * 3
    for path, cid in train:
        assert path.suffix == ".JPEG" and path.parent.name == ds.wnids[cid - 1]
        assert path.name.startswith(path.parent.name + "_")
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            size = im.size
        # Train labels are kept beside, not inside, train/.
        label = root / "train-segmentation" / path.parent.name / (path.stem + ".png")
        assert read_label_png(label).shape == size[::-1]
    assert not list((root / "train").rglob("*.png"))

    for split, per_class in (("validation", 2), ("train-semi", 1), ("test", 2)):
        samples = ds.segmentation_samples(split)
        assert len(samples) == 3 * per_class
        pairs = read_names(root / "names" / f"{split}.txt")
        assert [(s.image.relative_to(root / split).as_posix(), s.name) for s in samples] == pairs
        for img_rel, lab_rel in pairs:
            assert img_rel.endswith(".JPEG") and lab_rel == img_rel[:-5] + ".png"
        for s in samples:
            with Image.open(s.image) as im:
                w, h = im.size
            assert read_label_png(s.label).shape == (h, w)
    # No image name is shared between two splits.
    names = {split: {s.image.name for s in ds.segmentation_samples(split)}
             for split in ("validation", "train-semi", "test")}
    names["train"] = {p.name for p, _ in train}
    for a in names:
        for b in names:
            assert a == b or not (names[a] & names[b]), (a, b)
    assert all(n.startswith("ILSVRC2012_test_") for n in names["test"])
    assert ds.has_labels("test") and (root / "test-segmentation").is_dir()

    stored = json.loads((root / SUMMARY_FILE).read_text())
    assert stored == summary
    assert stored["config"] == TINY.__dict__
    assert stored["counts"] == {"train": 9, "train-semi": 3, "validation": 6, "test": 6}
    assert not (root / PENDING_FILE).exists()


# ----------------------------------------------------------------------------- statistics

def _all_labels(root: Path):
    for folder in ("train-segmentation", "train-semi-segmentation", "validation-segmentation",
                   "test-segmentation"):
        for p in sorted((root / folder).rglob("*.png")):
            yield p, read_label_png(p)


def test_statistics(medium):
    root, summary = medium
    k = MEDIUM.classes
    buckets, multi, banded, n, sizes = [0, 0, 0, 0], 0, 0, 0, set()
    for path, label in _all_labels(root):
        n += 1
        ids = set(np.unique(label).tolist())
        assert ids <= set(range(k + 1)) | {IGNORE_INDEX}, path
        sizes.add(label.shape)
        valid = label != IGNORE_INDEX
        counts = np.bincount(label[valid], minlength=k + 1)
        present = [c for c in range(1, k + 1) if counts[c] > 0]
        # The folder names the largest object's class.
        folder_id = wnids(k).index(path.parent.name) + 1
        assert folder_id in present and counts[folder_id] == counts[1:].max(), path
        for c in present:
            buckets[size_bucket(int(counts[c]), int(valid.sum()))] += 1
        multi += len(present) >= 2
        banded += (~valid).any()
    assert n == MEDIUM.num_images
    # Every ImageNet-S size bucket is well represented, not just touched.
    assert min(buckets) >= 0.05 * sum(buckets), buckets
    assert 0.03 <= multi / n <= 0.15
    assert 0 < banded < n
    assert 0.1 < banded / n < 0.7
    # Image sizes vary around `size`, including non-square ones.
    assert len(sizes) > 10 and any(h != w for h, w in sizes)
    assert all(0.75 * 64 - 1 <= s <= 1.25 * 64 + 1 for hw in sizes for s in hw)

    # The summary reports what is on disk.
    assert summary["images"] == n
    assert summary["size_buckets_covered"] == 4
    assert list(summary["size_buckets"].values()) == buckets
    assert summary["multi_class_share"] == pytest.approx(multi / n)
    assert summary["ignore_band_share"] == pytest.approx(banded / n)
    assert sum(summary["size_buckets"].values()) == sum(
        summary["splits"][s]["size_buckets"][b] for s in summary["splits"]
        for b in summary["size_buckets"])
    assert 0.2 < summary["mean_object_share"] < 0.6  # objects large on average


def _split_images(root: Path, split: str, k: int):
    """(RGB image, label, class index of its folder) of every image of a split."""
    folder = LABEL_FOLDERS[split]
    for path, label in _all_labels(root):
        if folder in path.parts:
            image = Image.open(root / split / path.parent.name / (path.stem + ".JPEG")).convert("RGB")
            yield image, label, wnids(k).index(path.parent.name)


def _hue_histograms(root: Path, k: int, bins: int = 6) -> dict:
    """{"object" | "background": (class index per train image, its hue histograms over that
    region's pixels, each summing to 1)}."""
    out = {"object": ([], []), "background": ([], [])}
    for image, label, c in _split_images(root, "train", k):
        hue = np.asarray(image.convert("HSV"), np.float32)[..., 0] / 256
        for region, pixels in (("object", label == c + 1), ("background", label == 0)):
            h = np.bincount((hue[pixels] * bins).astype(int), minlength=bins)[:bins]
            out[region][0].append(c)
            out[region][1].append(h / max(h.sum(), 1))
    return {region: (np.array(c), np.array(h)) for region, (c, h) in out.items()}


def _largest_group_gap(groups: np.ndarray, hists: np.ndarray) -> float:
    """Largest gap between a group's mean histogram and the pooled one."""
    pooled = hists.mean(0)
    return max(np.abs(hists[groups == g].mean(0) - pooled).max() for g in np.unique(groups))


def test_colour_says_nothing_about_the_class(medium):
    """Every class's objects (and backgrounds) show the pooled hue histogram, within
    sampling noise; grouping the same images by colour shows what a class-coloured set
    would give."""
    root, _ = medium
    histograms = _hue_histograms(root, MEDIUM.classes)
    for region, (classes, hists) in histograms.items():
        by_class = _largest_group_gap(classes, hists)
        by_colour = _largest_group_gap(hists.argmax(1), hists)
        assert by_class < 0.2 and by_colour > 2 * by_class, (region, by_class, by_colour)
    # Objects and backgrounds draw from one palette.
    obj, bg = (histograms[region][1].mean(0) for region in ("object", "background"))
    assert np.abs(obj - bg).max() < 0.1, (obj.round(2), bg.round(2))


def test_objects_stand_out_by_texture_contrast(medium):
    """The objects' texture contrast (local value spread) exceeds the background's, so an
    object is found by texture, not by colour."""
    root, _ = medium
    obj_spread, bg_spread = [], []
    for image, label, _ in _split_images(root, "validation", MEDIUM.classes):
        v = np.asarray(image.convert("L"), np.float32) / 255
        local = np.abs(v - ndimage.uniform_filter(v, size=5))
        obj_spread.append(local[(label > 0) & (label != IGNORE_INDEX)].mean())
        bg_spread.append(local[label == 0].mean())
    assert np.median(obj_spread) > 1.5 * np.median(bg_spread)


# ----------------------------------------------------------------------------- reuse

def test_same_config_is_reused(tmp_path):
    root = tmp_path / "ds"
    first = generate_dataset(root, TINY, progress=False)
    victim = next((root / "train").rglob("*.JPEG"))
    victim.unlink()  # a reuse must not touch the folder
    again = generate_dataset(root, TINY, progress=False)
    assert again == first
    assert not victim.exists()


def test_different_config_is_refused(tmp_path):
    root = tmp_path / "ds"
    generate_dataset(root, TINY, progress=False)
    before = files_of(root)
    other = SynthConfig(**{**TINY.__dict__, "classes": 4})
    with pytest.raises(LusscoreError, match="different config.*classes"):
        generate_dataset(root, other, progress=False)
    assert files_of(root) == before


def test_foreign_folder_is_refused(tmp_path):
    root = tmp_path / "user"
    root.mkdir()
    (root / "categories.txt").write_text("n01443537\n")
    with pytest.raises(LusscoreError, match="not empty"):
        generate_dataset(root, TINY, progress=False)
    assert (root / "categories.txt").read_text() == "n01443537\n"
    # An existing but empty folder is fine.
    (tmp_path / "empty").mkdir()
    generate_dataset(tmp_path / "empty", TINY, progress=False)
    assert (tmp_path / "empty" / SUMMARY_FILE).is_file()


def test_interrupted_run_is_completed(tmp_path):
    ref, root = tmp_path / "ref", tmp_path / "ds"
    generate_dataset(ref, TINY, progress=False)
    generate_dataset(root, TINY, progress=False)
    # Simulate a crash: no summary yet, the in-progress marker present, files missing.
    (root / SUMMARY_FILE).unlink()
    (root / PENDING_FILE).write_text(json.dumps(
        {"generator_version": json.loads((ref / SUMMARY_FILE).read_text())["generator_version"],
         "config": TINY.__dict__}))
    for p in list((root / "validation-segmentation").rglob("*.png"))[:2]:
        p.unlink()
    generate_dataset(root, TINY, progress=False)
    assert files_of(root) == files_of(ref)
    # An unfinished run of another config is not overwritten.
    (root / SUMMARY_FILE).unlink()
    (root / PENDING_FILE).write_text(json.dumps({"generator_version": 1, "config": {"classes": 9}}))
    with pytest.raises(LusscoreError, match="unfinished"):
        generate_dataset(root, TINY, progress=False)
