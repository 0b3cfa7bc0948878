"""`luss hp`: HP's pools, local mixing, lambda ramp and objective, then a tiny run end to end
(outputs, cluster order, resume after a crash, the CLI's table beside the floors)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from lusscore import cli
from lusscore.config import save_config
from lusscore.data import ImageNetS, read_label_png
from lusscore.engine import Runtime
from lusscore.losses.hp import (RingPool, affinity_mix_weights, attention_mix_weights, flat_pixels,
                                hp_objective, lambda_at, mix_codes, one_patch_per_image,
                                pool_thresholds, row_quantile)
from lusscore.reference.hp_loss import hp_contrastive_loss as reference_loss
from lusscore.stages import hp
from lusscore.stages.common import StageContext
from lusscore.stages.semi import semi_pairs

from python_tests.conftest import crash_after_first_checkpoint
from test_protocols import fake_pretrain, tiny_cfg, tiny_root  # noqa: F401 (a fixture)

CPU = Runtime(torch.device("cpu"))
HP_TINY = ["hp.epochs=2", "hp.batch_size=4", "hp.crop=32", "hp.dim=8", "hp.pool_size=8",
           "hp_linear.epochs=10", "hp_linear.lr=0.01", "hp_linear.batch_size=4", "hp_linear.crop=32", "hp_linear.label_size=16",
           "hp_linear.scale=[0.5, 1.0]"]


# ---------------------------------------------------------------------------------------------
# The parts


def test_ring_pool_keeps_the_latest_rows_and_round_trips():
    pool = RingPool(4, 2, "cpu")
    assert pool.view().shape == (0, 2)
    pool.add(torch.tensor([[1.0, 1], [2, 2], [3, 3]]))
    assert pool.view()[:, 0].tolist() == [1, 2, 3]
    pool.add(torch.tensor([[4.0, 4], [5, 5]]))  # 5 overwrites the oldest, 1
    assert sorted(pool.view()[:, 0].tolist()) == [2, 3, 4, 5]
    pool.add(torch.arange(12.0).view(6, 2))      # more rows than the pool: the last 4 stay
    assert sorted(pool.view()[:, 0].tolist()) == [4, 6, 8, 10]
    other = RingPool(4, 2, "cpu")
    other.load(pool.state())
    other.add(torch.tensor([[7.0, 7]]))
    pool.add(torch.tensor([[7.0, 7]]))
    assert torch.equal(other.view(), pool.view())


def test_ring_pool_replace_drops_every_old_row():
    pool = RingPool(4, 1, "cpu")
    pool.add(torch.arange(4.0).view(4, 1))
    pool.replace(torch.tensor([[7.0], [8.0]]))
    assert pool.view()[:, 0].tolist() == [7, 8]


def test_renewal_recomputes_the_specific_pool_every_n_steps(tmp_path, tiny_root, monkeypatch):  # noqa: F811
    cfg = tiny_cfg(tiny_root, *HP_TINY, "hp.renew_interval=2")
    run = tmp_path / "run"
    fake_pretrain(cfg, run)
    calls, original = [], hp.reference_pool

    def counted(*args, head=None, **kwargs):
        calls.append(head)
        return original(*args, head=head, **kwargs)

    monkeypatch.setattr(hp, "reference_pool", counted)
    ctx = StageContext(cfg, run, CPU)
    hp.train_hp(ctx, hp.frozen_backbone(ctx))
    steps = len((run / "hp.jsonl").read_text().splitlines())
    # the agnostic pool, the first specific pool, then a renewal at every 2nd step after 0
    assert calls[0] is None and all(c is not None for c in calls[1:])
    assert len(calls) == 2 + (steps - 1) // 2
    state = torch.load(run / "hp.pt", weights_only=False)
    images = len(ImageNetS(tiny_root).image_samples("train"))
    assert state["pool_specific"]["filled"] == min(8, images)


def test_views_pair_each_crop_with_its_photometric_augmentation(tiny_root):  # noqa: F811
    from lusscore.data.photometric import GRAY, JITTER
    from lusscore.data.transforms import to_normalized_tensor
    paths = [p for p, _ in ImageNetS(tiny_root).image_samples("train")][:6]
    views = hp.HPViews(paths, 24, (0.5, 1.0))
    assert (views.photometric.factor_range, views.photometric.hue_range) == ((0.6, 1.4), (-0.1, 0.1))
    torch.manual_seed(0)
    items = [views[i] for i in range(len(paths))]
    x, x_aug = views.collate(items)
    assert x.shape == x_aug.shape == (6, 3, 24, 24) and x.dtype == x_aug.dtype == torch.float32
    crops = torch.stack([crop for crop, _ in items])
    torch.testing.assert_close(x, to_normalized_tensor(crops))
    for i, (crop, draw) in enumerate(items):
        want = to_normalized_tensor(views.photometric.apply(crop[None], draw[None]))[0]
        torch.testing.assert_close(x_aug[i], want)
        untouched = draw[JITTER] >= 0.8 and draw[GRAY] >= 0.2
        assert torch.allclose(x_aug[i], x[i], atol=1e-5) == bool(untouched)


def test_pool_thresholds_are_the_max_similarity_and_inf_when_empty():
    f = F.normalize(torch.randn(5, 3), dim=1)
    pool = F.normalize(torch.randn(4, 3), dim=1)
    assert torch.allclose(pool_thresholds(f, pool), torch.stack([max(fi @ p for p in pool) for fi in f]))
    assert torch.isinf(pool_thresholds(f, pool[:0])).all()


def test_one_patch_per_image_takes_a_column_of_each_image():
    x = torch.randn(3, 4, 5, 6)
    rows = one_patch_per_image(x, torch.Generator().manual_seed(0))
    flat = x.flatten(2)
    for b in range(3):
        assert any(torch.equal(rows[b], flat[b, :, p]) for p in range(30))


def test_lambda_ramps_from_zero_after_the_warmup_to_one_at_the_end():
    values = [lambda_at(s, 10, 0.3) for s in range(10)]
    assert values[:4] == [0.0] * 4 and values[-1] == 1.0
    assert all(b > a for a, b in zip(values[3:], values[4:]))
    assert lambda_at(5, 10, 0.0) == pytest.approx(5 / 9)


def test_affinity_mix_averages_like_neighbours_and_ignores_unlike_ones():
    features = torch.ones(1, 2, 3, 3)
    s = torch.arange(9.0).view(1, 1, 3, 3)
    mixed = mix_codes(s, affinity_mix_weights(features))  # all affinities 1: the window's mean
    assert mixed[0, 0, 1, 1] == pytest.approx(4.0)
    assert mixed[0, 0, 0, 0] == pytest.approx((0 + 1 + 3 + 4) / 4)
    features[0, :, 0, 0] = torch.tensor([1.0, -1.0])  # orthogonal to its neighbours
    mixed = mix_codes(s, affinity_mix_weights(features))
    assert mixed[0, 0, 0, 0] == pytest.approx(0.0)  # only itself stays above the mean
    assert mixed[0, 0, 1, 1] == pytest.approx((1 + 2 + 3 + 4 + 5 + 6 + 7 + 8) / 8)


def hp_attention_mix(attention, codes, side):
    """HP's LHP mixing written out densely: a 0/1 neighbourhood mask over all patch pairs."""
    b, hw, _ = attention.shape
    a = attention.float()
    a = torch.max(torch.min(a, torch.quantile(a, 0.9, dim=2, keepdim=True)),
                  torch.quantile(a, 0.1, dim=2, keepdim=True))
    a = a.softmax(-1) * side
    a[a < a.mean(2, keepdim=True)] = 0
    ys, xs = torch.arange(hw) // side, torch.arange(hw) % side
    mask = ((ys[:, None] - ys[None]).abs() <= 1) & ((xs[:, None] - xs[None]).abs() <= 1)
    flat = codes.flatten(2).transpose(1, 2)  # (B, hw, K)
    mixed = (a * mask) @ flat / mask.sum(1, keepdim=True)
    return mixed.transpose(1, 2).reshape(codes.shape)


def test_attention_mix_is_hps():
    torch.manual_seed(0)
    side = 5
    attention = torch.rand(2, side * side, side * side).softmax(-1)
    codes = torch.randn(2, 3, side, side)
    weights = attention_mix_weights(attention, side, side)
    assert weights.shape == (2, 9, side * side)
    torch.testing.assert_close(mix_codes(codes, weights), hp_attention_mix(attention, codes, side))
    x = torch.randn(3, 4, 50)
    torch.testing.assert_close(row_quantile(x, 0.9), torch.quantile(x, 0.9, dim=-1, keepdim=True))


def test_objective_combines_the_reference_losses():
    torch.manual_seed(0)
    n = 40
    z, z_mix, z_aug = (F.normalize(torch.randn(n, 6), dim=1) for _ in range(3))
    f, s = F.normalize(torch.randn(n, 5), dim=1), F.normalize(torch.randn(n, 4), dim=1)
    phi_f, phi_s = torch.full((n,), 0.85), torch.full((n,), 0.9)
    args = (f, phi_f, s, phi_s, 0.8, 0.1, 0.5, 7)
    loss, parts = hp_objective(z, z_mix, z_aug, *args[:7], alpha=0.05, seed=7)
    ghp, w = reference_loss(z, *args)
    lhp, _ = reference_loss(z_mix, *args)
    expected = 0.8 / 0.07 * ((ghp * w).sum() + (lhp * w).sum()) / w.sum() / 2 \
        + 0.05 * (z - z_aug).norm(dim=1).mean()
    assert 0 < parts["anchors_kept"] < 1
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_flat_pixels_orders_rows_image_then_position():
    x = torch.arange(2 * 3 * 2 * 2.0).view(2, 3, 2, 2)
    flat = flat_pixels(x)
    assert flat.shape == (8, 3) and torch.equal(flat[5], x[1, :, 0, 1])


# ---------------------------------------------------------------------------------------------
# End to end


@torch.no_grad()
def train_semi_loss(model, cfg):
    """Cross-entropy (ignore 1000) of a predictor on the whole train-semi images (no crops)."""
    from lusscore.data.transforms import load_image_tensor
    losses = []
    for image, label in semi_pairs(StageContext(cfg, ".", CPU)):
        logits = model(load_image_tensor(image, 48)[None])
        gt = torch.from_numpy(read_label_png(label).astype("int64"))
        logits = F.interpolate(logits, size=gt.shape, mode="bilinear", align_corners=False)
        losses.append(F.cross_entropy(logits, gt[None], ignore_index=1000).item())
    return sum(losses) / len(losses)


def test_hp_trains_predicts_resumes_and_reports(tmp_path, tiny_root, monkeypatch, capsys):  # noqa: F811
    cfg = tiny_cfg(tiny_root, *HP_TINY)
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    for run in (run_a, run_b):
        fake_pretrain(cfg, run)
    torch.manual_seed(0)
    result = hp.run_hp(StageContext(cfg, run_a, CPU))
    state = torch.load(run_a / "hp.pt", weights_only=False)
    assert state["done"] and state["epoch"] == 2 and state["pool_specific"]["filled"] > 0
    log = [json.loads(line) for line in (run_a / "hp.jsonl").read_text().splitlines()]
    assert {"loss_ghp", "loss_lhp", "loss_consistency", "loss_probe", "loss_lam"} <= set(log[0])
    assert log[0]["loss_lam"] == 0.0 and all(r["loss_ghp"] > 0 for r in log)
    clusters = json.loads((run_a / "hp" / "clusters.json").read_text())
    assert sorted(clusters["order"]) == list(range(4))  # num_classes + 1 clusters
    assert clusters["order"][0] == max(range(4), key=clusters["border_counts"].__getitem__)
    assert json.loads((run_a / "hp" / "metrics.json").read_text())["mIoU"] == pytest.approx(result["mIoU"])
    for sample in ImageNetS(tiny_root).segmentation_samples("validation"):
        pred = read_label_png(run_a / "hp" / "predictions" / "validation" / sample.name)
        assert pred.shape == read_label_png(sample.label).shape and pred.max() <= 3

    torch.manual_seed(0)
    with crash_after_first_checkpoint(monkeypatch):
        hp.run_hp(StageContext(cfg, run_b, CPU))
    assert torch.load(run_b / "hp.pt", weights_only=False)["epoch"] == 1
    hp.run_hp(StageContext(cfg, run_b, CPU))
    full = torch.load(run_a / "hp.pt", weights_only=False)
    resumed = torch.load(run_b / "hp.pt", weights_only=False)
    for k, v in full["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    assert torch.equal(full["pool_specific"]["rows"], resumed["pool_specific"]["rows"])

    save_config(run_a / "config.yaml", cfg)
    capsys.readouterr()
    assert cli.main(["hp", "--run-dir", str(run_a), "--device", "cpu"]) == 0  # trained: predict, score
    table = capsys.readouterr().out
    assert "hp_linear" in table and "floor colour_kmeans" in table
    summary = json.loads((run_a / "protocols.json").read_text())
    assert summary["hp"]["match"] == "hungarian" and "test" in summary["hp"]
    assert (run_a / "hp" / "test" / "metrics.json").is_file()
    # the linear probe: trained on train-semi's GT over the frozen head, class ids, no match
    assert summary["hp_linear"]["match"] == "none" and summary["hp_linear"]["test"] is not None
    probe = torch.load(run_a / "hp_linear.pt", weights_only=False)
    assert probe["done"] and probe["epoch"] == 10
    for k, v in probe["model"].items():  # the backbone and the head stayed frozen
        if k.startswith("head."):
            assert torch.equal(v, full["model"]["model." + k]), k
    # it learnt: its cross-entropy on the whole train-semi images is below the uniform guess's
    model = hp.linear_probe(StageContext(cfg, run_a, CPU))
    assert train_semi_loss(model, cfg) < 0.9 * math.log(4)
    assert "hidden positives" in cli._usage()

    # HP's own scoring: the pixel-level Hungarian over every cluster, 'other' included.
    from lusscore.config import apply_overrides
    save_config(run_a / "config.yaml", apply_overrides(cfg, ["hp.match=pixel"]))
    assert cli.main(["evaluate", "--run-dir", str(run_a), "--protocol", "hp", "--quiet"]) == 0
    pixel = json.loads((run_a / "hp" / "metrics.json").read_text())
    classes = [v for v in pixel["match"].values() if v >= 0]
    assert 0 <= pixel["PixelAcc"] <= 100 and len(set(classes)) == len(classes)  # one-to-one
    assert set(classes) <= set(range(4)) and classes


def test_every_hp_training_key_is_fingerprinted():
    from lusscore.config import load_config
    from lusscore.stages.layout import STEPS, step_keys
    hp_keys = set(load_config("demo")["hp"])
    assert {f"hp.{k}" for k in hp_keys - {"match"}} <= set(step_keys("hp"))
    assert "hp.match" not in STEPS["hp"][1]


def _ddp_hp_worker(rank, world, port, root, run):
    import os

    from lusscore.engine import setup_runtime
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    rt = setup_runtime("cpu")
    hp.run_hp(StageContext(tiny_cfg(root, *HP_TINY), run, rt))
    torch.distributed.destroy_process_group()


def test_two_processes_train_and_score(tmp_path, tiny_root):  # noqa: F811
    import torch.multiprocessing as mp
    from test_protocols import _free_port
    run = tmp_path / "run"
    fake_pretrain(tiny_cfg(tiny_root, *HP_TINY), run)
    mp.spawn(_ddp_hp_worker, args=(2, _free_port(), tiny_root, run), nprocs=2)
    state = torch.load(run / "hp.pt", weights_only=False)
    assert state["done"] and state["epoch"] == 2
    assert json.loads((run / "hp" / "metrics.json").read_text())["num_images"] == len(
        ImageNetS(tiny_root).segmentation_samples("validation"))


# ---------------------------------------------------------------------------------------------
# The ViT backbone (timm, DINO checkpoint files)

VIT_KWARGS = {"embed_dim": 16, "depth": 2, "num_heads": 2, "img_size": 32}


def _tiny_vit_state():
    import timm
    torch.manual_seed(1)
    return timm.create_model("vit_small_patch8_224", pretrained=False, num_classes=0,
                             **VIT_KWARGS).state_dict()


def test_dino_checkpoints_load_in_both_formats(tmp_path):
    from lusscore.models.vit import ViTBackbone
    from lusscore.utils import LusscoreError
    state = _tiny_vit_state()
    released = tmp_path / "backbone.pth"  # DINO's released files: the backbone's state dict
    torch.save(state, released)
    training = tmp_path / "checkpoint.pth"  # a DINO training checkpoint: teacher behind prefixes
    teacher = {f"module.backbone.{k}": v for k, v in state.items()}
    teacher["module.head.last_layer.weight"] = torch.zeros(3, 3)
    torch.save({"teacher": teacher, "student": {}, "epoch": 3}, training)
    for path in (released, training):
        vit = ViTBackbone("vit_small_patch8_224", path, **VIT_KWARGS)
        for k, v in vit.vit.state_dict().items():
            assert torch.equal(v, state[k]), k
    with pytest.raises(LusscoreError, match="nothing is downloaded"):
        ViTBackbone("vit_small_patch8_224", None, **VIT_KWARGS)
    with pytest.raises(LusscoreError, match="not found"):
        ViTBackbone("vit_small_patch8_224", tmp_path / "missing.pth", **VIT_KWARGS)
    with pytest.raises(LusscoreError, match="does not fit"):
        ViTBackbone("vit_small_patch8_224", released, **{**VIT_KWARGS, "depth": 3})


def test_vit_features_and_last_block_attention(tmp_path):
    from lusscore.models.vit import ViTBackbone
    path = tmp_path / "backbone.pth"
    torch.save(_tiny_vit_state(), path)
    vit = ViTBackbone("vit_small_patch8_224", path, **VIT_KWARGS).eval()
    x = torch.randn(2, 3, 40, 44)  # 44 is padded up to 48: a 5x6 grid
    with torch.no_grad():
        features, attention = vit.with_attention(x)
        assert torch.equal(features, vit(x)) and features.shape == (2, 16, 5, 6)
        # the last block's attention, recomputed from its input
        m, captured = vit.vit, {}
        handle = m.blocks[-1].register_forward_pre_hook(lambda mod, inp: captured.update(x=inp[0]))
        m.forward_features(x)
        handle.remove()
        blk = m.blocks[-1]
        q, k, _ = blk.attn.qkv(blk.norm1(captured["x"])).view(2, 31, 3, 2, 8).permute(2, 0, 3, 1, 4)
        full = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, -1).mean(1)
    torch.testing.assert_close(attention, full[:, 1:, 1:])
    assert (attention.sum(-1) < 1).all()  # the class token keeps a share of every row


def test_hp_on_a_vit_backbone(tmp_path, tiny_root):  # noqa: F811
    path = tmp_path / "dino.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in _tiny_vit_state().items()}}, path)
    cfg = tiny_cfg(tiny_root, *HP_TINY, "hp.backbone=vit", f"hp.vit.weights={path}",
                   "hp.vit.kwargs={embed_dim: 16, depth: 2, num_heads: 2, img_size: 32}")
    run = tmp_path / "run"  # no pretrain.pt: the ViT is the backbone
    torch.manual_seed(0)
    result = hp.run_hp(StageContext(cfg, run, CPU))
    assert torch.load(run / "hp.pt", weights_only=False)["done"]
    assert 0 <= result["mIoU"] <= 100 and result["num_images"] == len(
        ImageNetS(tiny_root).segmentation_samples("validation"))
    assert not (run / "pretrain.pt").exists()


def test_luss_run_runs_hp_and_its_linear_probe_after_pretrain(tmp_path, tiny_root):  # noqa: F811
    from lusscore.stages import run as run_stage
    cfg = tiny_cfg(tiny_root, *HP_TINY, "protocols=[hp, hp_linear]")
    run = tmp_path / "run"
    run_stage.run_pipeline(StageContext(cfg, run, CPU))
    summary = json.loads((run / "protocols.json").read_text())
    assert list(summary) == ["hp", "hp_linear"]
    assert summary["hp"]["match"] == "hungarian" and summary["hp_linear"]["match"] == "none"
    assert not (run / "attention.pt").exists()  # unsupervised not listed
    assert set(json.loads((run / "fingerprints.json").read_text())) >= {"pretrain", "hp", "hp_linear"}
