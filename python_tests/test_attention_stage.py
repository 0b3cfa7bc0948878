"""The attention stage's training set-up: SGD (as the reference code) so M_A really moves,
the frozen projection head's BN in batch-statistics mode, and `luss run`'s attention score."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import lusscore.engine as engine
from lusscore.config import apply_overrides, load_config, with_defaults
from lusscore.data import ImageNetS, read_label_png
from lusscore.data.synthetic import SynthConfig, generate_dataset
from lusscore.engine import Runtime, setup_runtime
from lusscore.optim import LARS
from lusscore.losses.pass_loss import pass_losses
from lusscore.models.pass_models import AttentionModel
from lusscore.stages.attention import AttentionTrainer, attention_optimizer
from lusscore.stages.common import StageContext
from lusscore.stages.sweep_tau import report_attention_foreground
from lusscore.utils import LusscoreError

TINY_MODEL = ["model.width=8", "model.hidden_mlp=16", "model.feat_dim=8", "model.num_prototypes=6"]


def _cfg(*overrides):
    return apply_overrides(load_config("demo"), TINY_MODEL + list(overrides))


def test_optimizer_choice():
    p = [torch.nn.Parameter(torch.zeros(3))]
    section = with_defaults({"attention": {"base_lr": 1.0}})["attention"]  # the optimizer's default
    assert isinstance(attention_optimizer(p, section), LARS)  # the reference's
    assert type(attention_optimizer(p, {**section, "optimizer": "sgd"})) is torch.optim.SGD
    with pytest.raises(LusscoreError, match="attention.optimizer"):
        attention_optimizer(p, {**section, "optimizer": "adam"})


def test_bn_modes_in_training():
    model = AttentionModel(_cfg()).train()
    assert model.projection.training and model.backbone.training and model.attention.training
    frozen = AttentionModel(_cfg("attention.freeze_projection_bn=true", "attention.freeze_bn=true")).train()
    assert not frozen.projection.training and not frozen.backbone.training
    assert frozen.attention.training
    assert not any(p.requires_grad for p in frozen.projection.parameters())


def _relative_change_of_m_a(optimizer_name, steps=3):
    torch.manual_seed(0)
    cfg = _cfg(f"attention.optimizer={optimizer_name}")
    model = AttentionModel(cfg).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = attention_optimizer(trainable, cfg["attention"])
    convs = [m.weight for m in model.attention.mlp if isinstance(m, torch.nn.Conv2d)]
    before = [w.detach().clone() for w in convs]
    crops = [torch.randn(8, 3, 48, 48), torch.randn(8, 3, 48, 48)]
    for _ in range(steps):
        model.prototypes.normalize_()
        loss, _ = pass_losses(model(crops), 8, 2, {"swav": 1.0}, cfg["pretrain"], None,
                              model.prototypes.weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return max(float((a.detach() - b).norm() / b.norm()) for a, b in zip(convs, before))


def test_lars_steps_are_trust_times_lr_of_the_weights():
    """The reference's LARS moves each weight by about trust (0.001) x lr x ||w|| per step
    (hence its lr 6.0), whatever the gradient's size; plain SGD follows the gradient."""
    lr = _cfg()["attention"]["base_lr"]
    lars = _relative_change_of_m_a("lars", steps=1)
    assert 0.9 * 0.001 * lr <= lars <= 0.001 * lr * (1 + 1e-5)
    assert _relative_change_of_m_a("sgd", steps=1) != pytest.approx(lars, rel=0.1)


def test_run_reports_attention_foreground(tmp_path):
    root = tmp_path / "data"
    generate_dataset(root, SynthConfig(classes=2, train_per_class=1, val_per_class=2, semi_per_class=0,
                                       size=32, seed=1), progress=False)
    cfg = apply_overrides(load_config("demo"), [f"data.root={root}", "data.num_classes=2"])
    run = tmp_path / "run"
    labels = run / "labels" / "validation"
    for s in ImageNetS(root).segmentation_samples("validation"):
        gt = read_label_png(s.label)
        att = np.where((gt != 0) & (gt != 1000), 0.8, 0.2).astype(np.float32)[::4, ::4]
        (labels / s.name).parent.mkdir(parents=True, exist_ok=True)
        np.save((labels / s.name).with_suffix(".npy"), att)
    scores = report_attention_foreground(StageContext(cfg, run, Runtime(torch.device("cpu"))), tau=0.5)
    assert scores["auc"] > 0.8 and scores["fg_mean"] > scores["bg_mean"]
    saved = json.loads((run / "attention_score.json").read_text())
    assert saved["auc"] == pytest.approx(scores["auc"]) and saved["tau"] == 0.5


def test_trainer_runs_the_frozen_backbone_channels_last_on_the_cpu(tmp_path, monkeypatch):
    """On the CPU the frozen backbone is channels-last and M_A contiguous (faster so); the
    embeddings equal those of the all-contiguous model; the benchmarks' switch turns it off."""
    image = tmp_path / "a.png"
    Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)).save(image)
    cfg = _cfg()
    torch.manual_seed(0)
    trainer = AttentionTrainer(cfg, setup_runtime("cpu"), [(image, 0)], None)
    convs = lambda module: [m.weight for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs(trainer.core.backbone))
    assert all(w.is_contiguous() for w in convs(trainer.core.attention))
    crops = [torch.rand(2, 3, 48, 48), torch.rand(2, 3, 48, 48)]
    got = trainer.core.eval()(crops)["embedding"]
    plain = AttentionModel(cfg).eval()
    plain.load_state_dict(trainer.core.state_dict())
    torch.testing.assert_close(got, plain(crops)["embedding"], atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(engine, "CPU_CHANNELS_LAST", False)
    torch.manual_seed(0)
    off = AttentionTrainer(cfg, setup_runtime("cpu"), [(image, 0)], None)
    assert all(w.is_contiguous() for w in convs(off.core.backbone))
