"""`luss baselines`: the trivial floors on hand-made sets whose answers are known."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from lusscore.baselines import (
    FLOOR_KEYS,
    FLOORS,
    compute_baselines,
    format_floors,
    read_baselines,
    write_baselines,
)
from lusscore.cli import main as luss
from lusscore.data import ImageNetS, read_label_png, write_categories, write_label_png, write_names
from lusscore.data.imagenet_s import SEGMENTATION_SPLITS
from lusscore.utils import LusscoreError

WNIDS = ["n00000001", "n00000002", "n00000003"]
COLOURS = {1: (220, 30, 30), 2: (30, 200, 40), 3: (40, 60, 230)}
GREY = (128, 128, 128)
SIZES = ((24, 32), (36, 48))  # boundary dilation d = 1 and 2


def make_set(root, items, wnids=WNIDS, split="validation"):
    """An ImageNet-S split from (wnid, RGB image, label map) triples; PNG images so that
    flat colours stay flat."""
    write_categories(root / "categories.txt", wnids)
    pairs = []
    for i, (w, rgb, label) in enumerate(items):
        name = f"{w}/{w}_{i}.png"
        (root / split / w).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(root / split / name)
        write_label_png(root / f"{split}-segmentation" / name, label)
        pairs.append((name, name))
    write_names(root / "names" / f"{split}.txt", pairs)
    return ImageNetS(root)


def rect_items(seed, per_class, colour_blind=False, ignore=False):
    """Per class, images with one flat rectangle (never touching the border) on a flat
    background. Colour-coded: class colours on grey. Colour-blind: object and background
    colours drawn from the same uniform law, unrelated to the class."""
    rng = np.random.default_rng(seed)
    items = []
    for c, w in enumerate(WNIDS, 1):
        for i in range(per_class):
            h, wd = SIZES[i % 2]
            oh, ow = rng.integers(6, h // 2 + 1), rng.integers(6, wd // 2 + 1)
            top, left = rng.integers(3, h - 3 - oh + 1), rng.integers(3, wd - 3 - ow + 1)
            label = np.zeros((h, wd), dtype=np.int64)
            label[top:top + oh, left:left + ow] = c
            bg, fg = (rng.integers(0, 256, 3), rng.integers(0, 256, 3)) if colour_blind \
                else (GREY, COLOURS[c])
            rgb = np.empty((h, wd, 3), dtype=np.uint8)
            rgb[:] = bg
            rgb[label == c] = fg
            if ignore:
                label[h - 2:, : wd // 3] = 1000  # an unlabelled strip in the background
            items.append((w, rgb, label))
    return items


def disc(h, w, radius=0.3):
    """The centre prior by its definition: pixel centres within radius x shorter side of
    the image centre."""
    yy, xx = np.mgrid[0:h, 0:w]
    return (yy + 0.5 - h / 2) ** 2 + (xx + 0.5 - w / 2) ** 2 <= (radius * min(h, w)) ** 2


def disc_items(wnids, per_class):
    items = []
    for c, w in enumerate(wnids, 1):
        for i in range(per_class):
            h, wd = ((30, 20), (24, 32))[i % 2]  # the shorter side is either one
            label = np.where(disc(h, wd), c, 0)
            rgb = np.full((h, wd, 3), 90, dtype=np.uint8)
            rgb[label == c] = (200, 180, 20)
            items.append((w, rgb, label))
    return items


def band(label, d):
    """The official boundary band of every label at once: a pixel whose (2d+1)^2 window
    holds another label or leaves the image."""
    h, w = label.shape
    pad = np.pad(label, d, constant_values=-1)
    out = np.zeros((h, w), dtype=bool)
    for dy in range(2 * d + 1):
        for dx in range(2 * d + 1):
            out |= pad[dy:dy + h, dx:dx + w] != label
    return out


@pytest.fixture(scope="module")
def coded(tmp_path_factory):
    """The colour-coded set (with ignore strips) and its floors, predictions kept."""
    tmp = tmp_path_factory.mktemp("coded")
    ds = make_set(tmp / "ds", rect_items(0, per_class=3, ignore=True))
    return ds, compute_baselines(ds, "validation", seed=0, work_dir=tmp / "work"), tmp / "work"


@pytest.fixture(scope="module")
def blind(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("blind")
    ds = make_set(tmp / "ds", rect_items(1, per_class=4, colour_blind=True))
    return ds, compute_baselines(ds, "validation", seed=0, work_dir=tmp / "work"), tmp / "work"


def test_result_is_plain_json_with_every_floor(coded):
    result = coded[1]
    assert json.loads(json.dumps(result)) == result
    assert result["split"] == "validation" and result["match"] == "hungarian"
    assert result["num_classes"] == 3 and result["num_images"] == 9
    assert list(result["floors"]) == list(FLOORS)
    for m in result["floors"].values():
        assert set(m) == set(FLOOR_KEYS)
        assert all(isinstance(v, float) and 0 <= v <= 100 for v in m.values())


def test_colour_floor_solves_a_colour_coded_set(coded):
    ds, result, work = coded
    m = result["floors"]["colour_kmeans"]
    assert m["mIoU"] == pytest.approx(100, abs=1e-3)
    assert m["Acc"] == pytest.approx(100, abs=1e-3)
    assert m["FMeasure"] == pytest.approx(100, abs=1e-3)
    assert 80 < m["mBIoU"] < 100  # GT pixels next to the ignore strips are boundary
    # The grey border cluster is 'other': the predictions' background is 0.
    for s in ds.segmentation_samples("validation"):
        gt, pred = read_label_png(s.label), read_label_png(work / "colour_kmeans" / s.name)
        assert (pred[gt == 0] == 0).all()
        assert len(np.unique(pred[(gt > 0) & (gt != 1000)])) == 1


def test_colour_floor_is_low_when_colour_says_nothing(blind, coded):
    miou = blind[1]["floors"]["colour_kmeans"]["mIoU"]
    assert 0 <= miou < 20
    assert miou < coded[1]["floors"]["colour_kmeans"]["mIoU"] - 70


def test_all_other_floor_by_hand(coded):
    ds, result, _ = coded
    k = ds.num_classes
    g0 = n = bi = bo = bg = 0
    for s in ds.segmentation_samples("validation"):
        gt = read_label_png(s.label)
        valid = gt != 1000
        g0 += (gt == 0).sum()
        n += valid.sum()
        h, w = gt.shape
        d = max(1, round(0.03 * np.hypot(h, w)))
        pred_band = band(np.zeros_like(gt), d)  # an all-0 map: the frame of width d
        gt_band0 = band(gt, d) & (gt == 0)
        bi += (valid & pred_band & gt_band0).sum()
        bo += (valid & pred_band).sum()
        bg += (valid & gt_band0).sum()
    m = result["floors"]["all_other"]
    # Only 'other' has a nonzero IoU; the mean runs over all K + 1 classes.
    assert m["mIoU"] == pytest.approx(100 * g0 / n / (k + 1), abs=1e-3)
    assert m["mBIoU"] == pytest.approx(100 * bi / (bo + bg - bi) / (k + 1), abs=1e-3)
    assert m["Acc"] == 0 and m["FMeasure"] == 0
    assert 15 < m["mIoU"] < 25  # background is most of each image


def test_centre_disc_is_the_documented_disc(coded):
    ds, _, work = coded
    for s in ds.segmentation_samples("validation"):
        pred = read_label_png(work / "centre_disc" / s.name)
        assert ((pred > 0) == disc(*pred.shape)).all()
        ids = np.unique(pred[pred > 0])
        assert len(ids) == 1 and 1 <= ids[0] <= 3


def test_centre_disc_on_disc_objects(tmp_path):
    one = make_set(tmp_path / "one", disc_items(WNIDS[:1], per_class=3), wnids=WNIDS[:1])
    m = compute_baselines(one, "validation")["floors"]["centre_disc"]
    for key in FLOOR_KEYS:  # one class: the disc and its id are the answer
        assert m[key] == pytest.approx(100, abs=1e-3), key
    three = make_set(tmp_path / "three", disc_items(WNIDS, per_class=3))
    m = compute_baselines(three, "validation")["floors"]["centre_disc"]
    assert m["FMeasure"] == pytest.approx(100, abs=1e-3)  # foreground exactly right
    assert 25 < m["mIoU"] < 100  # 'other' is exact, the random ids are not all matched


def test_seed_determinism(blind, tmp_path):
    ds, first, work = blind
    again = compute_baselines(ds, "validation", seed=0, work_dir=tmp_path / "again")
    assert again == first
    names = [s.name for s in ds.segmentation_samples("validation")]
    for floor in FLOORS:
        for name in names:
            assert (work / floor / name).read_bytes() == (tmp_path / "again" / floor / name).read_bytes()
    compute_baselines(ds, "validation", seed=1, work_dir=tmp_path / "other")
    def disc_ids(root):
        return [read_label_png(root / "centre_disc" / n).max() for n in names]
    assert disc_ids(work) != disc_ids(tmp_path / "other")


def test_format_floors(coded):
    result = coded[1]
    lines = format_floors(result).splitlines()
    assert lines[0].split() == ["protocol", "mIoU", "mBIoU", "Acc", "F", "match"]
    assert [line.split()[:2] for line in lines[1:]] == [["floor", f] for f in FLOORS]
    row = lines[1].split()
    m = result["floors"]["colour_kmeans"]
    assert row[2:] == [f"{m[k]:.2f}" for k in FLOOR_KEYS] + ["hungarian"]
    # Right-aligned columns: the match column starts at the same place on every line.
    assert {lines[0].index("  match")} == {line.index("  hungarian") for line in lines[1:]}
    assert len(format_floors(result, header=False).splitlines()) == 3


def test_cli_writes_baselines_json(coded, tmp_path, capsys):
    ds, result, _ = coded
    out = tmp_path / "b" / "baselines.json"
    assert luss(["baselines", "--data", str(ds.root), "--split", "validation", "--out", str(out),
                 "--num-classes", "3", "--workers", "0", "--quiet"]) == 0
    assert read_baselines(out) == result
    printed = capsys.readouterr().out
    assert "floor colour_kmeans" in printed and "floor all_other" in printed
    assert "100.00" in printed and str(out) in printed
    assert not list(out.parent.glob(".*.tmp*"))  # atomic write left no temporary behind


def test_errors_name_the_problem(coded, tmp_path, capsys):
    ds, _, _ = coded
    missing = tmp_path / "nowhere"
    assert luss(["baselines", "--data", str(missing), "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "dataset root not found" in err and str(missing) in err
    assert luss(["baselines", "--data", str(ds.root), "--split", "train", "--quiet",
                 "--out", str(tmp_path / "x.json")]) == 2
    assert "'train'" in capsys.readouterr().err
    assert luss(["baselines", "--data", str(ds.root), "--num-classes", "5", "--quiet",
                 "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "3 classes" in err and "num_classes=5" in err
    assert not (tmp_path / "x.json").exists()

    with pytest.raises(LusscoreError, match="test"):
        compute_baselines(ds, "test")  # no test split with GT here
    with pytest.raises(LusscoreError, match="match"):
        compute_baselines(ds, "validation", match="bogus")

    root = tmp_path / "copy"
    shutil.copytree(ds.root, root)
    lost = ds.segmentation_samples("validation")[4].name
    (root / "validation-segmentation" / lost).unlink()
    with pytest.raises(LusscoreError, match="1 GT label file.*" + lost):
        compute_baselines(ImageNetS(root), "validation")
    shutil.rmtree(root / "validation-segmentation")
    (root / "names" / "validation.txt").unlink()
    with pytest.raises(LusscoreError, match="no ground truth"):
        compute_baselines(ImageNetS(root), "validation")


def test_report_shows_the_floors(coded, tmp_path):
    import yaml

    from lusscore.report import write_report
    from lusscore.stages.evaluate import evaluate

    ds, result, work = coded
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(
        {"name": "floors", "data": {"root": str(ds.root), "num_classes": 3}}))
    metrics = evaluate(ds.root / "validation-segmentation", work / "colour_kmeans", 3,
                       match="hungarian")
    (run / "metrics.json").write_text(json.dumps(metrics))

    page = write_report(run, rows=0).read_text()
    assert "no baselines.json" in page and "floor colour_kmeans" not in page

    write_baselines(run / "baselines.json", result)
    page = write_report(run, rows=0).read_text()
    for floor in FLOORS:
        assert f"<td>floor {floor}</td>" in page
    m = result["floors"]["all_other"]
    assert f"<td>floor all_other</td><td>{m['mIoU']:.2f}</td><td>{m['mBIoU']:.2f}</td>" in page
    assert "<td>fully unsupervised</td><td>100.00</td>" in page  # the protocol beside them

    (run / "baselines.json").write_text("{not json")
    page = write_report(run, rows=0).read_text()
    assert "not valid JSON" in page


@pytest.mark.skipif("test" not in SEGMENTATION_SPLITS, reason="ImageNetS has no labelled test split")
def test_test_split(tmp_path):
    ds = make_set(tmp_path / "ds", rect_items(0, per_class=2), split="test")
    result = compute_baselines(ds, "test")
    assert result["split"] == "test" and result["num_images"] == 6
    assert result["floors"]["colour_kmeans"]["mIoU"] == pytest.approx(100, abs=1e-3)
    shutil.rmtree(tmp_path / "ds" / "test-segmentation")  # images listed, GT on a server
    with pytest.raises(LusscoreError, match="'test' has no ground truth"):
        compute_baselines(ds, "test")
