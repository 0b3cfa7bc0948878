"""The held-out test split: its layout, `luss infer/evaluate --split test`, test reporting in
`luss run` (every choice on validation, test scored once with validation's match), the skip
line without test (GT), and `luss submit`'s archive."""
import contextlib
import io
import json
import shutil
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from test_pipeline import TINY  # the tiny-run config of the pipeline tests

from lusscore import cli
from lusscore.checkpoint import save_checkpoint
from lusscore.config import apply_overrides, load_config, save_config
from lusscore.data import (
    ImageNetS,
    ImageSample,
    decode_label_rgb,
    image_size,
    read_label_png,
    write_label_png,
)
from lusscore.data.synthetic import SynthConfig, generate_dataset
from lusscore.engine import Runtime
from lusscore.stages import distance_match as dm
from lusscore.stages import run as run_stage
from lusscore.stages.common import StageContext
from lusscore.stages.evaluate import evaluate_predictions
from lusscore.stages import semi
from lusscore.models.pass_models import SegmentationModel
from lusscore.utils import LusscoreError

CPU = Runtime(torch.device("cpu"))
SKIP_LINE = "test evaluation skipped"


def copy_without(root, dest, *patterns):
    shutil.copytree(root, dest, ignore=shutil.ignore_patterns(*patterns))
    return dest


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """The same tiny dataset three ways: with test GT, test images only, no test at all."""
    base = tmp_path_factory.mktemp("data")
    full = base / "full"
    generate_dataset(full, SynthConfig(classes=3, train_per_class=8, val_per_class=3, semi_per_class=1,
                                       test_per_class=2, size=48, seed=2), progress=False)
    return {"full": full,
            "no_gt": copy_without(full, base / "no_gt", "test-segmentation"),
            "no_test": copy_without(full, base / "no_test", "test", "test-segmentation", "test.txt")}


def tiny_cfg(root, *extra):
    return apply_overrides(load_config("demo"), TINY + [f"data.root={root}", *extra])


# ---------------------------------------------------------------------------------------------
# The layout


def test_test_split_layout(roots, tmp_path):
    ds = ImageNetS(roots["full"])
    assert ds.has_images("test") and ds.has_labels("test") and ds.has_labels("validation")
    assert not ds.has_labels("train")  # no GT folder for train in the benchmark layout
    samples = ds.segmentation_samples("test")
    listed = [line.split()[1] for line in (roots["full"] / "names" / "test.txt").read_text().splitlines()]
    assert [s.name for s in samples] == listed and len(samples) == 6
    for s in samples:
        assert s.label == roots["full"] / "test-segmentation" / s.name and s.label.is_file()
        assert s.image.parent.parent == roots["full"] / "test"
        assert read_label_png(s.label).shape == image_size(s.image)
    images = ds.split_images("test")
    assert [(i.image, i.name) for i in images] == [(s.image, s.name) for s in samples]

    # without the names file: a scan of test-segmentation / of test gives the same pairs
    scan = ImageNetS(copy_without(roots["full"], tmp_path / "scan", "test.txt"))
    assert {s.name for s in scan.segmentation_samples("test")} == set(listed)
    assert [i.name for i in scan.split_images("test")] == sorted(listed)

    # test images only (the benchmark): no GT, the images come from the names file or a scan
    no_gt = ImageNetS(roots["no_gt"])
    assert no_gt.has_images("test") and not no_gt.has_labels("test")
    assert [i.name for i in no_gt.split_images("test")] == listed
    predicted = no_gt.prediction_samples("test")
    assert all(isinstance(p, ImageSample) and p.image.is_file() for p in predicted)
    bare = ImageNetS(copy_without(roots["no_gt"], tmp_path / "bare", "test.txt"))
    assert [i.name for i in bare.split_images("test")] == sorted(listed)
    with pytest.raises(FileNotFoundError, match="GT folder not found: .*test-segmentation"):
        no_gt.segmentation_samples("test")

    none = ImageNetS(roots["no_test"])
    assert not none.has_images("test") and not none.has_labels("test")
    with pytest.raises(FileNotFoundError, match="split folder not found: .*test"):
        none.split_images("test")


def test_two_images_with_one_label_name_are_refused(roots, tmp_path):
    root = copy_without(roots["no_gt"], tmp_path / "dup", "test.txt")
    first = min((root / "test").rglob("*.JPEG"))
    shutil.copy(first, first.with_suffix(".png"))  # x.JPEG and x.png would share x.png
    with pytest.raises(LusscoreError, match="both map to"):
        ImageNetS(root).split_images("test")


# ---------------------------------------------------------------------------------------------
# `luss run`: validation tuned, test untouched


@pytest.fixture(scope="module")
def runs(roots, tmp_path_factory):
    """A full `luss run` (all three protocols) on each dataset, with its stdout."""
    out = {}
    for key, root in roots.items():
        run = tmp_path_factory.mktemp(f"run_{key}")
        capture = io.StringIO()
        with contextlib.redirect_stdout(capture):
            torch.manual_seed(0)
            result = run_stage.run_pipeline(StageContext(tiny_cfg(root), run, CPU))
        out[key] = (run, result, capture.getvalue())
    return out


def test_run_scores_test_with_the_validation_choices(runs, roots):
    run, result, stdout = runs["full"]
    ds = ImageNetS(roots["full"])
    test = ds.segmentation_samples("test")
    for protocol in ("unsupervised", "semi", "distance_match"):
        folder = run if protocol == "unsupervised" else run / protocol
        metrics = json.loads((folder / "test" / "metrics.json").read_text())
        assert metrics["num_images"] == len(test)
        for s in test:
            assert read_label_png(folder / "predictions" / "test" / s.name).shape == image_size(s.image)
        assert not (folder / "test" / "match.json").exists()  # test never gets a match of its own
    validation_match = json.loads((run / "match.json").read_text())
    test_metrics = json.loads((run / "test" / "metrics.json").read_text())
    assert {str(k): v for k, v in test_metrics["match"].items()} == validation_match
    assert json.loads((run / "semi" / "test" / "metrics.json").read_text())["match"] is None

    summary = json.loads((run / "protocols.json").read_text())
    assert list(summary) == ["unsupervised", "semi", "distance_match"]
    assert summary["unsupervised"]["mIoU"] == pytest.approx(result["mIoU"])  # validation on top
    assert summary["unsupervised"]["test"]["mIoU"] == pytest.approx(test_metrics["mIoU"])
    assert summary["unsupervised"]["test"]["match"] == "validation"
    assert summary["semi"]["test"]["metrics"] == "semi/test/metrics.json"
    assert summary["distance_match"]["test"]["match"] == "none"
    assert "validation (tuned)" in stdout and "test (untouched)" in stdout
    assert SKIP_LINE not in stdout
    unsup_row = next(line for line in stdout.splitlines() if line.startswith("unsupervised "))
    assert f"{summary['unsupervised']['test']['mIoU']:.2f}" in unsup_row


def test_run_prints_the_floors_of_both_splits(runs, roots):
    """The trivial floors land in the run folder per split and print as `floor` rows under the
    protocols, validation and test side by side."""
    from lusscore.baselines import FLOORS, compute_baselines
    run, _, stdout = runs["full"]
    for split, path in (("validation", run / "baselines.json"),
                        ("test", run / "test" / "baselines.json")):
        saved = json.loads(path.read_text())
        assert saved == compute_baselines(ImageNetS(roots["full"]), split)
    val = json.loads((run / "baselines.json").read_text())["floors"]
    test = json.loads((run / "test" / "baselines.json").read_text())["floors"]
    for name in FLOORS:
        row = next(line for line in stdout.splitlines() if line.startswith(f"floor {name} "))
        cells = row.split()[2:10]
        assert cells[0] == f"{val[name]['mIoU']:.2f}" and cells[4] == f"{test[name]['mIoU']:.2f}"
    # Without test GT only the validation floors exist.
    no_gt = runs["no_gt"][0]
    assert (no_gt / "baselines.json").is_file() and not (no_gt / "test" / "baselines.json").exists()


def test_choices_do_not_depend_on_test(runs):
    """The tau sweep, the clusters, the match and every validation number are the same whether
    the dataset has test GT, test images only, or no test at all."""
    reference = runs["full"][0]
    for key in ("no_gt", "no_test"):
        run = runs[key][0]
        for name in ("sweep_tau.json", "match.json", "cluster/summary.json", "attention_score.json"):
            assert json.loads((run / name).read_text()) == json.loads((reference / name).read_text()), name
        assert load_config(run / "config.yaml")["label"]["tau"] == \
            load_config(reference / "config.yaml")["label"]["tau"]
        a = json.loads((run / "protocols.json").read_text())
        b = json.loads((reference / "protocols.json").read_text())
        for protocol in a:
            assert {k: v for k, v in a[protocol].items() if k != "test"} == \
                {k: v for k, v in b[protocol].items() if k != "test"}, protocol


@pytest.mark.parametrize("key, reason", [("no_gt", "images but no GT"), ("no_test", "no test images")])
def test_run_without_test_gt_or_test_goes_to_the_end(runs, roots, key, reason):
    run, result, stdout = runs[key]
    skip_lines = [line for line in stdout.splitlines() if SKIP_LINE in line]
    assert len(skip_lines) == 1 and reason in skip_lines[0], skip_lines
    summary = json.loads((run / "protocols.json").read_text())
    assert set(summary) == {"unsupervised", "semi", "distance_match"}
    assert all(s["test"] is None for s in summary.values())
    assert summary["unsupervised"]["mIoU"] == pytest.approx(result["mIoU"])
    assert "test (untouched)" in stdout
    expected = [i.name for i in ImageNetS(roots[key]).split_images("test")] if key == "no_gt" else []
    for folder in (run, run / "semi", run / "distance_match"):
        assert (folder / "metrics.json").is_file()
        assert not (folder / "test").exists()
        preds = folder / "predictions" / "test"
        predicted = [p.relative_to(preds).as_posix() for p in preds.rglob("*.png")]
        assert sorted(predicted) == sorted(expected)  # test images are predicted even without GT


def test_rerun_skips_scored_splits_and_redoes_a_missing_one(runs, roots, tmp_path, monkeypatch):
    source = runs["full"][0]
    run = tmp_path / "run"
    shutil.copytree(source, run)
    cfg = tiny_cfg(roots["full"])
    (run / "semi" / "test" / "metrics.json").unlink()
    calls = []
    original = semi.run_semi

    def record(ctx, split):
        calls.append(split)
        return original(ctx, split)

    def fail(*args, **kwargs):
        raise AssertionError("a scored split or a trained stage ran again")

    monkeypatch.setattr(semi, "run_semi", record)
    monkeypatch.setattr(dm, "run_distance_match", fail)
    monkeypatch.setattr("lusscore.stages.finetune.train_segmentation", fail)
    torch.manual_seed(0)
    run_stage.run_pipeline(StageContext(cfg, run, CPU))
    assert calls == ["test"]
    assert json.loads((run / "semi" / "test" / "metrics.json").read_text())["mIoU"] == pytest.approx(
        json.loads((source / "semi" / "test" / "metrics.json").read_text())["mIoU"])
    assert json.loads((run / "protocols.json").read_text()) == json.loads((source / "protocols.json").read_text())


# ---------------------------------------------------------------------------------------------
# Evaluating test with validation's match (no training: hand-made predictions)


def write_permuted(samples, out, permute):
    """The GT of each sample, ids relabelled by permute (ignore -> 'other')."""
    lut = np.arange(1001)
    lut[1000] = 0
    lut[:len(permute)] = permute
    for s in samples:
        write_label_png(out / s.name, lut[read_label_png(s.label)])


def test_test_reuses_the_validation_match(roots, tmp_path, capsys):
    cfg = tiny_cfg(roots["full"])
    run = tmp_path / "run"
    save_config(run / "config.yaml", cfg)
    ds = ImageNetS(roots["full"])
    write_permuted(ds.segmentation_samples("validation"), run / "predictions" / "validation", [0, 2, 3, 1])
    write_permuted(ds.segmentation_samples("test"), run / "predictions" / "test", [0, 3, 1, 2])

    args = ["evaluate", "--run-dir", str(run), "--split", "test", "--workers", "0"]
    assert cli.main(args) == 2  # no validation match yet
    assert "match.json not found" in capsys.readouterr().err
    assert cli.main(["evaluate", "--run-dir", str(run), "--workers", "0"]) == 0  # validation
    val = json.loads((run / "metrics.json").read_text())
    assert val["mIoU"] == pytest.approx(100.0)
    match = json.loads((run / "match.json").read_text())
    assert match == {"0": 0, "1": 3, "2": 1, "3": 2}

    assert cli.main(args) == 0
    assert "test mIoU" in capsys.readouterr().out
    test = json.loads((run / "test" / "metrics.json").read_text())
    assert {str(k): v for k, v in test["match"].items()} == match
    assert test["mIoU"] < 50  # a re-match on test would have scored 100:
    rematched = evaluate_predictions(StageContext(cfg, run, CPU), pred_dir=run / "predictions" / "test",
                                     out_dir=tmp_path / "rematch", split="test")
    assert rematched["mIoU"] == pytest.approx(100.0)
    assert json.loads((run / "match.json").read_text()) == match  # validation's match untouched

    # semi and distance matching: no match on either split
    write_permuted(ds.segmentation_samples("test"), run / "semi" / "predictions" / "test", [0, 1, 2, 3])
    assert cli.main(args + ["--protocol", "semi"]) == 0
    semi_test = json.loads((run / "semi" / "test" / "metrics.json").read_text())
    assert semi_test["mIoU"] == pytest.approx(100.0) and semi_test["match"] is None
    write_permuted(ds.segmentation_samples("test"), run / "distance_match" / "predictions" / "test",
                   [0, 3, 1, 2])
    assert cli.main(args + ["--protocol", "distance_match"]) == 0
    assert json.loads((run / "distance_match" / "test" / "metrics.json").read_text())["mIoU"] < 50


def test_evaluate_command_errors(roots, tmp_path, capsys):
    run = tmp_path / "run"
    save_config(run / "config.yaml", tiny_cfg(roots["no_gt"]))
    assert cli.main(["evaluate", "--run-dir", str(run), "--split", "test"]) == 2
    assert "test-segmentation: no GT label PNGs" in capsys.readouterr().err
    assert cli.main(["evaluate", "--run-dir", str(run), "--match", "hungarian"]) == 2
    assert "drop --match" in capsys.readouterr().err
    assert cli.main(["evaluate", "--split", "test", "--gt", "x", "--pred", "y", "--num-classes", "3"]) == 2
    assert "need --run-dir" in capsys.readouterr().err
    assert cli.main(["evaluate", "--pred", "y"]) == 2
    assert "give --gt, --num-classes" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# `luss infer --split test` and `luss submit` (a random model stands in for finetune.pt)


def fake_finetune(cfg, run):
    torch.manual_seed(0)
    model = SegmentationModel(cfg["model"], cfg["data"]["num_classes"])
    save_checkpoint(run / "finetune.pt", {"model": model.state_dict(), "epoch": 1, "done": True})


@pytest.fixture(scope="module")
def infer_run(roots, tmp_path_factory):
    """A run folder on the GT-less dataset: `luss infer` on validation and test, validation
    evaluated (its match.json) through the command line."""
    run = tmp_path_factory.mktemp("infer") / "run"
    cfg = tiny_cfg(roots["no_gt"])
    save_config(run / "config.yaml", cfg)
    fake_finetune(cfg, run)
    for split in ("validation", "test"):
        assert cli.main(["infer", "--run-dir", str(run), "--split", split, "--device", "cpu"]) == 0
    assert cli.main(["evaluate", "--run-dir", str(run), "--workers", "0"]) == 0
    return run


def test_infer_split_test_with_and_without_gt(infer_run, roots, tmp_path):
    ds = ImageNetS(roots["no_gt"])
    for s in ds.split_images("test"):
        pred = read_label_png(infer_run / "predictions" / "test" / s.name)
        assert pred.shape == image_size(s.image) and 0 <= pred.min() and pred.max() <= 3
    # with test GT the same predictions are scored with the validation match
    run = tmp_path / "run"
    shutil.copytree(infer_run, run)
    cfg = tiny_cfg(roots["full"])
    save_config(run / "config.yaml", cfg)
    shutil.rmtree(run / "predictions" / "test")
    assert cli.main(["infer", "--run-dir", str(run), "--split", "test", "--device", "cpu"]) == 0
    for s in ds.split_images("test"):
        assert np.array_equal(read_label_png(run / "predictions" / "test" / s.name),
                              read_label_png(infer_run / "predictions" / "test" / s.name))
    assert cli.main(["evaluate", "--run-dir", str(run), "--split", "test", "--workers", "0"]) == 0
    test = json.loads((run / "test" / "metrics.json").read_text())
    assert test["num_images"] == 6
    assert {str(k): v for k, v in test["match"].items()} == json.loads((run / "match.json").read_text())


def read_archive(path):
    with zipfile.ZipFile(path) as z:
        return {n: decode_label_rgb(np.asarray(Image.open(io.BytesIO(z.read(n))).convert("RGB")))
                for n in z.namelist()}


def test_submit_writes_relabelled_test_predictions(infer_run, roots, tmp_path, capsys):
    ds = ImageNetS(roots["no_gt"])
    match = {int(k): v for k, v in json.loads((infer_run / "match.json").read_text()).items()}
    out = tmp_path / "sub" / "s.zip"
    assert cli.main(["submit", str(infer_run), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    archive = read_archive(out)
    assert sorted(archive) == sorted(i.name for i in ds.split_images("test"))
    assert all("/" in n and n.split("/")[0] in ds.wnids and n.endswith(".png") for n in archive)
    for name, ids in archive.items():
        pred = read_label_png(infer_run / "predictions" / "test" / name)
        assert np.array_equal(ids, np.vectorize(match.get)(pred)), name
    assert [p.name for p in out.parent.iterdir()] == ["s.zip"]  # no temp file left
    assert cli.main(["submit", str(infer_run)]) == 0
    assert sorted(read_archive(infer_run / "submission.zip")) == sorted(archive)


def test_submit_protocol_without_match_keeps_the_ids(infer_run, roots, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(infer_run, run)
    ds = ImageNetS(roots["full"])
    write_permuted(ds.segmentation_samples("test"), run / "semi" / "predictions" / "test", [0, 3, 1, 2])
    assert cli.main(["submit", str(run), "--protocol", "semi"]) == 0
    for name, ids in read_archive(run / "semi" / "submission.zip").items():
        assert np.array_equal(ids, read_label_png(run / "semi" / "predictions" / "test" / name))


def test_submit_refuses_missing_extra_and_unmatched(infer_run, roots, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(infer_run, run)
    preds = run / "predictions" / "test"
    names = sorted(p.relative_to(preds).as_posix() for p in preds.rglob("*.png"))
    out = tmp_path / "s.zip"
    out.write_bytes(b"old")

    (preds / names[0]).unlink()
    assert cli.main(["submit", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "1 of 6 test image(s) have no prediction" in err and names[0] in err
    assert out.read_bytes() == b"old"  # nothing written

    shutil.copy(preds / names[1], preds / names[0])
    shutil.copy(preds / names[1], preds / "n90000001" / "stray.png")
    assert cli.main(["submit", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "1 prediction(s) match no test image: n90000001/stray.png" in err and "no prediction" not in err
    (preds / "n90000001" / "stray.png").unlink()
    assert cli.main(["submit", str(run), "--out", str(out)]) == 2  # names[1]'s map, not names[0]'s size
    assert "does not match the expected" in capsys.readouterr().err

    size = image_size(ImageNetS(roots["no_gt"]).split_images("test")[0].image)
    assert names[0] == ImageNetS(roots["no_gt"]).split_images("test")[0].name
    write_label_png(preds / names[0], np.full(size, 7))
    assert cli.main(["submit", str(run), "--out", str(out)]) == 2
    assert "[7] map to no class id 0..3 through the validation match" in capsys.readouterr().err
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["run", "s.zip"]

    (run / "match.json").unlink()
    assert cli.main(["submit", str(run)]) == 2
    assert "match.json not found" in capsys.readouterr().err
    assert "submit" in cli._usage()


def test_report_shows_validation_and_test_beside_the_floors(runs):
    """The report's floors table: every protocol and floor, validation and test columns."""
    from lusscore.report import write_report
    run = runs["full"][0]
    page = write_report(run, rows=0).read_text()
    assert "<th>mIoU (validation)</th>" in page and "<th>mIoU (test)</th>" in page
    val = json.loads((run / "baselines.json").read_text())["floors"]["centre_disc"]
    test = json.loads((run / "test" / "baselines.json").read_text())["floors"]["centre_disc"]
    row = page[page.index("<td>floor centre_disc</td>"):].split("</tr>")[0]
    assert f"<td>{val['mIoU']:.2f}</td>" in row and f"<td>{test['mIoU']:.2f}</td>" in row
    semi_test = json.loads((run / "semi" / "test" / "metrics.json").read_text())["mIoU"]
    row = page[page.index("<td>semi-supervised</td>"):].split("</tr>")[0]
    assert f"<td>{semi_test:.2f}</td>" in row
    # Without test GT the table has validation columns only.
    no_gt = write_report(runs["no_gt"][0], rows=0).read_text()
    assert "<th>mIoU (validation)</th>" in no_gt and "<th>mIoU (test)</th>" not in no_gt
