"""The semi-supervised and distance-matching protocols: the region bank, the kNN vote,
semi fine-tuning, evaluation without matching, resume, `luss run`'s protocols, errors."""
import json
import os
import shutil
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image

from lusscore import cli
from lusscore.checkpoint import save_checkpoint
from lusscore.config import apply_overrides, load_config, save_config
from lusscore.data import ImageNetS, SegmentationSample, read_label_png, write_label_png
from lusscore.data.synthetic import SynthConfig, generate_dataset
from lusscore.data.views import IMAGENET_MEAN, IMAGENET_STD
from lusscore.engine import Runtime, setup_runtime
from lusscore.models.backbone import resnet_backbone
from lusscore.stages import distance_match as dm
from lusscore.stages import run as run_stage
from lusscore.stages.common import StageContext
from lusscore.stages.evaluate import evaluate_predictions
from lusscore.stages import semi
from lusscore.utils import LusscoreError
from python_tests.conftest import crash_after_first_checkpoint

CPU = Runtime(torch.device("cpu"))
TINY = ["model.width=8", "pretrain.epochs=1", "pretrain.batch_size=8", "pretrain.crops.sizes=[48, 24]",
        "pretrain.queue_length=16", "pretrain.freeze_prototypes_iters=2", "data.num_classes=3",
        "semi.epochs=2", "semi.batch_size=4", "semi.crop=32", "semi.label_size=16",
        "semi.scale=[0.5, 1.0]", "infer.resize=48", "distance_match.resize=48",
        "distance_match.batch_size=4"]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    generate_dataset(root, SynthConfig(classes=3, train_per_class=4, val_per_class=2, semi_per_class=3,
                                       size=48, seed=3), progress=False)
    return root


def tiny_cfg(root, *extra):
    return apply_overrides(load_config("demo"), TINY + [f"data.root={root}", *extra])


def fake_pretrain(cfg, run, done=True):
    """A randomly initialised backbone saved as a (complete) <run>/pretrain.pt."""
    torch.manual_seed(0)
    m = cfg["model"]
    backbone = resnet_backbone(m["arch"], m["width"], m["output_stride"])
    save_checkpoint(run / "pretrain.pt", {"backbone": backbone.state_dict(), "epoch": 1, "done": done})


# ---------------------------------------------------------------------------------------------
# The bank


class BlockMean(torch.nn.Module):
    """A stand-in backbone: the mean colour of every 4x4 block (3 channels, stride 4)."""
    out_channels = 3

    def forward(self, x):
        return F.avg_pool2d(x, 4)


def _normalised(rgb):
    return (np.asarray(rgb, np.float64) / 255.0 - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)


def test_region_means_ignore_excluded_background_kept():
    features = torch.arange(2 * 2 * 3, dtype=torch.float32).view(2, 2, 3)  # (L=2, h=2, w=3)
    label = torch.tensor([[0, 5, 1000], [5, 0, 0]])
    ids, means = dm.region_means(features, label)
    assert ids.tolist() == [0, 5]
    flat = features.view(2, -1)
    expected0 = flat[:, [0, 4, 5]].mean(1)
    expected5 = flat[:, [1, 3]].mean(1)
    torch.testing.assert_close(means, torch.stack([expected0, expected5]))
    ids, means = dm.region_means(features, torch.full((2, 3), 1000))
    assert ids.numel() == 0 and means.shape == (0, 2)
    with pytest.raises(LusscoreError, match="share the grid"):
        dm.region_means(features, label[:, :2])


def test_bank_of_hand_made_labelled_images(tmp_path):
    rng = np.random.default_rng(0)
    blocks = [np.array([[1, 1, 0, 0], [1, 1, 0, 0], [1000, 1000, 2, 2], [0, 0, 2, 2]]),
              np.array([[1000] * 4, [1000] * 4, [1000, 2, 1000, 1000], [1000] * 4])]
    samples, colours = [], []
    for n, grid in enumerate(blocks):
        colour = rng.integers(0, 256, size=(4, 4, 3))
        label = np.kron(grid, np.ones((4, 4), dtype=np.int64))
        if n == 0:
            label[1, :4] = 7  # one thin row: gone after the nearest downsampling to the block grid
        img = tmp_path / "train-semi" / "n1" / f"{n}.png"
        lab = tmp_path / "train-semi-segmentation" / "n1" / f"{n}.png"
        img.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.kron(colour, np.ones((4, 4, 1))).astype(np.uint8)).save(img)
        write_label_png(lab, label)
        samples.append(SegmentationSample(img, lab, f"n1/{n}.png"))
        colours.append(_normalised(colour))
    bank = dm.gather_bank(dm.build_bank(BlockMean(), samples, 1, CPU, resize=16, batch_size=2,
                                        progress=False), CPU)
    assert bank["images"].tolist() == [0, 0, 0, 1]
    assert bank["labels"].tolist() == [0, 1, 2, 2]  # 1000 left out, 0 kept, 7 too thin
    expected = [colours[0][blocks[0] == 0].mean(0), colours[0][blocks[0] == 1].mean(0),
                colours[0][blocks[0] == 2].mean(0), colours[1][blocks[1] == 2].mean(0)]
    np.testing.assert_allclose(bank["vectors"].numpy(), np.stack(expected), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The kNN vote


def knn_reference(x, bank, labels, num_labels, k, temperature):
    """Brute force in float64: sort by (-cos, index), vote exp(cos / T), lowest label wins ties."""
    x = np.asarray(x, np.float64)
    bank = np.asarray(bank, np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    bank = bank / np.maximum(np.linalg.norm(bank, axis=1, keepdims=True), 1e-12)
    preds, margins = [], []
    for row in x:
        sims = bank @ row
        order = np.lexsort((np.arange(len(bank)), -sims))[:k]
        scores = np.zeros(num_labels)
        for j in order:
            scores[labels[j]] += np.exp(sims[j] / temperature)
        preds.append(int(np.argmax(scores)))
        top2 = np.sort(scores)[-2:]
        margins.append((top2[1] - top2[0]) / top2[1])
    return np.array(preds), np.array(margins)


def _random_problem(seed, n=300, m=41, d=8, labels=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64),
            torch.randn(m, d, generator=g, dtype=torch.float64),
            torch.randint(0, labels, (m,), generator=g))


@pytest.mark.parametrize("k", [1, 3, 10, 100])
def test_knn_matches_brute_force_float64(k):
    x, bank, labels = _random_problem(k)
    expected, _ = knn_reference(x, bank, labels, 5, k, 0.07)
    got = dm.knn_vote(x, bank, labels, 5, k=k, temperature=0.07, chunk_elements=41 * 16)  # chunks
    assert got.dtype == torch.int64
    np.testing.assert_array_equal(got.numpy(), expected)


def test_knn_float32_and_cuda_parity(device):
    x, bank, labels = _random_problem(7)
    expected, margin = knn_reference(x, bank, labels, 5, 10, 0.07)
    clear = margin > 1e-3  # rows whose vote a float32 rounding cannot flip
    assert clear.mean() > 0.9
    got = dm.knn_vote(x.float().to(device), bank.float().to(device), labels.to(device), 5, k=10)
    assert got.device.type == device.type
    np.testing.assert_array_equal(got.cpu().numpy()[clear], expected[clear])
    got1 = dm.knn_vote(x.float().to(device), bank.float().to(device), labels.to(device), 5, k=1)
    expected1, _ = knn_reference(x, bank, labels, 5, 1, 0.07)
    cos = F.normalize(x, dim=1) @ F.normalize(bank, dim=1).T
    top2 = cos.topk(2, dim=1).values
    clear1 = (top2[:, 0] - top2[:, 1] > 1e-5).numpy()  # no float32 near-tie for the 1-NN
    assert clear1.mean() > 0.9
    np.testing.assert_array_equal(got1.cpu().numpy()[clear1], expected1[clear1])


def test_knn_ties_go_to_the_lowest_index_then_the_lowest_label(device):
    e = torch.eye(3)
    x = e[:1].repeat(4, 1).to(device)
    # bank rows 1..4 all equal x (cos 1): the 2 nearest are rows 1 and 2 (labels 3 and 2),
    # whose equal votes tie; the lowest label (2) wins.
    bank = torch.stack([e[1], e[0], e[0], e[0], e[0]]).to(device)
    labels = torch.tensor([0, 3, 2, 1, 1], device=device)
    assert dm.knn_vote(x, bank, labels, 4, k=2).tolist() == [2] * 4
    assert dm.knn_vote(x, bank, labels, 4, k=1).tolist() == [3] * 4  # the fused 1-NN: row 1
    assert dm.knn_vote(x, bank, labels, 4, k=4).tolist() == [1] * 4  # labels 3, 2, 1, 1
    ref, _ = knn_reference(x.cpu(), bank.cpu(), labels.cpu(), 4, 2, 0.07)
    assert ref.tolist() == [2] * 4


def test_knn_weights_beat_counts_at_low_temperature():
    x = torch.tensor([[1.0, 0.0]])
    c, s = 0.9, np.sqrt(1 - 0.81)
    bank = torch.tensor([[1.0, 0.0], [c, s], [c, -s]])
    labels = torch.tensor([1, 2, 2])
    # exp(1 / 0.07) > 2 exp(0.9 / 0.07): the single nearest wins; at T = 1 the two do.
    assert dm.knn_vote(x, bank, labels, 3, k=3, temperature=0.07).tolist() == [1]
    assert dm.knn_vote(x, bank, labels, 3, k=3, temperature=1.0).tolist() == [2]
    for t in (0.07, 1.0):
        assert knn_reference(x, bank, labels, 3, 3, t)[0].tolist() == \
            dm.knn_vote(x, bank, labels, 3, k=3, temperature=t).tolist()
    assert dm.knn_vote(x, bank, labels, 3, k=3, temperature=0.001).tolist() == [1]  # no overflow


def test_knn_bad_input():
    bank, labels = torch.randn(4, 3), torch.zeros(4, dtype=torch.int64)
    assert dm.knn_vote(torch.zeros(0, 3), bank, labels, 2).shape == (0,)
    with pytest.raises(LusscoreError, match="same D"):
        dm.knn_vote(torch.randn(2, 5), bank, labels, 2)
    with pytest.raises(LusscoreError, match="bank_labels must have shape"):
        dm.knn_vote(torch.randn(2, 3), bank, labels[:3], 2)
    with pytest.raises(LusscoreError, match="the bank is empty"):
        dm.knn_vote(torch.randn(2, 3), torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64), 2)


# ---------------------------------------------------------------------------------------------
# Semi-supervised fine-tuning


def _train_semi(cfg, run):
    torch.manual_seed(0)
    return semi.train_semi(StageContext(cfg, run, CPU))


@torch.no_grad()
def semi_set_loss(model, cfg):
    """Cross-entropy (ignore 1000) of the model on the whole train-semi images (no crops)."""
    from lusscore.data.transforms import load_image_tensor
    model.eval()
    losses = []
    for image, label in semi.semi_pairs(StageContext(cfg, '.', CPU)):
        logits = model(load_image_tensor(image, 48)[None])
        gt = torch.from_numpy(read_label_png(label))
        logits = F.interpolate(logits, size=gt.shape, mode="bilinear", align_corners=False)
        losses.append(F.cross_entropy(logits, gt[None], ignore_index=1000).item())
    return float(np.mean(losses))


def test_semi_loss_decreases_and_resume_matches_uninterrupted(tmp_path, tiny_root, monkeypatch):
    from lusscore.stages.finetune import build_segmentation_model
    cfg = tiny_cfg(tiny_root, "semi.epochs=6", "semi.base_lr=3.0")
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    for run in (run_a, run_b):
        fake_pretrain(cfg, run)
    torch.manual_seed(0)  # the initial model of _train_semi
    before = semi_set_loss(build_segmentation_model(StageContext(cfg, run_a, CPU), "pretrain", "semi"), cfg)
    model = _train_semi(cfg, run_a)
    full = model.state_dict()
    after = semi_set_loss(model, cfg)
    assert after < 0.85 * before, (before, after)
    log = [json.loads(line) for line in (run_a / "semi.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in log} == {"semi"} and {"loss", "lr", "img_s"} <= set(log[0])
    assert sorted({r["epoch"] for r in log}) == list(range(6))

    with crash_after_first_checkpoint(monkeypatch):
        _train_semi(cfg, run_b)
    assert torch.load(run_b / "semi.pt", weights_only=False)["epoch"] == 1
    resumed = _train_semi(cfg, run_b).state_dict()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    state = torch.load(run_b / "semi.pt", weights_only=False)
    assert state["done"] and state["epoch"] == 6 and (run_b / "semi.yaml").is_file()


# ---------------------------------------------------------------------------------------------
# Evaluation without matching


def _copy_predictions(root, out, permute=None):
    for s in ImageNetS(root).segmentation_samples("validation"):
        lut = np.arange(1001)
        lut[1000] = 0  # ignore pixels are not scored; predict 'other' there
        if permute is not None:
            lut[:len(permute)] = permute
        write_label_png(out / s.name, lut[read_label_png(s.label)])


def test_evaluation_without_matching(tmp_path, tiny_root, capsys):
    cfg = tiny_cfg(tiny_root)
    run = tmp_path / "run"
    _copy_predictions(tiny_root, run / "predictions" / "validation")
    unsup = evaluate_predictions(StageContext(cfg, run, CPU))  # the unsupervised writer (Hungarian)
    perfect = run / "semi" / "predictions" / "validation"
    _copy_predictions(tiny_root, perfect)
    capsys.readouterr()
    result = evaluate_predictions(StageContext(cfg, run, CPU), pred_dir=perfect, out_dir=run / "semi",
                                            match="none")
    assert result["mIoU"] == pytest.approx(100.0) and result["match"] is None
    assert "validation:" in capsys.readouterr().out  # the table, printed without a match too
    written = json.loads((run / "semi" / "metrics.json").read_text())
    assert set(written) == set(json.loads((run / "metrics.json").read_text()))
    assert written["mIoU"] == pytest.approx(100.0) and unsup["mIoU"] == pytest.approx(100.0)
    assert not (run / "semi" / "match.json").exists()

    swapped = run / "distance_match" / "predictions" / "validation"
    _copy_predictions(tiny_root, swapped, permute=[0, 2, 3, 1])
    result = evaluate_predictions(StageContext(cfg, run, CPU), pred_dir=swapped,
                                            out_dir=run / "distance_match", match="none")
    assert result["mIoU"] < 50
    result = evaluate_predictions(StageContext(cfg, run, CPU), pred_dir=swapped,
                                            out_dir=run / "distance_match", match="hungarian")
    assert result["mIoU"] == pytest.approx(100.0)
    assert json.loads((run / "distance_match" / "match.json").read_text()) == {"0": 0, "1": 3, "2": 1, "3": 2}


# ---------------------------------------------------------------------------------------------
# Distance matching end to end, resume, DDP


def test_distance_match_writes_outputs_and_resumes(tmp_path, tiny_root, monkeypatch):
    cfg = tiny_cfg(tiny_root)
    run = tmp_path / "run"
    fake_pretrain(cfg, run)
    result = dm.run_distance_match(StageContext(cfg, run, CPU))
    bank = torch.load(run / "distance_match" / "bank.pt", weights_only=True)
    semi_images = ImageNetS(tiny_root).segmentation_samples("train-semi")
    assert bank["vectors"].shape[1] == 8 * 8 and set(bank["images"].tolist()) == set(range(len(semi_images)))
    assert 0 in bank["labels"].tolist() and 1000 not in bank["labels"].tolist()
    metrics = json.loads((run / "distance_match" / "metrics.json").read_text())
    assert metrics["mIoU"] == pytest.approx(result["mIoU"]) and metrics["match"] is None
    samples = ImageNetS(tiny_root).segmentation_samples("validation")
    out = run / "distance_match" / "predictions" / "validation"
    for s in samples:
        pred = read_label_png(out / s.name)
        assert pred.shape == read_label_png(s.label).shape and pred.max() <= 3

    def fail(*args, **kwargs):
        raise AssertionError("the bank was rebuilt")

    monkeypatch.setattr(dm, "build_bank", fail)
    backbone = dm.load_pretrain_backbone(StageContext(cfg, run, CPU))
    bank = dm.load_or_build_bank(StageContext(cfg, run, CPU))
    assert dm.predict_knn(backbone, bank, samples, out, cfg, CPU, progress=False) == 0
    (out / samples[0].name).write_bytes(b"torn")
    assert dm.predict_knn(backbone, bank, samples, out, cfg, CPU, progress=False) == 1
    again = dm.run_distance_match(StageContext(cfg, run, CPU))
    assert again["mIoU"] == pytest.approx(result["mIoU"])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_bank_worker(rank, world, port, root, run):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    rt = setup_runtime("cpu")
    dm.run_distance_match(StageContext(tiny_cfg(root), run, rt))
    torch.distributed.destroy_process_group()


def test_two_process_bank_equals_single_process(tmp_path, tiny_root):
    cfg = tiny_cfg(tiny_root)
    one, two = tmp_path / "one", tmp_path / "two"
    for run in (one, two):
        fake_pretrain(cfg, run)
    dm.run_distance_match(StageContext(cfg, one, CPU))
    mp.spawn(_ddp_bank_worker, args=(2, _free_port(), tiny_root, two), nprocs=2)
    a = torch.load(one / "distance_match" / "bank.pt", weights_only=True)
    b = torch.load(two / "distance_match" / "bank.pt", weights_only=True)
    assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["images"], b["images"])
    torch.testing.assert_close(a["vectors"], b["vectors"], rtol=1e-4, atol=1e-5)
    assert (two / "distance_match" / "metrics.json").is_file()
    for s in ImageNetS(tiny_root).segmentation_samples("validation"):
        assert (two / "distance_match" / "predictions" / "validation" / s.name).is_file()


# ---------------------------------------------------------------------------------------------
# `luss run` with protocols, the commands, errors


def test_run_pipeline_runs_protocols_and_skips_completed(tmp_path, tiny_root, monkeypatch, capsys):
    cfg = tiny_cfg(tiny_root, "protocols=[semi, distance_match]")
    run = tmp_path / "run"
    first = run_stage.run_pipeline(StageContext(cfg, run, CPU))
    for name in ("pretrain.pt", "semi.pt", "semi.jsonl", "semi/metrics.json", "distance_match/bank.pt",
                 "distance_match/metrics.json", "protocols.json"):
        assert (run / name).is_file(), name
    assert not (run / "attention.pt").exists()  # unsupervised not listed
    summary = json.loads((run / "protocols.json").read_text())
    assert list(summary) == ["semi", "distance_match"]
    assert summary["semi"]["mIoU"] == pytest.approx(first["mIoU"])
    assert summary["distance_match"]["match"] == "none"
    table = capsys.readouterr().out
    assert "protocol" in table and "distance_match" in table

    def fail(*args, **kwargs):
        raise AssertionError("a completed protocol ran again")

    monkeypatch.setattr(semi, "run_semi", fail)
    monkeypatch.setattr(dm, "run_distance_match", fail)
    run_stage.run_pipeline(StageContext(cfg, run, CPU))
    assert json.loads((run / "protocols.json").read_text()) == summary

    monkeypatch.undo()
    save_config(run / "config.yaml", cfg)
    assert cli.main(["semi", "--run-dir", str(run), "--device", "cpu"]) == 0  # trained: evaluate only
    assert cli.main(["distance-match", "--run-dir", str(run), "--device", "cpu",
                     "--match", "hungarian"]) == 0
    assert (run / "distance_match" / "match.json").is_file()
    assert "semi-supervised" in cli._usage() and "distance-match" in cli._usage()


def test_errors(tmp_path, tiny_root):
    cfg = tiny_cfg(tiny_root)
    run = tmp_path / "run"
    with pytest.raises(LusscoreError, match="pretrain.pt not found"):
        dm.run_distance_match(StageContext(cfg, run, CPU))
    with pytest.raises(LusscoreError, match="pretrain.pt not found.*semi.init=none"):
        semi.train_semi(StageContext(cfg, run, CPU))
    fake_pretrain(cfg, run, done=False)
    with pytest.raises(LusscoreError, match="not complete"):
        dm.run_distance_match(StageContext(cfg, run, CPU))
    fake_pretrain(cfg, run)
    with pytest.raises(LusscoreError, match="must divide"):
        dm.run_distance_match(StageContext(tiny_cfg(tiny_root, "distance_match.stride=3"), run, CPU))
    with pytest.raises(LusscoreError, match="temperature"):
        dm.settings(tiny_cfg(tiny_root, "distance_match.temperature=0"))
    with pytest.raises(LusscoreError, match="'none' or 'hungarian'"):
        dm.settings(tiny_cfg(tiny_root, "distance_match.match=greedy"))
    with pytest.raises(LusscoreError, match="protocols must be"):
        run_stage.protocol_list(tiny_cfg(tiny_root, "protocols=[supervised]"))

    bare = tmp_path / "bare"
    shutil.copytree(tiny_root, bare, ignore=shutil.ignore_patterns("train-semi*"))
    assert not (bare / "train-semi").exists()
    cfg = tiny_cfg(bare)
    with pytest.raises(LusscoreError, match="no train-semi images"):
        dm.run_distance_match(StageContext(cfg, run, CPU))
    with pytest.raises(LusscoreError, match="no train-semi images"):
        semi.train_semi(StageContext(cfg, run, CPU))
