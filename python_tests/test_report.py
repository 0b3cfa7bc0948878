"""`luss report`: one HTML page with PNG figures of a finished run folder."""
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from lusscore.cli import main as luss
from lusscore.data import ImageNetS, read_label_png, write_label_png
from lusscore.data.synthetic import SynthConfig, generate_dataset
from lusscore.engine import Runtime
from lusscore.report import PROTOCOLS, read_jsonl, save_picture, smooth, write_report
from lusscore.stages.layout import RunDir
from lusscore.utils import LusscoreError

CLASSES = 3


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    generate_dataset(root, SynthConfig(classes=CLASSES, train_per_class=1, val_per_class=3,
                                       semi_per_class=1, size=48, seed=3), progress=False)
    return root


def _write_jsonl(path: Path, records: list[dict], extra_lines: list[str] = ()) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "".join(extra_lines))


def _losses(stage: str, iters: int, components: bool) -> list[dict]:
    out = []
    for i in range(iters):
        rec = {"stage": stage, "epoch": i // 10, "iter": i, "loss": 3.0 * np.exp(-i / 20) + 0.1,
               "lr": 0.5 * (1 - i / iters), "img_s": 40.0 + i % 3, "time": 1000.0 + 2 * i}
        if components:
            rec.update(loss_swav=2.0 - i / iters, loss_d2s=1.0, loss_p2p=0.5 + i / (2 * iters))
        out.append(rec)
    return out


def make_run(tmp_path: Path, root: Path, name: str = "tiny") -> Path:
    """A finished run built by hand on the tiny dataset: predictions are the GT with permuted
    ids (so the Hungarian match is non-trivial), scored by the pipeline's own evaluate step."""
    from lusscore.stages.common import StageContext
    from lusscore.stages.evaluate import evaluate_predictions

    run = tmp_path / "run"
    cfg = {"name": name, "seed": 0, "data": {"root": str(root), "num_classes": CLASSES},
           "model": {"arch": "resnet18", "width": 8}, "pretrain": {"epochs": 3},
           "label": {"tau": 0.4, "sweep": [0.3, 0.5, 0.1]}, "finetune": {"epochs": 1}}
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    perm = np.array([0, 2, 3, 1])
    rng = np.random.default_rng(0)
    for s in ImageNetS(root).segmentation_samples("validation"):
        gt = read_label_png(s.label)
        pred = perm[np.where(gt == 1000, 0, gt)]
        pred[: gt.shape[0] // 4] = 0  # imperfect, so the IoUs differ from 100
        write_label_png(run / "predictions" / "validation" / s.name, pred)
        write_label_png(run / "labels" / "validation" / s.name, perm[np.where(gt == 1000, 0, gt)])
        att = rng.random((gt.shape[0] // 8, gt.shape[1] // 8)).astype(np.float32)
        np.save((run / "labels" / "validation" / s.name).with_suffix(".npy"), att)
    evaluate_predictions(StageContext(cfg, run, Runtime(torch.device("cpu"))))
    sweep = {"best_tau": 0.4, "best": {"mIoU": 55.5, "mBIoU": 40.1, "Acc": 70.0, "FMeasure": 60.2},
             "table": [{"tau": 0.3, "mIoU": 50.0, "FMeasure": 58.0},
                       {"tau": 0.4, "mIoU": 55.5, "FMeasure": 60.2},
                       {"tau": 0.5, "mIoU": 52.0, "FMeasure": 59.0}]}
    (run / "sweep_tau.json").write_text(json.dumps(sweep))
    # pretrain: resumed once (iterations 10..14 logged twice) and a torn last line.
    pre = _losses("pretrain", 30, components=True)
    _write_jsonl(run / "pretrain.jsonl", pre[:15] + pre[10:], ['{"stage": "pretrain", "ep'])
    _write_jsonl(run / "attention.jsonl", _losses("attention", 12, components=False))
    _write_jsonl(run / "finetune.jsonl", _losses("finetune", 8, components=False))
    return run


def add_protocol(run: Path, key: str, miou: float) -> None:
    """A second protocol's outputs: the unsupervised ones with another mIoU."""
    p = next(p for p in PROTOCOLS if p.key == key)
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["mIoU"] = miou
    metrics["match"] = None  # these protocols predict GT ids directly
    folder = RunDir(run).protocol_dir(p.key)
    folder.mkdir(parents=True, exist_ok=True)
    (p.metrics_path(run)).write_text(json.dumps(metrics))
    shutil.copytree(run / "predictions", folder / "predictions")


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links = []

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k in ("href", "src"):
                self.links.append(v)


def links_of(index: Path) -> list[str]:
    parser = _Links()
    parser.feed(index.read_text())
    return parser.links


def assert_valid_png(path: Path) -> tuple[int, int]:
    assert path.is_file() and path.stat().st_size > 0, path
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()
    with Image.open(path) as im:
        im.load()
        assert im.width > 0 and im.height > 0
        return im.size


def test_report_of_a_run(tiny_root, tmp_path):
    run = make_run(tmp_path, tiny_root)
    add_protocol(run, "semi", 61.237)
    index = write_report(run)
    assert index == run / "report" / "index.html"
    assert index.stat().st_mode & 0o777 == 0o644  # readable by whoever is shown the page
    page = index.read_text()
    links = links_of(index)
    assert links, "the page links its figures"
    for link in links:
        assert not re.match(r"^[a-z]+:|^/", link), f"not a relative link: {link}"
        assert (index.parent / link).is_file(), link
    for name in ("iou_unsupervised.png", "iou_semi.png", "tau.png", "loss_pretrain.png",
                 "loss_attention.png", "loss_finetune.png", "grid.png"):
        assert name in links, name
        assert_valid_png(index.parent / name)
    metrics = json.loads((run / "metrics.json").read_text())
    assert f"{metrics['mIoU']:.2f}" in page and f"{metrics['mBIoU']:.2f}" in page
    assert "61.24" in page  # the semi-supervised mIoU, formatted from its metrics.json
    # The distance-matching protocol did not run, and the page says so.
    assert "not run" in page and "distance matching" in page and "distance_match/metrics.json" in page
    assert "semi.jsonl" in page  # no loss log of that stage
    # The pretrain log: 30 distinct iterations (the resumed ones counted once), 1 torn line.
    assert "pretrain: 30 iterations; 1 unreadable log line(s) skipped" in page
    # Every class in the full table, wnids as names.
    for wnid in ImageNetS(tiny_root).wnids:
        assert wnid in page
    # The grid: image, GT, pseudo label, 2 protocols, attention = 6 columns of 200 px.
    width, height = assert_valid_png(index.parent / "grid.png")
    assert width == 6 * 200 and height == 6 * 200


def test_missing_protocols_and_files_are_reported(tiny_root, tmp_path):
    run = make_run(tmp_path, tiny_root)
    (run / "sweep_tau.json").unlink()
    (run / "pretrain.jsonl").unlink()
    for att in (run / "labels").rglob("*.npy"):
        att.unlink()
        break
    page = write_report(run, rows=2).read_text()
    assert "semi-supervised (no semi/metrics.json)" in page
    assert "distance matching (no distance_match/metrics.json)" in page
    assert "no sweep_tau.json: tau was fixed at 0.400" in page
    assert "pretrain.jsonl" in page
    assert not (run / "report" / "tau.png").exists()
    page = write_report(run, rows=0).read_text()
    assert "no grid: 0 rows asked for" in page and not (run / "report" / "grid.png").exists()


def test_all_three_protocols_side_by_side(tiny_root, tmp_path):
    run = make_run(tmp_path, tiny_root)
    add_protocol(run, "semi", 61.237)
    add_protocol(run, "distance_match", 47.0)
    page = write_report(run, rows=1).read_text()
    assert "not run" not in page
    header = re.search(r"<th>metric \(%\)</th>(.*?)</tr>", page).group(1)
    assert header == "<th>fully unsupervised</th><th>semi-supervised</th><th>distance matching</th>"
    assert "61.24" in page and "47.00" in page
    assert_valid_png(run / "report" / "iou_distance_match.png")
    width, _ = assert_valid_png(run / "report" / "grid.png")
    assert width == 7 * 200


def test_rerun_overwrites_cleanly(tiny_root, tmp_path):
    run = make_run(tmp_path, tiny_root)
    add_protocol(run, "semi", 61.237)
    write_report(run, rows=1)
    assert (run / "report" / "iou_semi.png").is_file()
    shutil.rmtree(run / "semi")
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["mIoU"] = 12.3456
    (run / "metrics.json").write_text(json.dumps(metrics))
    page = write_report(run, rows=1).read_text()
    assert "12.35" in page and "61.24" not in page
    left = sorted(p.name for p in (run / "report").iterdir())
    assert "iou_semi.png" not in left  # the figure of a protocol no longer there is gone
    assert not [n for n in left if n.startswith(".") or n.endswith(".tmp")]  # no temporary files
    for link in links_of(run / "report" / "index.html"):
        assert (run / "report" / link).is_file()


def test_not_a_run_folder_errors_name_the_missing_file(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="run folder not found"):
        write_report(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LusscoreError, match=r"not a run folder: .*config\.yaml is missing"):
        write_report(empty)
    (empty / "config.yaml").write_text("name: x\n")
    with pytest.raises(LusscoreError, match=r"not a finished run: .*metrics\.json is missing"):
        write_report(empty)
    (empty / "metrics.json").write_text("{not json")
    with pytest.raises(LusscoreError, match=r"metrics\.json: not valid JSON"):
        write_report(empty)
    assert luss(["report", str(tmp_path / "empty2")]) == 2
    assert "run folder not found" in capsys.readouterr().err
    (empty / "metrics.json").unlink()
    assert luss(["report", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "luss report: error:" in err and "metrics.json is missing" in err


def test_cli_prints_the_page_and_escapes_text(tiny_root, tmp_path, capsys):
    run = make_run(tmp_path, tiny_root, name="<script>alert(1)</script> & co")
    assert luss(["report", str(run), "--rows", "2"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert Path(printed) == run / "report" / "index.html"
    page = Path(printed).read_text()
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in page
    _, height = assert_valid_png(run / "report" / "grid.png")
    assert height == 2 * 200


def test_919_classes_without_the_dataset(tmp_path):
    """A big benchmark run whose dataset moved: bars show the best and worst classes, the
    table every class; no grid, and the page says why."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"name": "s919", "data": {
        "root": str(tmp_path / "moved"), "num_classes": 919}}))
    rng = np.random.default_rng(1)
    ious = [float(v) for v in rng.uniform(0, 100, 920)]
    ious[5] = None  # a class absent from GT and prediction
    metrics = {"Acc": 50.0, "mIoU": 44.4444, "mBIoU": 30.0, "FMeasure": 55.0, "IoUs": ious,
               "BIoUs": ious, "match": {str(i): i for i in range(920)}, "num_images": 12419}
    (run / "metrics.json").write_text(json.dumps(metrics))
    page = write_report(run, top=15).read_text()
    assert "44.44" in page and "12419" in page
    assert "the 15 best and 15 worst of 919 classes" in page
    assert "1 class(es) without a score" in page
    assert page.count("<tr><td>") >= 920  # the full per-class table
    assert "dataset not readable" in page and "no grid" in page
    assert not (run / "report" / "grid.png").exists()
    assert_valid_png(run / "report" / "iou_unsupervised.png")


def test_demo_picture_from_the_shared_function(tiny_root, tmp_path):
    """The demo's picture: image, GT, pseudo label, prediction, attention (5 columns)."""
    run = make_run(tmp_path, tiny_root)
    match = {int(k): v for k, v in json.loads((run / "match.json").read_text()).items()}
    rows = save_picture(run, ImageNetS(tiny_root), [("prediction", run / "predictions" / "validation",
                                                     match)], 0.4, run / "demo.png", rows=4,
                        pseudo_match=match)
    assert rows == 4
    assert assert_valid_png(run / "demo.png") == (5 * 200, 4 * 200)


def test_log_reading_and_smoothing(tmp_path):
    log = tmp_path / "x.jsonl"
    recs = _losses("x", 6, components=False)
    _write_jsonl(log, recs[:4] + [dict(recs[2], loss=9.0)] + recs[3:], ["garbage\n", "[1, 2]\n"])
    records, bad = read_jsonl(log)
    assert [r["iter"] for r in records] == list(range(6))
    assert records[2]["loss"] == 9.0  # the resumed (later) record of an iteration wins
    assert bad == 2
    v = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    np.testing.assert_allclose(smooth(v, 2), [1.0, 1.5, 2.5, 3.5, 4.5])
    np.testing.assert_allclose(smooth(v, 1), v)


def test_report_of_a_real_tiny_pipeline_run(tmp_path):
    """The whole chain on a tiny synthetic set: `luss run`'s outputs make a full page."""
    from test_pipeline import tiny_cfg

    from lusscore.config import save_config
    from lusscore.stages.common import StageContext
    from lusscore.stages.run import run_pipeline

    root = tmp_path / "data"
    generate_dataset(root, SynthConfig(classes=3, train_per_class=8, val_per_class=2, semi_per_class=1,
                                       size=48, seed=2), progress=False)
    cfg = tiny_cfg(root)
    cfg["pretrain"]["epochs"] = 1
    cfg["label"]["sweep"] = [0.3, 0.5, 0.1]
    run = tmp_path / "run"
    save_config(run / "config.yaml", cfg)
    torch.manual_seed(0)
    result = run_pipeline(StageContext(cfg, run, Runtime(torch.device("cpu"))))
    page = write_report(run, rows=3).read_text()
    assert f"{result['mIoU']:.2f}" in page
    sweep = json.loads((run / "sweep_tau.json").read_text())
    assert f"best tau {sweep['best_tau']:.3f}" in page
    for stage in ("pretrain", "attention", "finetune", "semi"):
        assert_valid_png(run / "report" / f"loss_{stage}.png")
    for link in links_of(run / "report" / "index.html"):
        assert_valid_png(run / "report" / link)
    # the demo config runs all three protocols: each one's mIoU is on the page, none is missing
    protocols = json.loads((run / "protocols.json").read_text())
    assert set(protocols) == {"unsupervised", "semi", "distance_match"}
    for summary in protocols.values():
        assert f"{summary['mIoU']:.2f}" in page
    assert "metrics.json)" not in page
