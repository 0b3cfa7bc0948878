"""Every PASS stage end to end on a tiny synthetic set: outputs, resume, DDP, tau sweep."""
import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from lusscore.config import apply_overrides, load_config
from lusscore.data import ImageNetS, read_label_png
from lusscore.data.synthetic import SynthConfig, generate_dataset
from lusscore.engine import Runtime, setup_runtime
from lusscore.metrics import SegEvaluator
from lusscore.stages import run as run_stage
from lusscore.stages.common import StageContext
from python_tests.conftest import crash_after_first_checkpoint

TINY = ["model.width=8", "pretrain.epochs=2", "pretrain.batch_size=8", "pretrain.crops.sizes=[48, 24]",
        "pretrain.queue_length=16", "pretrain.freeze_prototypes_iters=2",
        "attention.epochs=1", "attention.batch_size=8", "attention.crop=48",
        "cluster.k=3", "cluster.nredo=2", "cluster.resize=48", "cluster.crop=48", "label.resize=48",
        "label.sweep=[0.3, 0.6, 0.1]", "finetune.epochs=1", "finetune.batch_size=8", "finetune.crop=48",
        "finetune.label_size=24", "infer.resize=48", "data.num_classes=3"]
TINY += ["semi.epochs=1", "semi.batch_size=8", "semi.crop=48", "semi.label_size=24",
         "distance_match.resize=48"]  # the demo config lists every protocol


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    generate_dataset(root, SynthConfig(classes=3, train_per_class=8, val_per_class=3, semi_per_class=1,
                                       size=48, seed=2), progress=False)
    return root


def tiny_cfg(root):
    return apply_overrides(load_config("demo"), TINY + [f"data.root={root}"])


@pytest.fixture(scope="module")
def finished_run(tiny_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    result = run_stage.run_pipeline(StageContext(tiny_cfg(tiny_root), run, Runtime(torch.device("cpu"))))
    return run, result


def test_every_stage_writes_its_outputs(finished_run, tiny_root):
    run, result = finished_run
    for name in ("pretrain.pt", "attention.pt", "finetune.pt", "cluster/centroids.npy",
                 "cluster/summary.json", "sweep_tau.json", "sweep_tau.png", "metrics.json", "match.json",
                 "pretrain.jsonl", "attention.jsonl", "finetune.jsonl"):
        assert (run / name).is_file(), name
    assert np.load(run / "cluster" / "centroids.npy").shape[0] == 3
    ds = ImageNetS(tiny_root)
    for split, samples in (("train", [p for p, _ in ds.image_samples("train")]),
                           ("validation", [s.image for s in ds.segmentation_samples("validation")])):
        for img in samples:
            rel = img.relative_to(ds.split_dir(split)).with_suffix(".png")
            label = read_label_png(run / "labels" / split / rel)
            assert label.max() <= 3 and label.min() >= 0
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("mIoU", "mBIoU", "Acc", "FMeasure", "S", "MS", "ML", "L"):
        assert key in metrics
    match = json.loads((run / "match.json").read_text())
    assert match["0"] == 0 and sorted(match.values()) == [0, 1, 2, 3]
    # The reported mIoU, recounted by hand from the written predictions (EVALUATION.md, 3).
    from lusscore.stages.layout import RunDir
    lut = np.zeros(4, dtype=np.int64)
    for k, v in match.items():
        lut[int(k)] = v
    inter, pred_n, gt_n = np.zeros(4), np.zeros(4), np.zeros(4)
    for s in ds.segmentation_samples("validation"):
        gt = read_label_png(s.label)
        pred = lut[read_label_png(RunDir(run).predictions("unsupervised", "validation")
                                  / s.name)]
        valid = gt != 1000
        p, g = pred[valid], gt[valid]
        for c in range(4):
            inter[c] += np.sum((p == c) & (g == c))
            pred_n[c] += np.sum(p == c)
            gt_n[c] += np.sum(g == c)
    want = np.mean(100 * inter / (pred_n + gt_n - inter + 1e-10))
    assert result["mIoU"] == pytest.approx(want, abs=1e-6) == metrics["mIoU"]
    log = [json.loads(line) for line in (run / "pretrain.jsonl").read_text().splitlines()]
    assert {"loss_swav", "loss_d2s", "loss_p2p", "lr"} <= set(log[0])
    # The validation NMI of the image-level clusters, recounted: nearest centroid by brute force.
    from lusscore.metrics import nmi
    from lusscore.models.backbone import load_attention_checkpoint
    from lusscore.stages.attention_features import pooled_features
    cfg = tiny_cfg(tiny_root)["cluster"]
    backbone, attention, _ = load_attention_checkpoint(run / "attention.pt")
    val = ds.split_images("validation")
    feats = pooled_features(backbone, attention, [v.image for v in val], resize=cfg["resize"],
                            crop=cfg["crop"], pool_features=cfg["pool_features"])
    centroids = torch.from_numpy(np.load(run / "cluster" / "centroids.npy"))
    nearest = torch.cdist(feats.double(), centroids.double()).argmin(1).numpy()
    truth = [ds.class_id(v.name.split("/")[0]) for v in val]
    summary = json.loads((run / "cluster" / "summary.json").read_text())
    assert summary["nmi_validation"] == pytest.approx(nmi(nearest, np.array(truth)), abs=1e-12)


def test_rerun_skips_completed_stages(finished_run, tiny_root, monkeypatch):
    run, result = finished_run
    from lusscore.stages import pretrain as pretrain_stage

    def fail(*args, **kwargs):
        raise AssertionError("a completed stage ran again")

    monkeypatch.setattr(pretrain_stage, "pretrain", fail)
    monkeypatch.setattr("lusscore.stages.attention.train_attention", fail)
    monkeypatch.setattr("lusscore.stages.cluster.run_cluster", fail)
    monkeypatch.setattr("lusscore.stages.finetune.train_segmentation", fail)
    again = run_stage.run_pipeline(StageContext(tiny_cfg(tiny_root), run, Runtime(torch.device("cpu"))))
    assert again["mIoU"] == pytest.approx(result["mIoU"])


def test_sweep_equals_single_threshold_labelling(finished_run, tiny_root):
    """Each tau of the sweep scores like labels generated directly with that tau."""
    run, _ = finished_run
    from lusscore.stages.label import apply_tau
    sweep = json.loads((run / "sweep_tau.json").read_text())
    ds = ImageNetS(tiny_root)
    for row in sweep["table"]:
        ev = SegEvaluator(3)
        for s in ds.segmentation_samples("validation"):
            raw = torch.from_numpy(read_label_png(run / "labels" / "validation" / s.name))
            att = torch.from_numpy(np.load((run / "labels" / "validation" / s.name).with_suffix(".npy")))
            ev.update(apply_tau(raw, att, row["tau"]), read_label_png(s.label))
        assert ev.compute("hungarian")["mIoU"] == pytest.approx(row["mIoU"], abs=1e-6)


def test_label_run_dir_reads_the_swept_tau_and_reproduces_the_train_labels(finished_run, tmp_path,
                                                                          capsys):
    import shutil
    import yaml
    from lusscore import cli
    source, _ = finished_run
    sweep = json.loads((source / "sweep_tau.json").read_text())
    assert sweep["best_tau"] != load_config("demo")["label"]["tau"]  # else this proves nothing
    run = tmp_path / "run"
    shutil.copytree(source, run)
    assert yaml.safe_load((run / "config.yaml").read_text())["label"]["tau"] == sweep["best_tau"]
    shutil.rmtree(run / "labels" / "train")
    assert cli.main(["label", "--run-dir", str(run), "--split", "train", "--device", "cpu"]) == 0
    assert f"tau {sweep['best_tau']:.3f}" in capsys.readouterr().out
    made = sorted(p.relative_to(run).as_posix() for p in (run / "labels" / "train").rglob("*.png"))
    want = sorted(p.relative_to(source).as_posix() for p in (source / "labels" / "train").rglob("*.png"))
    assert made == want and made
    for name in made:
        assert (read_label_png(run / name) == read_label_png(source / name)).all(), name
    assert cli.main(["label", "--run-dir", str(run), "--data", "x"]) == 2
    assert "drop --data" in capsys.readouterr().err
    assert cli.main(["label", "--split", "train"]) == 2
    assert "give --data, --checkpoint, --centroids, --out" in capsys.readouterr().err


def test_resume_ignores_and_removes_temp_files_and_redoes_damaged_outputs(finished_run, tmp_path):
    """A kill before a rename leaves `.<name>.<random>.tmp.png`; a damaged PNG has a valid
    header. Readers skip the first, resumers remove it, and both files are redone."""
    import shutil
    from lusscore import cli
    from lusscore.stages.finetune import label_pairs
    source, _ = finished_run
    run = tmp_path / "run"
    shutil.copytree(source, run)
    ds = ImageNetS(run_root(run))
    images = {p.relative_to(ds.split_dir("train")).with_suffix("").as_posix(): p
              for p, _ in ds.image_samples("train")}
    some_label = sorted((run / "labels" / "train").rglob("*.png"))[0]
    temp = some_label.with_name(f".{some_label.name}.k3x9q2w1.tmp.png")
    temp.write_bytes(some_label.read_bytes()[:50])
    assert len(label_pairs(run / "labels" / "train", images)) == len(images)  # the temp is skipped
    data = some_label.read_bytes()
    some_label.write_bytes(data[: len(data) // 2])  # header intact, pixels cut
    prediction = sorted((run / "predictions" / "validation").rglob("*.png"))[0]
    pred_bytes = prediction.read_bytes()
    prediction.write_bytes(pred_bytes[: len(pred_bytes) // 2])
    pred_temp = prediction.with_name(f".{prediction.name}.a1b2c3d4.tmp.png")
    pred_temp.write_bytes(b"")

    assert cli.main(["label", "--run-dir", str(run), "--split", "train", "--device", "cpu"]) == 0
    assert not temp.exists()
    assert (read_label_png(some_label) == read_label_png(source / some_label.relative_to(run))).all()
    assert cli.main(["infer", "--run-dir", str(run), "--split", "validation", "--device", "cpu"]) == 0
    assert not pred_temp.exists()
    assert prediction.read_bytes() == (source / prediction.relative_to(run)).read_bytes()


def test_a_changed_config_never_reuses_stale_outputs(finished_run, tmp_path, tiny_root, capsys):
    import shutil
    import yaml
    from lusscore import cli
    from lusscore.config import save_config
    source, _ = finished_run
    run = tmp_path / "run"
    shutil.copytree(source, run)
    given = tmp_path / "given.yaml"
    save_config(given, tiny_cfg(tiny_root))
    before = (run / "config.yaml").read_text()
    assert cli.main(["run", str(given), "--run-dir", str(run), "--set", "cluster.k=2"]) == 2
    err = capsys.readouterr().err
    assert "cluster.k: 3 in the run, 2 now" in err and "--redo-from cluster" in err
    assert (run / "config.yaml").read_text() == before  # never rewritten to other values
    for override, key, step in (("seed=1", "seed", "pretrain"),
                                ("pretrain.epochs=3", "pretrain.epochs", "pretrain"),
                                ("finetune.epochs=3", "finetune.epochs", "finetune")):
        assert cli.main(["run", str(given), "--run-dir", str(run), "--set", override]) == 2
        err = capsys.readouterr().err
        assert f"({key}: " in err and f"--redo-from {step}" in err, err
    # the same config: a stage command runs
    assert cli.main(["label", "--run-dir", str(run), "--split", "train", "--device", "cpu"]) == 0

    kept = {n: (run / n).read_bytes() for n in ("pretrain.pt", "attention.pt")}
    assert cli.main(["run", str(given), "--run-dir", str(run), "--set", "cluster.k=2",
                     "--redo-from", "cluster", "--device", "cpu"]) == 0
    assert "removed the outputs of cluster, sweep_tau, label, finetune, infer" in capsys.readouterr().out
    assert np.load(run / "cluster" / "centroids.npy").shape[0] == 2
    assert yaml.safe_load((run / "config.yaml").read_text())["cluster"]["k"] == 2
    assert all((run / n).read_bytes() == b for n, b in kept.items())  # upstream steps untouched
    steps = json.loads((run / "fingerprints.json").read_text())
    assert steps["cluster"]["cluster"]["k"] == 2 and steps["finetune"]["cluster"]["k"] == 2
    assert cli.main(["run", str(given), "--run-dir", str(run), "--set", "cluster.k=2",
                     "--device", "cpu"]) == 0


def run_root(run):
    import yaml
    return yaml.safe_load((run / "config.yaml").read_text())["data"]["root"]


def test_rerun_keeps_the_swept_tau_in_the_run_config(finished_run, tmp_path, tiny_root):
    """`luss run` saves the config it was given; the sweep, skipped as complete, writes its tau
    back, so config.yaml never holds a tau the labels were not made with."""
    import shutil
    import yaml
    from lusscore import cli
    from lusscore.config import save_config
    source, _ = finished_run
    run = tmp_path / "run"
    shutil.copytree(source, run)
    given = tmp_path / "given.yaml"
    save_config(given, tiny_cfg(tiny_root))
    assert cli.main(["run", str(given), "--run-dir", str(run), "--device", "cpu"]) == 0
    best = json.loads((run / "sweep_tau.json").read_text())["best_tau"]
    assert yaml.safe_load((run / "config.yaml").read_text())["label"]["tau"] == best


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, root, run, section, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    rt = setup_runtime("cpu")
    cfg = tiny_cfg(root)
    if section == "pretrain_pixpro":
        cfg = apply_overrides(cfg, ["pretrain.method=pixpro"])
    from lusscore.stages.finetune import build_segmentation_model, label_pairs, train_segmentation
    from lusscore.stages.pretrain import pretrain
    ds = ImageNetS(root)
    train = ds.image_samples("train")
    if section.startswith("pretrain"):
        model = pretrain(StageContext(cfg, run, rt), train)
        out[rank] = {k: v.detach() for k, v in model.named_parameters()}  # P2P and D2S too
    else:
        images = {p.relative_to(ds.split_dir("train")).with_suffix("").as_posix(): p for p, _ in train}
        pairs = label_pairs(root / "train-segmentation", images)
        ctx = StageContext(cfg, run, rt)
        model = train_segmentation(ctx, "finetune", pairs, build_segmentation_model(ctx, "none"))
        out[rank] = {k: v.detach() for k, v in model.named_parameters()}
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("section", ["pretrain", "pretrain_pixpro", "finetune"])
def test_two_process_gloo_ddp(tiny_root, tmp_path, section):
    out = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, _free_port(), tiny_root, tmp_path, section, out), nprocs=2)
    a, b = out[0], out[1]
    if section == "pretrain_pixpro":  # the momentum network is an EMA of identical replicas
        assert any(k.startswith("pixpro.momentum_backbone.") for k in a)
    for k in a:  # DDP keeps the replicas' parameters identical
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k
    stage = "finetune" if section == "finetune" else "pretrain"
    state = torch.load(tmp_path / f"{stage}.pt", weights_only=True)
    assert state["done"] and state["epoch"] == (1 if section == "finetune" else 2)


@pytest.mark.parametrize("method", ["swav", "pixpro"])
def test_pretrain_resume_after_crash_matches_uninterrupted(tiny_root, tmp_path, monkeypatch, method):
    """The momentum network of pixpro resumes too (it is in the model's state)."""
    from lusscore.stages.pretrain import pretrain
    cfg = apply_overrides(tiny_cfg(tiny_root), [f"pretrain.method={method}"])
    train = ImageNetS(tiny_root).image_samples("train")
    rt = Runtime(torch.device("cpu"))
    torch.manual_seed(1)
    full = pretrain(StageContext(cfg, tmp_path / "a", rt), train).state_dict()

    torch.manual_seed(1)
    with crash_after_first_checkpoint(monkeypatch):
        pretrain(StageContext(cfg, tmp_path / "b", rt), train)
    state = torch.load(tmp_path / "b" / "pretrain.pt", weights_only=True)
    assert state["epoch"] == 1 and state["queue"] is not None
    torch.manual_seed(123)  # the checkpoint's RNG state must win over the caller's
    resumed = pretrain(StageContext(cfg, tmp_path / "b", rt), train).state_dict()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


class Killed(BaseException):
    """A kill at a chosen moment (not an Exception: nothing may catch it)."""


def _scramble_rng(seed):
    """What a fresh process, or other work before it, leaves in the global generators."""
    import random
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def test_killed_and_resumed_runs_reproduce_the_uninterrupted_run_bit_for_bit(tiny_root, tmp_path,
                                                                            monkeypatch):
    """Killed after the first epoch of every training stage and in the middle of labelling
    train, each time resumed with other global RNG state (a fresh process): the same
    checkpoints, labels and metrics as one uninterrupted run."""
    import hashlib
    import threading
    from lusscore.engine import StageCheckpoint
    from lusscore.stages import label as label_stage
    longer = ["attention.epochs=2", "finetune.epochs=2", "semi.epochs=2"]
    cfg = apply_overrides(tiny_cfg(tiny_root), longer)
    rt = Runtime(torch.device("cpu"))
    _scramble_rng(1)
    run_stage.run_pipeline(StageContext(cfg, tmp_path / "a", rt))

    run_b, killed = tmp_path / "b", []
    original_save, original_write = StageCheckpoint.save, label_stage._write_outputs

    def save_then_kill(self, state, done=False):
        original_save(self, state, done)
        if state["epoch"] == 1 and self.path.stem not in killed:
            killed.append(self.path.stem)
            raise Killed(self.path.stem)

    lock = threading.Lock()  # PNGs are written by a pool of threads

    def write_then_kill(item, label, attention):
        original_write(item, label, attention)
        with lock:
            if "labels/train" in item.label.as_posix() and "label" not in killed:
                written = sum(1 for _ in (run_b / "labels" / "train").rglob("*.png"))
                if written >= 5:
                    killed.append("label")
                    raise Killed("label")

    monkeypatch.setattr(StageCheckpoint, "save", save_then_kill)
    monkeypatch.setattr(label_stage, "_write_outputs", write_then_kill)
    for attempt in range(10):
        _scramble_rng(100 + attempt)
        try:
            run_stage.run_pipeline(StageContext(cfg, run_b, rt))
            break
        except Killed:
            continue
    assert killed == ["pretrain", "attention", "label", "finetune", "semi"]

    def digest(path):
        return hashlib.sha256(path.read_bytes()).hexdigest()

    for stage in ("pretrain", "attention", "finetune", "semi"):
        a = torch.load(tmp_path / "a" / f"{stage}.pt", weights_only=False)["model"]
        b = torch.load(run_b / f"{stage}.pt", weights_only=False)["model"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), stage
    labels = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a" / "labels").rglob("*.png"))
    assert labels and all(digest(tmp_path / "a" / p) == digest(run_b / p) for p in labels)
    for name in ("metrics.json", "semi/metrics.json", "distance_match/metrics.json", "protocols.json"):
        assert json.loads((tmp_path / "a" / name).read_text()) == json.loads((run_b / name).read_text()), name


def test_demo_config_runs_every_protocol(finished_run):
    run, result = finished_run
    summary = json.loads((run / "protocols.json").read_text())
    assert list(summary) == ["unsupervised", "semi", "distance_match"]
    assert summary["unsupervised"]["mIoU"] == pytest.approx(result["mIoU"])
    assert summary["unsupervised"]["match"] == "hungarian" and summary["semi"]["match"] == "none"
    for name in ("semi.pt", "semi/metrics.json", "distance_match/bank.pt", "distance_match/metrics.json"):
        assert (run / name).is_file(), name


def test_without_finetuning_the_pseudo_labels_are_the_predictions(tiny_root, tmp_path):
    """finetune.enabled false (Tab 10d): no label train, no fine-tuning; the protocol scores
    the validation pseudo labels at the swept tau, exactly what the sweep measured there."""
    from lusscore.stages.layout import RunDir
    cfg = apply_overrides(tiny_cfg(tiny_root), ["finetune.enabled=false",
                                                "protocols=[unsupervised]"])
    run = tmp_path / "run"
    result = run_stage.run_pipeline(StageContext(cfg, run, Runtime(torch.device("cpu"))))
    assert not (run / "finetune.pt").exists() and not (run / "labels" / "train").exists()
    sweep = json.loads((run / "sweep_tau.json").read_text())
    assert result["mIoU"] == pytest.approx(sweep["best"]["mIoU"], abs=1e-9)
    ds = ImageNetS(tiny_root)
    preds = RunDir(run).predictions("unsupervised", "validation")
    for s in ds.segmentation_samples("validation"):
        pseudo = read_label_png(run / "labels" / "validation" / s.name)  # tau 0, for the sweep
        att = torch.from_numpy(np.load((run / "labels" / "validation" / s.name).with_suffix(".npy")))
        from lusscore.stages.label import apply_tau
        want = apply_tau(torch.from_numpy(pseudo), att, sweep["best_tau"]).numpy()
        np.testing.assert_array_equal(read_label_png(preds / s.name), want)


@pytest.mark.parametrize("method", ["image", "pixel_kmeans"])
def test_label_methods_run_end_to_end(tiny_root, tmp_path, method):
    """label.method image: one class per train label map; pixel_kmeans: C + 1 pixel
    centroids, one of them 'other'. Both fine-tune and score like PASS's labels."""
    cfg = apply_overrides(tiny_cfg(tiny_root), [f"label.method={method}",
                                                "protocols=[unsupervised]"])
    run = tmp_path / "run"
    result = run_stage.run_pipeline(StageContext(cfg, run, Runtime(torch.device("cpu"))))
    summary = json.loads((run / "cluster" / "summary.json").read_text())
    centroids = np.load(run / "cluster" / "centroids.npy")
    ds = ImageNetS(tiny_root)
    labels = [read_label_png(run / "labels" / "train" / p.relative_to(ds.split_dir("train"))
                             .with_suffix(".png")) for p, _ in ds.image_samples("train")]
    if method == "pixel_kmeans":
        assert centroids.shape[0] == 4 and summary["other_cluster"] in range(4)
        assert summary["pixels"] == len(labels) * (48 // 16) ** 2  # every stage-4 pixel of the crops
        assert sum(int((lab == 0).sum()) for lab in labels) > 0
        assert max(int(lab.max()) for lab in labels) <= 3
    else:
        assert centroids.shape[0] == 3
        assert all(len(set(np.unique(lab).tolist()) - {0}) <= 1 for lab in labels)
        assert len({int(lab.max()) for lab in labels}) > 1  # the images' clusters differ
    assert (run / "finetune.pt").is_file() and "mIoU" in result


def test_ablate_runs_rows_side_by_side_reusing_identical_steps(tiny_root, tmp_path, capsys):
    import yaml
    from lusscore import cli
    from lusscore.config import save_config
    config = tmp_path / "tiny.yaml"
    save_config(config, apply_overrides(tiny_cfg(tiny_root), ["protocols=[unsupervised]"]))
    rows = tmp_path / "rows.yaml"
    rows.write_text(yaml.safe_dump({"rows": [
        {"name": "base", "set": []},
        {"name": "pixel", "set": ["label.method=pixel_kmeans"]},
        {"name": "plain", "set": ["finetune.enabled=false"]}]}))
    out = tmp_path / "ablation"
    assert cli.main(["ablate", str(config), "--run-dir", str(out), "--rows", str(rows),
                     "--device", "cpu", "--quiet"]) == 0
    stdout = capsys.readouterr().out
    assert "pixel: reusing pretrain, attention" in stdout
    assert "plain: reusing pretrain, attention, cluster, sweep_tau, label" in stdout
    for step_file in ("pretrain.pt", "attention.pt"):  # one copy on disk
        assert os.stat(out / "pixel" / step_file).st_ino == os.stat(out / "base" / step_file).st_ino
    assert (os.stat(out / "pixel" / "cluster" / "centroids.npy").st_ino
            != os.stat(out / "base" / "cluster" / "centroids.npy").st_ino)
    table = json.loads((out / "ablation.json").read_text())
    assert list(table["rows"]) == ["base", "pixel", "plain"]
    assert set(table["floors"]) == {"colour_kmeans", "centre_disc", "all_other"}
    assert (os.stat(out / "plain" / "baselines.json").st_ino
            == os.stat(out / "base" / "baselines.json").st_ino)  # the floors computed once
    for name in ("base", "pixel", "plain"):
        run_metrics = json.loads((out / name / "metrics.json").read_text())
        assert table["rows"][name]["unsupervised"]["validation"] == pytest.approx(run_metrics["mIoU"])
    sweep = json.loads((out / "base" / "sweep_tau.json").read_text())
    # the pseudo labels at the swept tau, matched on validation: what the sweep measured
    assert table["rows"]["base"]["pseudo_labels"]["validation"] == pytest.approx(sweep["best"]["mIoU"])
    # without fine-tuning the predictions are the pseudo labels
    plain = table["rows"]["plain"]
    assert plain["unsupervised"]["validation"] == pytest.approx(plain["pseudo_labels"]["validation"])
    md = (out / "ablation.md").read_text()
    assert md.count("| floor: ") == len(table["floors"]) and "| pixel |" in md
    assert (out / "ablation.png").stat().st_size > 0
    # a second call with --only reruns nothing it has and keeps every finished row
    assert cli.main(["ablate", str(config), "--run-dir", str(out), "--rows", str(rows),
                     "--device", "cpu", "--only", "plain", "--quiet"]) == 0
    assert list(json.loads((out / "ablation.json").read_text())["rows"]) == ["base", "pixel", "plain"]


def test_pretraining_reads_data_pretrain_root_when_set(tiny_root, tmp_path):
    """S919 pretrains on the full ImageNet-1k train folder: data.pretrain_root, any ImageFolder."""
    import shutil
    from lusscore.data.imagenet_s import image_folder_samples
    from lusscore.stages.pretrain import pretrain
    from lusscore.utils import LusscoreError
    extra = tmp_path / "imagenet1k" / "train"
    train = sorted(p for p, _ in ImageNetS(tiny_root).image_samples("train"))
    for i, p in enumerate(train[:8]):  # 8 images in two class folders: one batch of 8
        d = extra / f"n{i % 2:08d}"
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, d / p.name)
    samples = image_folder_samples(extra.parent)
    assert len(samples) == 8 and {c for _, c in samples} == {0, 1}
    assert image_folder_samples(extra) == samples  # ROOT/<class>/* as well as ROOT/train/<class>/*
    (tmp_path / "empty" / "n0").mkdir(parents=True)
    with pytest.raises(LusscoreError, match="no images"):
        image_folder_samples(tmp_path / "empty")
    cfg = apply_overrides(tiny_cfg(tiny_root), [f"data.pretrain_root={extra.parent}",
                                                "pretrain.epochs=1"])
    run = tmp_path / "run"
    pretrain(StageContext(cfg, run, Runtime(torch.device("cpu"))))
    log = [json.loads(line) for line in (run / "pretrain.jsonl").read_text().splitlines()]
    assert len(log) == 1  # 8 images, batch 8; the train split (24 images) would give 3 steps


def _subset(root, out, wnids):
    """An ImageNet-S subset of root's validation with the given classes, its GT re-numbered."""
    import shutil
    from lusscore.data import write_label_png
    from lusscore.data.imagenet_s import write_categories
    ds = ImageNetS(root)
    lut = {0: 0, 1000: 1000, **{ds.class_id(w): 0 for w in ds.wnids}}
    lut.update({ds.class_id(w): i + 1 for i, w in enumerate(wnids)})
    write_categories(out / "categories.txt", wnids)
    lines = []
    for s in ds.segmentation_samples("validation"):
        if s.name.split("/")[0] not in wnids:
            continue
        img = out / "validation" / s.image.relative_to(ds.split_dir("validation"))
        img.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(s.image, img)
        gt = read_label_png(s.label)
        write_label_png(out / "validation-segmentation" / s.name, np.vectorize(lut.get)(gt))
        lines.append(f"{img.relative_to(out / 'validation').as_posix()} {s.name}")
    (out / "names").mkdir()
    (out / "names" / "validation.txt").write_text("\n".join(lines) + "\n")
    return out


@pytest.mark.parametrize("protocol", ["unsupervised", "semi"])
def test_cross_subset_evaluation_maps_ids_through_the_subset(finished_run, tiny_root, tmp_path,
                                                             protocol):
    """A run on 3 classes scored on a 2-class subset (Tab 6): unsupervised by a K x C
    Hungarian match (the unpaired id counts as 'other'), semi through the wnids."""
    from lusscore import cli
    from lusscore.matching import load_match
    from lusscore.stages.evaluate import evaluate
    run, _ = finished_run
    wnids = ImageNetS(tiny_root).wnids
    subset = _subset(tiny_root, tmp_path / "sub", [wnids[0], wnids[2]])
    assert cli.main(["cross-eval", "--run-dir", str(run), "--data", str(subset),
                     "--protocol", protocol, "--device", "cpu", "--quiet"]) == 0
    folder = run / "cross" / "sub" / protocol
    match = load_match(folder / "validation_match.json")
    if protocol == "semi":
        assert match == {0: 0, 1: 1, 2: 0, 3: 2}
    else:
        assert sorted(match) == [0, 1, 2, 3] and match[0] == 0
        assert sorted(v for k, v in match.items() if k) == [0, 1, 2]  # one id unpaired: 'other'
    metrics = json.loads((folder / "validation_metrics.json").read_text())
    want = evaluate(subset / "validation-segmentation", folder / "validation", 2,
                    subset / "names" / "validation.txt", str(folder / "validation_match.json"))
    assert metrics["mIoU"] == pytest.approx(want["mIoU"]) and len(metrics["IoUs"]) == 3
    preds = sorted((folder / "validation").rglob("*.png"))
    assert len(preds) == len((subset / "names" / "validation.txt").read_text().split("\n")) - 1
