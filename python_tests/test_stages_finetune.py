"""Fine-tuning and inference stages on a tiny synthetic set: learning, exact resume, outputs."""
import shutil

import pytest
import torch

from lusscore.config import apply_overrides, load_config
from lusscore.data import ImageNetS, read_label_png
from lusscore.data.synthetic import SynthConfig, generate_dataset
from lusscore.engine import Runtime
from lusscore.stages import finetune as ft
from lusscore.stages import infer
from lusscore.stages.common import StageContext
from python_tests.conftest import crash_after_first_checkpoint

TINY = ["model.width=8", "finetune.batch_size=8", "finetune.crop=32", "finetune.label_size=16",
        "finetune.epochs=2", "finetune.init=none", "infer.resize=32"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    generate_dataset(root, SynthConfig(classes=3, train_per_class=6, val_per_class=2, semi_per_class=1,
                                       size=40, seed=1), progress=False)
    return root


def tiny_run(tmp_path, root):
    cfg = apply_overrides(load_config("demo"), TINY + [f"data.root={root}", "data.num_classes=3"])
    run = tmp_path / "run"
    shutil.copytree(root / "train-segmentation", run / "labels" / "train")
    return cfg, run


def train(cfg, run):
    ds = ImageNetS(cfg["data"]["root"])
    images = {p.relative_to(ds.split_dir("train")).with_suffix("").as_posix(): p
              for p, _ in ds.image_samples("train")}
    pairs = ft.label_pairs(run / "labels" / "train", images)
    torch.manual_seed(0)
    ctx = StageContext(cfg, run, Runtime(torch.device("cpu")))
    model = ft.build_segmentation_model(ctx, "none")
    return ft.train_segmentation(ctx, "finetune", pairs, model)


def test_resume_after_crash_matches_uninterrupted_run(tmp_path, tiny_data, monkeypatch):
    cfg, run_a = tiny_run(tmp_path / "a", tiny_data)
    full = train(cfg, run_a).state_dict()

    cfg, run_b = tiny_run(tmp_path / "b", tiny_data)
    with crash_after_first_checkpoint(monkeypatch):
        train(cfg, run_b)
    assert torch.load(run_b / "finetune.pt", weights_only=False)["epoch"] == 1
    resumed = train(cfg, run_b).state_dict()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    state = torch.load(run_b / "finetune.pt", weights_only=False)
    assert state["done"] and state["epoch"] == 2 and (run_b / "finetune.yaml").is_file()
    losses = [line for line in (run_b / "finetune.jsonl").read_text().splitlines()]
    assert len(losses) > 0


def test_finetuning_fits_its_labels(tmp_path, tiny_data):
    """Trained on the GT of the training images, the head reproduces much of it: its pixel
    accuracy there is well above that of predicting 'other' everywhere, and the loss falls."""
    import json
    import numpy as np
    from lusscore.data.imagenet_s import SegmentationSample
    cfg, run = tiny_run(tmp_path, tiny_data)
    # Output stride 8: a 32 px crop gives 4x4 logits, fine enough to fit these maps.
    cfg = apply_overrides(cfg, ["finetune.epochs=80", "finetune.base_lr=1.0", "model.output_stride=8"])
    model = train(cfg, run)
    ds = ImageNetS(tiny_data)
    samples = [SegmentationSample(image=p, label=run / "labels" / "train" / name, name=name)
               for p, _ in ds.image_samples("train")
               for name in [p.relative_to(ds.split_dir("train")).with_suffix(".png").as_posix()]]
    out = tmp_path / "pred"
    infer.predict_split(model, samples, out, Runtime(torch.device("cpu")), resize=32)
    hits = others = pixels = 0
    for s in samples:
        pred, gt = read_label_png(out / s.name), read_label_png(s.label)
        valid = gt != 1000
        hits += int((pred[valid] == gt[valid]).sum())
        others += int((gt[valid] == 0).sum())
        pixels += int(valid.sum())
    assert hits / pixels > others / pixels + 0.1, (hits / pixels, others / pixels)
    log = [json.loads(line) for line in (run / "finetune.jsonl").read_text().splitlines()]
    first, last = (np.mean([r["loss"] for r in log if r["epoch"] == e]) for e in (0, 79))
    assert last < 0.75 * first, (first, last)


def test_infer_writes_valid_predictions_and_resumes(tmp_path, tiny_data):
    cfg, run = tiny_run(tmp_path, tiny_data)
    model = train(cfg, run)
    rt = Runtime(torch.device("cpu"))
    samples = ImageNetS(tiny_data).segmentation_samples("validation")
    out = run / "predictions" / "validation"
    assert infer.predict_split(model, samples, out, rt, resize=32) == len(samples)
    for s in samples:
        pred, gt = read_label_png(out / s.name), read_label_png(s.label)
        assert pred.shape == gt.shape and pred.min() >= 0 and pred.max() <= 3
    (out / samples[0].name).write_bytes(b"torn")  # a damaged output is redone, the rest skipped
    assert infer.predict_split(model, samples, out, rt, resize=32) == 1
    assert read_label_png(out / samples[0].name).shape == read_label_png(samples[0].label).shape


def test_finetune_errors(tmp_path, tiny_data):
    cfg, run = tiny_run(tmp_path, tiny_data)
    with pytest.raises(Exception, match="pretrain.pt not found"):
        ft.build_segmentation_model(StageContext(cfg, run, Runtime(torch.device("cpu"))), "pretrain")
    with pytest.raises(Exception, match="no label PNGs"):
        ft.label_pairs(tmp_path / "empty", {})


def test_cam_inference_thresholds_the_image_class_logit_map():
    """infer.mode cam (App. A): the class of the largest mean logit over 1..C, on the pixels
    where its min-max normalised logit map is >= cam_tau; 'other' elsewhere."""
    logits = torch.zeros(2, 4, 3, 3)
    logits[0, 2] = torch.arange(9.0).view(3, 3)      # image 0: class 2, a ramp 0..8
    logits[0, 0] = 100.0                             # 'other' wins every argmax but never CAM
    logits[1, 3] = torch.tensor([[5.0, 5, 1], [1, 1, 1], [1, 1, 1]])
    pred = infer.cam_prediction(logits, 0.5)
    assert pred[0].tolist() == [[0, 0, 0], [0, 2, 2], [2, 2, 2]]  # (v - 0) / 8 >= 0.5: v >= 4
    assert pred[1].tolist() == [[3, 3, 0], [0, 0, 0], [0, 0, 0]]
    assert torch.equal(infer.cam_prediction(logits, 0.0)[0], torch.full((3, 3), 2))
    with pytest.raises(Exception, match="infer.mode"):
        infer.predict_map(None, torch.zeros(1, 3, 4, 4), (4, 4), Runtime(torch.device("cpu")), "max")
