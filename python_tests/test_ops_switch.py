"""The fused/reference switch of the op wrappers (lusscore.ops.use_reference, config `ops`)."""
import copy
import json
from argparse import Namespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lusscore.ops as ops
from samples import multicrop_batch
from lusscore.config import apply_overrides, load_config
from lusscore.metrics import SegEvaluator
from lusscore.models.pixel_attention import PixelAttention
from lusscore.ops.seg_metrics import new_accumulators
from lusscore.reference import attention_pool as ref_pool
from lusscore.reference import kmeans as ref_kmeans
from lusscore.reference import label_codec as ref_codec
from lusscore.reference import overlap_gather as ref_gather
from lusscore.reference import seg_metrics as ref_metrics
from lusscore.utils import LusscoreError
from python_tests.samples import (attention_pool_inputs, blocky_label_map, kmeans_points,
                                  overlap_boxes, overlap_maps, rgb_label_image)

# The kernels the switch replaces (munkres_assign, a host-side exact port, always runs).
FUSED_OPS = ("attention_pool", "attention_pool_backward", "overlap_gather", "overlap_gather_backward",
             "kmeans_assign", "kmeans_update", "seg_metrics_update_", "rgb_to_label")


class KernelCalls(TorchDispatchMode):
    """Counts every torch.ops.lusscore kernel that reaches the dispatcher (backward included)."""

    def __init__(self):
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "lusscore":
            name = func.name().split("::")[-1]
            self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


# ------------------------------------------------------------------ the switch itself
def test_use_reference_is_a_call_and_a_context_manager():
    assert not ops.reference_enabled()
    with ops.use_reference():
        assert ops.reference_enabled() and ops.ops_mode() == "reference"
        with ops.use_reference(False):
            assert ops.ops_mode() == "fused"
        assert ops.ops_mode() == "reference"
    assert ops.ops_mode() == "fused"
    ops.use_reference(True)
    assert ops.reference_enabled()
    ops.use_reference(False)
    assert not ops.reference_enabled()
    with pytest.raises(RuntimeError):
        with ops.use_reference():
            raise RuntimeError("boom")
    assert ops.ops_mode() == "fused"  # restored on an exception too


def test_bad_mode_and_config_values_are_named():
    with pytest.raises(LusscoreError, match="ops must be one of fused, reference, got 'fast'"):
        ops.set_ops_mode("fast")
    with pytest.raises(LusscoreError, match="got 'refrence'"):
        ops.apply_ops_config({"ops": "refrence"})
    assert ops.ops_mode() == "fused"
    assert ops.apply_ops_config({}) == "fused"  # no key: the mode in force
    with ops.use_reference():
        assert ops.apply_ops_config({"seed": 0}) == "reference"


def test_ops_from_config_runs_in_the_configs_mode_and_restores():
    seen = []

    @ops.ops_from_config
    def stage(cfg, fail=False):
        seen.append(ops.ops_mode())
        if fail:
            raise ValueError("stage failed")
        return "done"

    assert stage({"ops": "reference"}) == "done"
    assert stage({"ops": "fused"}) == "done"
    assert stage({}) == "done"
    with pytest.raises(ValueError):
        stage({"ops": "reference"}, fail=True)
    with ops.use_reference():
        stage({})
        stage({"ops": "fused"})
        assert ops.ops_mode() == "reference"
    assert seen == ["reference", "fused", "fused", "reference", "reference", "fused"]


def test_every_packaged_config_has_the_key():
    from lusscore.config import packaged_configs
    for name in packaged_configs():
        assert load_config(name).get("ops") == "fused", name
    assert apply_overrides(load_config("demo"), ["ops=reference"])["ops"] == "reference"


# ------------------------------------------------------------------ each op, both modes
def _op_cases():
    """name -> fn(): runs the wrapper (forward and backward where it has gradients) and returns
    the outputs and gradients; plus the pure reference's answer for the same inputs."""
    def attention():
        x, a, theta = attention_pool_inputs(2, 6, 5, 4, requires_grad=True)
        pooled, mean = ops.attention_pool(x, a, theta, True)
        (pooled.square().sum() + mean.sum()).backward()
        return pooled, mean, x.grad, a.grad, theta.grad

    def attention_ref():
        x, a, theta = attention_pool_inputs(2, 6, 5, 4, requires_grad=True)
        pooled, mean = ref_pool.attention_pool(x, a, theta, True)
        (pooled.square().sum() + mean.sum()).backward()
        return pooled, mean, x.grad, a.grad, theta.grad

    def gather_inputs():
        f1 = overlap_maps(8, 3, 6, 5, seed=1).requires_grad_(True)
        f2 = overlap_maps(8, 3, 4, 7, seed=2).requires_grad_(True)
        return (f1, f2) + overlap_boxes(8, seed=3)

    def gather(fn):
        def run():
            f1, f2, b1, b2, fl1, fl2 = gather_inputs()
            g1, g2, valid = fn(f1, f2, b1, b2, fl1, fl2, 5)
            (g1.square().sum() + 3 * g2.sum()).backward()
            return g1, g2, valid, f1.grad, f2.grad
        return run

    x, c = kmeans_points(50, 6, seed=4), kmeans_points(5, 6, seed=5)
    labels = torch.arange(50) % 5

    def kmeans(assign, update):
        def run():
            lab_l2, d = assign(x, c, "l2")
            lab_ip, s = assign(x, c, "ip")
            sums, counts = update(x, labels, 5)
            return lab_l2, d.float(), lab_ip, s.float(), sums, counts
        return run

    pred = torch.stack([blocky_label_map(30, 40, (0, 1, 2, 9), block=4, seed=s) for s in (6, 7)])
    gt = torch.stack([blocky_label_map(30, 40, (0, 1, 2, 3), block=5, seed=s, ignore_frac=0.02)
                      for s in (8, 9)])
    lut = torch.tensor([0, 2, 1, 3])

    def metrics():
        batched = new_accumulators(3, rows=12, batch=2)
        ops.seg_metrics_update_(pred, gt, 3, **batched, pred_lut=lut)
        single = new_accumulators(3, rows=12)
        ops.seg_metrics_update_(pred[0], gt[0], 3, **single)  # one (H, W) pair, no LUT
        return tuple(batched.values()) + tuple(single.values())

    def metrics_ref():
        parts = [ref_metrics.seg_metrics_update(p, g, 3, 12, pred_lut=lut) for p, g in zip(pred, gt)]
        single = ref_metrics.seg_metrics_update(pred[0], gt[0], 3, 12)
        return (parts[0]["region_conf"] + parts[1]["region_conf"],
                parts[0]["boundary_conf"] + parts[1]["boundary_conf"],
                torch.stack([p["pred_stats"] for p in parts]), torch.stack([p["gt_hist"] for p in parts]),
                single["region_conf"], single["boundary_conf"], single["pred_stats"][None],
                single["gt_hist"][None])

    rgb = rgb_label_image(9, 7)
    return {
        "attention_pool": (attention, attention_ref),
        "overlap_gather": (gather(ops.overlap_gather), gather(ref_gather.overlap_gather)),
        "kmeans": (kmeans(ops.kmeans_assign, ops.kmeans_update),
                   kmeans(ref_kmeans.kmeans_assign, ref_kmeans.kmeans_update)),
        "seg_metrics": (metrics, metrics_ref),
        "rgb_to_label": (lambda: (ops.rgb_to_label(rgb),), lambda: (ref_codec.rgb_to_label(rgb),)),
    }


@pytest.mark.parametrize("case", ["attention_pool", "overlap_gather", "kmeans", "seg_metrics",
                                  "rgb_to_label"])
def test_reference_mode_gives_the_reference_without_the_kernels(case):
    run, reference = _op_cases()[case]
    want = reference()
    with KernelCalls() as fused_calls:
        fused = run()
    assert fused_calls.calls, "the fused mode must reach the kernels (else this test proves nothing)"
    with ops.use_reference(), KernelCalls() as ref_calls:
        got = run()
    assert ref_calls.calls == {}, f"kernels called in reference mode: {ref_calls.calls}"
    assert len(got) == len(want) == len(fused)
    for g, w, f in zip(got, want, fused):
        assert g.dtype == f.dtype and g.shape == f.shape  # the op's output contract
        if g.is_floating_point():
            torch.testing.assert_close(g, w.to(g.dtype), rtol=0, atol=0)  # exactly the reference
            torch.testing.assert_close(g, f, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(g, w.to(g.dtype)) and torch.equal(g, f)


def test_reference_mode_keeps_the_ops_checks():
    x, a, theta = attention_pool_inputs(2, 6, 5, 4)
    with ops.use_reference():
        with pytest.raises(RuntimeError, match="theta must have shape"):
            ops.attention_pool(x, a, theta[:3])
        with pytest.raises(RuntimeError, match='metric must be "l2" or "ip"'):
            ops.kmeans_assign(kmeans_points(4, 3), kmeans_points(2, 3), "cos")
        with pytest.raises(RuntimeError, match="boxes1 must have shape"):
            f = overlap_maps(2, 3, 4, 4)
            b1, b2, fl1, fl2 = overlap_boxes(2)
            ops.overlap_gather(f, f, b1[:1], b2, fl1, fl2)


def test_reference_mode_keeps_dtype_and_layout():
    x, a, theta = attention_pool_inputs(2, 6, 5, 4, dtype=torch.bfloat16)
    f = overlap_maps(4, 3, 6, 6, channels_last=True, dtype=torch.bfloat16)
    boxes = overlap_boxes(4, seed=1)
    for mode in (False, True):
        with ops.use_reference(mode):
            pooled, mean = ops.attention_pool(x, a, theta.float(), True)
            g1, _, valid = ops.overlap_gather(f, f, *boxes)
            lab, val = ops.kmeans_assign(kmeans_points(7, 3, torch.float16), kmeans_points(2, 3))
        assert pooled.dtype == mean.dtype == g1.dtype == torch.bfloat16
        assert g1.is_contiguous(memory_format=torch.channels_last) and valid.dtype == torch.bool
        assert lab.dtype == torch.int64 and val.dtype == torch.float32


def test_seg_evaluator_goes_through_the_switch():
    pred = blocky_label_map(40, 50, (0, 1, 2, 3), block=5, seed=1)
    gt = blocky_label_map(40, 50, (0, 1, 2, 3), block=6, seed=2, ignore_frac=0.02)
    results = []
    for mode in (False, True):
        with ops.use_reference(mode), KernelCalls() as calls:
            ev = SegEvaluator(3)
            ev.update(pred, gt)
            results.append(ev.compute("hungarian"))
        assert ("seg_metrics_update_" in calls.calls) != mode
    assert results[0]["mIoU"] == results[1]["mIoU"] and results[0]["mBIoU"] == results[1]["mBIoU"]


# ------------------------------------------------------------------ training steps
TINY_MODEL = {"arch": "resnet18", "width": 8, "output_stride": 16, "hidden_mlp": 32, "feat_dim": 16,
              "num_prototypes": 10}




def _pretrain_loss_and_grads(model, batch):
    from lusscore.losses.pass_loss import add_p2p, pass_losses
    pcfg = load_config("demo")["pretrain"]
    weights = {"swav": 0.5, "d2s": 0.5, "p2p": 1.0}
    bs = batch.images[0].shape[0]
    model.zero_grad(set_to_none=True)
    out = model(batch.by_size())
    total, parts = pass_losses(out, bs, len(batch.images), weights, pcfg, None,
                               model.prototypes.weight)
    total = add_p2p(model, out, batch, bs, weights, total, parts, pcfg)
    total.backward()
    return total.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_pretrain_step_fused_and_reference_agree():
    from lusscore.models.pass_models import PASSPretrainModel
    torch.manual_seed(0)
    fused_model = PASSPretrainModel(TINY_MODEL, {"swav": 0.5, "d2s": 0.5, "p2p": 1.0})
    ref_model = copy.deepcopy(fused_model)
    batch = multicrop_batch()
    with KernelCalls() as fused_calls:
        loss_f, grads_f = _pretrain_loss_and_grads(fused_model, batch)
    with ops.use_reference(), KernelCalls() as ref_calls:
        loss_r, grads_r = _pretrain_loss_and_grads(ref_model, batch)
    assert {"overlap_gather", "overlap_gather_backward"} <= set(fused_calls.calls)
    assert ref_calls.calls == {}
    torch.testing.assert_close(loss_r, loss_f, rtol=1e-5, atol=1e-6)
    assert grads_f.keys() == grads_r.keys() and any(k.startswith("p2p.") for k in grads_f)
    for k in grads_f:  # float32 sums in another order: the slack scales with the gradient
        atol = 1e-6 + 1e-5 * grads_r[k].abs().max().item()
        torch.testing.assert_close(grads_r[k], grads_f[k], rtol=1e-4, atol=atol, msg=k)


def test_attention_step_fused_and_reference_agree():
    torch.manual_seed(0)
    fused = PixelAttention(16, hidden=8)
    ref = copy.deepcopy(fused)
    z = torch.randn(3, 16, 4, 4)
    results = []
    for model, mode in ((fused, False), (ref, True)):
        with ops.use_reference(mode), KernelCalls() as calls:
            pooled = model(z, return_attention=False)
            pooled.square().sum().backward()
            model.eval()
            _, mean = model(z)
        assert ("attention_pool" in calls.calls) != mode
        results.append((pooled.detach(), mean, {k: p.grad for k, p in model.named_parameters()}))
    (p_f, m_f, g_f), (p_r, m_r, g_r) = results
    torch.testing.assert_close(p_r, p_f, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m_r, m_f, rtol=1e-5, atol=1e-6)
    assert "theta" in g_f
    for k in g_f:
        torch.testing.assert_close(g_r[k], g_f[k], rtol=1e-4, atol=1e-6, msg=k)


# ------------------------------------------------------------------ the config key in the stages
def test_stage_command_start_applies_the_key(tmp_path):
    from lusscore.stages.common import start_run
    args = Namespace(run_dir=str(tmp_path), config="demo", set=["ops=reference"], device="cpu")
    cfg = start_run(args).cfg
    try:
        assert cfg["ops"] == "reference" and ops.ops_mode() == "reference"
    finally:
        ops.set_ops_mode("fused")
    with pytest.raises(LusscoreError, match="ops must be one of"):
        start_run(Namespace(run_dir=str(tmp_path), config="demo", set=["ops=fast"], device="cpu"))


@pytest.mark.slow
def test_luss_run_with_reference_ops_calls_no_kernel(tmp_path, monkeypatch):
    """`luss run synthetic_gpu --set ops=reference` shrunk to the tiny pipeline's sizes: every
    stage finishes (the GPU config's keys fit the code), no fused kernel is called, each
    reference twin is, and <run>/timings.json lists the stages."""
    from lusscore import cli
    from lusscore.data.synthetic import SynthConfig, generate_dataset
    from python_tests.test_pipeline import TINY

    root = tmp_path / "data"
    generate_dataset(root, SynthConfig(classes=3, train_per_class=8, val_per_class=3, semi_per_class=1,
                                       size=48, seed=2), progress=False)
    kernel_calls, twin_calls = [], []
    for name in FUSED_OPS:
        original = getattr(torch.ops.lusscore, name)
        monkeypatch.setattr(torch.ops.lusscore, name,
                            lambda *a, _n=name, _f=original: (kernel_calls.append(_n), _f(*a))[1])
    for module, name in ((ref_pool, "attention_pool"), (ref_gather, "overlap_gather"),
                         (ref_kmeans, "kmeans_assign"), (ref_kmeans, "kmeans_update"),
                         (ref_metrics, "seg_metrics_update")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name,
                            lambda *a, _n=name, _f=original, **k: (twin_calls.append(_n), _f(*a, **k))[1])
    run = tmp_path / "run"
    argv = ["run", "synthetic_gpu", "--run-dir", str(run), "--device", "cpu", "--set", "ops=reference",
            "--set", f"data.root={root}", "--set", "data.workers=0", "--set", "model.output_stride=16"]
    for item in TINY + ["model.hidden_mlp=32", "model.num_prototypes=20", "model.feat_dim=16",
                        "pretrain.crops.counts=[2, 2]", "attention.queue_length=16"]:
        argv += ["--set", item]
    torch.manual_seed(0)
    assert cli.main(argv) == 0
    assert kernel_calls == []
    assert set(twin_calls) == {"attention_pool", "overlap_gather", "kmeans_assign", "kmeans_update",
                               "seg_metrics_update"}
    assert ops.ops_mode() == "fused"  # run_pipeline restored the mode
    assert load_config(run / "config.yaml")["ops"] == "reference"
    timings = json.loads((run / "timings.json").read_text())
    assert timings["ops"] == "reference"
    assert list(timings["stages_s"]) == ["pretrain", "attention", "cluster", "sweep_tau", "label",
                                         "finetune", "infer", "evaluate", "semi", "distance_match",
                                         "baselines"]
    assert all(t >= 0 for t in timings["stages_s"].values())
    assert timings["total_s"] == pytest.approx(sum(timings["stages_s"].values()), rel=1e-6)
    assert json.loads((run / "metrics.json").read_text())["mIoU"] >= 0
