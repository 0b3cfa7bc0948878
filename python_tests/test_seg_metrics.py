"""seg_metrics_update_, the ImageNet-S evaluator, the matching and `luss evaluate`."""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lusscore.ops  # noqa: F401
from lusscore.cli import main as luss
from lusscore.data import read_label_png, write_label_png
from lusscore.matching import cooccurrence, cost_matrix, load_match, match_to_json
from lusscore.metrics import KEYS, SegEvaluator, ThresholdSweep
from lusscore.ops.munkres import munkres_assign
from lusscore.ops.seg_metrics import band_dilation, new_accumulators, seg_metrics_update_
from lusscore.reference import seg_metrics as ref
from lusscore.stages.evaluate import evaluate
from lusscore.utils import LusscoreError
from python_tests.conftest import cuda_usable, requires_cuda
from python_tests.samples import blocky_label_map, segmentation_pair

requires_two_gpus = pytest.mark.skipif(
    not cuda_usable() or torch.cuda.device_count() < 2,
    reason="needs two CUDA GPUs (cuda:1) and lusscore built with CUDA kernels")

FIX = Path(__file__).parent / "fixtures" / "imagenet_s_eval"
EXPECTED = json.loads((FIX / "expected.json").read_text())
RUNS = EXPECTED["runs"]
C = EXPECTED["num_classes"]
GT_DIR = FIX / "ImageNetS50" / "validation-segmentation"


def run_op(pred, gt, num_classes, rows=None, **kw):
    batch = pred.shape[0] if pred.dim() == 3 else 1
    acc = new_accumulators(num_classes, rows, batch, device=pred.device)
    seg_metrics_update_(pred, gt, num_classes, **acc, **kw)
    return {k: v.cpu() for k, v in acc.items()}


def assert_same_as_reference(pred, gt, num_classes, rows, **kw):
    ours = run_op(pred, gt, num_classes, rows, **kw)
    want = ref.seg_metrics_update(pred.cpu(), gt.cpu(), num_classes, rows, **kw)
    for k in want:
        assert torch.equal(ours[k].reshape(want[k].shape), want[k]), k


# ------------------------------------------------------------------ the op
@pytest.mark.parametrize("h,w", [(1, 5), (7, 9), (33, 17), (90, 120), (150, 200), (210, 280)])
def test_op_matches_reference(device, h, w):
    for seed, labels in enumerate([(0, 3), (0, 1, 2, 5), (0, 1, 2, 3, 4, 5, 6)]):
        gt = blocky_label_map(h, w, labels, block=5, seed=seed, ignore_frac=0.03)
        pred = blocky_label_map(h, w, labels + (9, 31), block=4, seed=seed + 10)
        pred[0, 0] = 12  # an id beyond C with its own row, and one beyond the rows
        pred[-1, -1] = 40
        assert_same_as_reference(pred.to(device), gt.to(device), 8, rows=20)


@pytest.mark.parametrize("h,w,d", [(210, 280, 10), (330, 440, 16), (90, 120, 4), (150, 200, 8),
                                   (333, 500, 18)])
def test_dilation_rounds_half_to_even(h, w, d):
    assert band_dilation(h, w) == d == ref.band_dilation(h, w)


@pytest.mark.parametrize("h,w", [(90, 120), (210, 280), (31, 47)])
def test_band_against_erosion(device, h, w):
    """Boundary confusion diagonal = per-label band areas of the direct erosion reference."""
    torch.manual_seed(h)
    for labels in [(0, 1), (0, 1, 2, 3, 1000)]:
        lab = blocky_label_map(h, w, labels, block=7, seed=w)
        acc = run_op(lab.to(device), torch.zeros_like(lab).to(device), 3, rows=1001)
        band = ref.band_map(lab)
        # pred rows in band vs not: row 1001 collects pixels outside the band
        in_band = acc["boundary_conf"][0, :1001].sum().item()
        assert in_band == int(band.sum())
        for u in labels:
            assert acc["boundary_conf"][0, u].sum().item() == int(band[lab == u].sum())


def test_op_batch_dtypes_noncontiguous(device):
    pairs = [segmentation_pair(40, 60, 4, num_classes=10, seed=s) for s in range(3)]
    pred = torch.stack([p for p, _ in pairs]).to(device)
    gt = torch.stack([g for _, g in pairs]).to(device)
    batch = run_op(pred, gt, 10)
    single = [run_op(p.to(device), g.to(device), 10) for p, g in pairs]
    for k in ("region_conf", "boundary_conf"):
        assert torch.equal(batch[k], sum(s[k] for s in single))
    for k in ("pred_stats", "gt_hist"):
        assert torch.equal(batch[k], torch.cat([s[k] for s in single]))
    # int32 / mixed dtypes and a transposed (non-contiguous) view give the same counts
    mixed = run_op(pred.int(), gt, 10)
    assert all(torch.equal(mixed[k], batch[k]) for k in batch)
    pt = pred.transpose(1, 2).contiguous().transpose(1, 2)  # same values, permuted strides
    gtt = gt.transpose(1, 2).contiguous().transpose(1, 2)
    assert not pt.is_contiguous() and not gtt.is_contiguous()
    nc = run_op(pt, gtt, 10)
    assert all(torch.equal(nc[k], batch[k]) for k in batch)
    tr = run_op(pred.transpose(1, 2), gt.transpose(1, 2), 10)
    want = sum(run_op(p.t().contiguous().to(device), g.t().contiguous().to(device), 10)["region_conf"]
               for p, g in pairs)
    assert torch.equal(tr["region_conf"], want)


def test_op_lut_relabels_before_bands(device):
    gt = blocky_label_map(50, 70, (0, 1, 2), block=6, seed=1)
    pred = blocky_label_map(50, 70, (0, 3, 4, 5), block=6, seed=2)
    lut = torch.tensor([0, 1, 2, 1, 2, 2])
    assert_same_as_reference(pred.to(device), gt.to(device), 3, rows=6, pred_lut=lut.to(device))
    relabelled = lut[pred]
    a = run_op(pred.to(device), gt.to(device), 3, rows=6, pred_lut=lut.to(device))
    b = run_op(relabelled.to(device), gt.to(device), 3, rows=6)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_op_empty(device):
    acc = run_op(torch.zeros(0, 5, 5, dtype=torch.long, device=device),
                 torch.zeros(0, 5, 5, dtype=torch.long, device=device), 4)
    assert acc["region_conf"].sum() == 0
    acc = run_op(torch.zeros(0, 7, dtype=torch.long, device=device),
                 torch.zeros(0, 7, dtype=torch.long, device=device), 4)
    assert acc["region_conf"].sum() == 0 and acc["gt_hist"].sum() == 0


def test_op_bad_inputs():
    p = torch.zeros(4, 5, dtype=torch.long)
    acc = new_accumulators(3)
    with pytest.raises(RuntimeError, match="same shape"):
        seg_metrics_update_(p, torch.zeros(4, 6, dtype=torch.long), 3, **acc)
    with pytest.raises(RuntimeError, match="integer label ids"):
        seg_metrics_update_(p.float(), p, 3, **acc)
    with pytest.raises(RuntimeError, match="region_conf must have shape"):
        seg_metrics_update_(p, p, 5, **acc)
    with pytest.raises(RuntimeError, match="must have dtype"):
        seg_metrics_update_(p, p, 3, **{**acc, "boundary_conf": acc["boundary_conf"].int()})
    with pytest.raises(RuntimeError, match="one \\(H, W\\) label map or a batch"):
        seg_metrics_update_(p[0], p[0], 3, **acc)


@pytest.mark.parametrize("with_lut", [False, True])
def test_opcheck_and_compile(device, with_lut):
    pred, gt = (t.to(device) for t in segmentation_pair(20, 30, 3, num_classes=5, seed=3))
    lut = torch.tensor([0, 2, 1, 3, 5, 4], device=device) if with_lut else None
    acc = new_accumulators(5, device=device)
    torch.library.opcheck(torch.ops.lusscore.seg_metrics_update_,
                          (pred, gt, 5, 1000, 0.03, lut, acc["region_conf"],
                           acc["boundary_conf"], acc["pred_stats"], acc["gt_hist"]))

    # aot_eager functionalizes the in-place update: the fake kernel and the mutation
    # annotations are what it relies on.
    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(p, g, r, b, s, h):
        torch.ops.lusscore.seg_metrics_update_(p, g, 5, 1000, 0.03, lut, r, b, s, h)
        return r.sum()

    fresh = new_accumulators(5, device=device)
    step(pred, gt, *fresh.values())
    want = run_op(pred, gt, 5, pred_lut=lut)
    for k in want:
        assert torch.equal(fresh[k].cpu(), want[k]), k
    assert fresh["region_conf"].sum() > 0  # the compiled call updated the accumulators


@requires_cuda
def test_cpu_cuda_parity():
    for s, n in enumerate([2, 30]):
        pred, gt = segmentation_pair(375, 500, n, num_classes=919, seed=s)
        a = run_op(pred, gt, 919)
        b = run_op(pred.cuda(), gt.cuda(), 919)
        assert all(torch.equal(a[k], b[k]) for k in a)


LABEL_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16,
                torch.uint32, torch.uint64]


def _typed_pair(dtype, h=45, w=61, seed=0):
    """(pred, gt, ignore_index) in `dtype`: ids the dtype holds, ids past the rows, the
    ignore id (1000, or one the dtype holds), negative ids for signed dtypes and, for 32/64-bit
    unsigned dtypes, an id above 2^31."""
    small = dtype in (torch.uint8, torch.int8)
    ignore = (100 if dtype == torch.int8 else 250) if small else 1000
    gt = blocky_label_map(h, w, (0, 1, 2, 5), block=5, seed=seed, ignore_frac=0.03,
                          ignore_index=ignore)
    pred = blocky_label_map(h, w, (0, 1, 2, 9, 31), block=4, seed=seed + 1)
    pred[0, :3] = torch.tensor([12, 40, 7])  # an id beyond C with its own row, one beyond R
    gt[-1, :2] = torch.tensor([6, 7])  # GT ids beyond C: counted in gt_hist's last column
    if dtype.is_signed:
        pred[1, 0], gt[-2, 0] = -3, -2
    if dtype in (torch.uint32, torch.uint64):
        pred[2, 0] = 2 ** 32 - 5
    return pred.to(dtype), gt.to(dtype), ignore


@pytest.mark.parametrize("dtype", LABEL_DTYPES)
def test_op_every_integer_dtype(device, dtype):
    """Every integer dtype the shared check admits runs on both devices: the CPU equals the
    reference, CUDA equals the CPU; also as a mixed pair with int64 GT, transposed
    (non-contiguous) and with a LUT."""
    pred, gt, ignore = _typed_pair(dtype, seed=LABEL_DTYPES.index(dtype))
    lut = torch.tensor([0, 2, 1, 3, 5, 4, 1, 0, 0, 2])
    cases = [(pred, gt, None), (pred, gt.long(), None), (pred.t(), gt.t(), None),
             (pred, gt, lut)]
    for p, g, lut_ in cases:
        kw = dict(ignore_index=ignore, pred_lut=lut_)
        if device.type == "cpu":
            assert_same_as_reference(p, g, 5, 40, **kw)
        else:
            want = run_op(p, g, 5, 40, **kw)
            got = run_op(p.to(device), g.to(device), 5, 40,
                         **{**kw, "pred_lut": None if lut_ is None else lut_.to(device)})
            assert all(torch.equal(got[k], want[k]) for k in want)


@requires_cuda
def test_cuda_grid_stride_past_one_grid():
    """More pixels than one grid of the pixel kernels covers (capped_blocks: sms * 32 blocks of
    256 threads), in a batch: equal to the CPU."""
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    B = 3
    side = int(math.ceil(math.sqrt(1.2 * sms * 32 * 256 / B)))
    assert B * side * side > sms * 32 * 256
    pairs = [segmentation_pair(side, side + 7, 30, num_classes=50, seed=s) for s in range(B)]
    pred = torch.stack([p for p, _ in pairs])
    gt = torch.stack([g for _, g in pairs])
    want = run_op(pred, gt, 50)
    got = run_op(pred.cuda(), gt.cuda(), 50)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert want["region_conf"][0].sum() == (gt != 1000).sum()


@requires_two_gpus
def test_cuda_non_default_device():
    """Maps and accumulators on cuda:1 while cuda:0 is current: the accumulators on cuda:1 get
    the CPU's counts."""
    assert torch.cuda.current_device() == 0
    pred, gt = segmentation_pair(120, 90, 5, num_classes=20, seed=7)
    lut = torch.arange(30).flip(0)
    want = run_op(pred, gt, 20, 30, pred_lut=lut)
    acc = new_accumulators(20, 30, device="cuda:1")
    seg_metrics_update_(pred.to("cuda:1"), gt.to("cuda:1"), 20, **acc, pred_lut=lut.to("cuda:1"))
    for k in want:
        assert acc[k].device == torch.device("cuda:1")
        assert torch.equal(acc[k].cpu(), want[k]), k
    assert torch.cuda.current_device() == 0


def test_op_argument_limits(device):
    p = torch.zeros(4, 5, dtype=torch.long, device=device)
    acc = new_accumulators(3, device=device)
    with pytest.raises(RuntimeError, match="num_classes must be >= 1, got 0"):
        seg_metrics_update_(p, p, 0, **acc)
    with pytest.raises(RuntimeError, match="boundary_ratio must be >= 0, got -0.5"):
        seg_metrics_update_(p, p, 3, **acc, boundary_ratio=-0.5)
    with pytest.raises(RuntimeError, match="boundary_ratio must be >= 0, got nan"):
        seg_metrics_update_(p, p, 3, **acc, boundary_ratio=float("nan"))
    with pytest.raises(RuntimeError, match="pred_lut must have dtype"):
        seg_metrics_update_(p, p, 3, **acc, pred_lut=torch.zeros(3, dtype=torch.int32, device=device))


def test_op_huge_boundary_ratio_is_all_band(device):
    """d is capped at max(H, W) (every pixel is in the band beyond that): an enormous or
    infinite ratio gives what any ratio with d >= max(H, W) gives, not an overflowed d."""
    pred, gt = (t.to(device) for t in segmentation_pair(20, 30, 4, num_classes=6, seed=8))
    assert band_dilation(20, 30, 1.0) == band_dilation(20, 30, float("inf")) == 30
    want = ref.seg_metrics_update(pred.cpu(), gt.cpu(), 6, 7, boundary_ratio=1.0)
    huge = ref.seg_metrics_update(pred.cpu(), gt.cpu(), 6, 7, boundary_ratio=float("inf"))
    assert all(torch.equal(huge[k], want[k]) for k in want)
    for ratio in (1.0, 1e300, float("inf")):
        got = run_op(pred, gt, 6, 7, boundary_ratio=ratio)
        assert all(torch.equal(got[k].reshape(want[k].shape), want[k]) for k in want), ratio
        assert got["boundary_conf"][0, 7].sum() == 0  # no valid pixel outside the pred band


# ------------------------------------------------------------------ matching
def test_munkres_is_optimal_on_ties():
    from scipy.optimize import linear_sum_assignment
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 15))
        cost = rng.integers(0, 3, (n, n)).astype(np.float64)
        cols = munkres_assign(torch.from_numpy(cost)).numpy()
        assert sorted(cols.tolist()) == list(range(n))
        r, c = linear_sum_assignment(cost)
        assert cost[np.arange(n), cols].sum() == cost[r, c].sum()
    rect = munkres_assign(torch.tensor([[1.0, 2.0, 0.5], [2.0, 0.1, 3.0]]))
    assert rect.tolist() == [2, 1]


def test_munkres_agrees_with_package_if_installed():
    munkres = pytest.importorskip("munkres")
    rng = np.random.default_rng(1)
    for _ in range(30):
        n = int(rng.integers(1, 12))
        cost = rng.integers(0, 3, (n, n)).astype(np.float64)
        want = dict(munkres.Munkres().compute(cost.tolist()))
        assert munkres_assign(torch.from_numpy(cost)).tolist() == [want[i] for i in range(n)]


def test_cooccurrence_and_cost():
    n = cooccurrence([np.array([1, 2]), np.array([2, 9]), np.array([])],
                     [np.array([1]), np.array([2, 3]), np.array([3])], 3)
    assert n.tolist() == [[1, 0, 0], [1, 1, 1], [0, 0, 0]]
    cost = cost_matrix(n, 3)
    assert cost.dtype == np.float32 and cost[1, 1] == np.float32(1) - np.float32(1) / np.float32(3)


def test_pixel_hungarian_and_pixel_accuracy_by_hand():
    # Two 2x4 images, classes 0..2. Cluster 0 covers class 1 best, cluster 2 class 0, cluster 1
    # class 2: the pixel match permutes 0 too, the image-level one keeps 0 as 'other'.
    gt = [np.array([[0, 0, 1, 1], [0, 0, 1, 1]]), np.array([[2, 2, 1, 1], [2, 2, 1000, 1000]])]
    pred = [np.array([[2, 2, 0, 0], [2, 1, 0, 0]]), np.array([[1, 1, 0, 0], [1, 0, 5, 5]])]
    ev = SegEvaluator(2)
    for p, g in zip(pred, gt):
        ev.update(p, g)
    res = ev.compute("hungarian-pixel")
    assert res["match"] == {0: 1, 1: 2, 2: 0}
    # 14 valid pixels; right: class 1 six of six, class 0 three of four, class 2 three of four
    assert res["PixelAcc"] == pytest.approx(100 * 12 / 14)
    # IoU = inter / (predicted + GT - inter): class 0 3/(3+4-3), 1 6/(7+6-6), 2 3/(4+4-3)
    np.testing.assert_allclose(res["IoUs"], [75.0, 600 / 7, 60.0], atol=1e-6)
    assert ev.compute("hungarian")["match"][0] == 0  # the official match keeps 0 as 'other'
    assert ev.compute(None)["PixelAcc"] == 0.0  # no pixel of id k is on class k
    with pytest.raises(LusscoreError, match="hungarian-pixel"):
        ev.compute("pixels")


# ------------------------------------------------------------------ fixtures: official numbers
@functools.lru_cache(maxsize=None)
def _maps(pred_dir: str, names_file: str):
    out = []
    for line in (FIX / names_file).read_text().split("\n"):
        if line.strip():
            lab = line.split()[-1]
            out.append((read_label_png(FIX / pred_dir / lab), read_label_png(GT_DIR / lab)))
    return out


@functools.lru_cache(maxsize=None)
def _evaluator(pred_dir: str, names_file: str, device: str) -> SegEvaluator:
    ev = SegEvaluator(C, device=device)
    for pred, gt in _maps(pred_dir, names_file):
        ev.update(pred, gt)
    return ev


def assert_official(result: dict, official: dict):
    for k, want in official.items():
        got = result[k]
        if k == "IoUs":
            assert len(got) == len(want)
            np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)
        elif want is None:
            assert got is None or math.isnan(got), k
        else:
            assert abs(got - want) <= 1e-3, (k, got, want)


@pytest.mark.parametrize("run", sorted(RUNS))
def test_official_numbers_api(device, run):
    spec = RUNS[run]
    ev = _evaluator(spec["prediction_dir"], spec["names_file"], str(device))
    match = load_match(FIX / spec["match_file"]) if spec["match_file"] else None
    assert_official(ev.compute(match), spec["official"])
    if run.endswith("__hungarian"):
        hung = ev.compute("hungarian")
        assert match_to_json(hung["match"]) == (FIX / spec["match_file"]).read_text()
        assert_official(hung, spec["official"])


@pytest.mark.parametrize("run", sorted(RUNS))
def test_official_numbers_cli(tmp_path, run, capsys):
    spec = RUNS[run]
    out = tmp_path / "out.json"
    match = str(FIX / spec["match_file"]) if spec["match_file"] else "none"
    args = ["evaluate", "--gt", str(GT_DIR), "--pred", str(FIX / spec["prediction_dir"]),
            "--names", str(FIX / spec["names_file"]), "--num-classes", str(C), "--match", match,
            "--json", str(out), "--workers", "0", "--quiet"]
    if run.endswith("__hungarian"):
        args[args.index("--match") + 1] = "hungarian"
        args[args.index("--workers") + 1] = "2"  # the parallel decoding path
        args += ["--save-match", str(tmp_path / "m.json")]
    if run.startswith("out_of_range"):  # ids past C without a match: an error unless dropped
        assert luss(args) == 2
        assert f"predicted ids outside 0..{C}: [" in capsys.readouterr().err
        args += ["--out-of-range", "drop"]
    assert luss(args) == 0
    result = json.loads(out.read_text())
    assert_official(result, spec["official"])
    if run.endswith("__hungarian"):
        assert (tmp_path / "m.json").read_bytes() == (FIX / spec["match_file"]).read_bytes()


def test_pass_bands_equal_relabelled_predictions():
    spec = RUNS["split_many_to_one__given_match"]
    match = load_match(FIX / spec["match_file"])
    res = evaluate(GT_DIR, FIX / spec["prediction_dir"], C, FIX / spec["names_file"],
                   str(FIX / spec["match_file"]), pass_bands=True)
    lut = np.zeros(max(match) + 1, dtype=np.int64)
    for k, v in match.items():
        lut[k] = v
    ev = SegEvaluator(C)
    for pred, gt in _maps(spec["prediction_dir"], spec["names_file"]):
        ev.update(lut[pred], gt)
    want = ev.compute()
    assert all(res[k] == pytest.approx(want[k], nan_ok=True) for k in KEYS)
    assert res["mIoU"] == pytest.approx(100.0, abs=1e-6)
    assert res["mBIoU"] > spec["official"]["mBIoU"] + 1  # fewer split borders in the bands


def test_threshold_sweep_matches_separate_runs():
    maps = _maps("predictions/noisy_boundary", RUNS["noisy_boundary__unmatched"]["names_file"])[:10]
    rng = np.random.default_rng(0)
    confs = [rng.random(p.shape).astype(np.float32) for p, _ in maps]
    sweep = ThresholdSweep(C, [0.0, 0.3, 0.6])
    for (p, g), conf in zip(maps, confs):
        sweep.update(p, g, conf)
    res = sweep.compute("hungarian")
    for t, got in zip(res["thresholds"], res["results"]):
        ev = SegEvaluator(C)
        for (p, g), conf in zip(maps, confs):
            ev.update(np.where(conf < t, 0, p), g)
        want = ev.compute("hungarian")
        assert all(got[k] == pytest.approx(want[k], nan_ok=True) for k in KEYS)
    assert res["best_threshold"] == 0.0 and res["best"]["mIoU"] == max(
        r["mIoU"] for r in res["results"])


def test_cli_curve(tmp_path):
    spec = RUNS["noisy_boundary__unmatched"]
    names = [l.split()[-1] for l in (FIX / spec["names_file"]).read_text().splitlines()][:6]
    pred_dir = tmp_path / "pred"
    for n in names:
        pred = read_label_png(FIX / spec["prediction_dir"] / n)
        write_label_png(pred_dir / n, pred)
        np.save(pred_dir / (n[:-4] + ".npy"), np.full(pred.shape, 0.5, dtype=np.float32))
    (tmp_path / "names.txt").write_text("\n".join(names))
    out = tmp_path / "o.json"
    assert luss(["evaluate", "--gt", str(GT_DIR), "--pred", str(pred_dir), "--names",
                 str(tmp_path / "names.txt"), "--num-classes", str(C), "--curve", "0.4", "0.6",
                 "0.2", "--workers", "0", "--quiet", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["thresholds"] == [0.4, 0.6]
    assert res["best_threshold"] == 0.4 and res["results"][1]["FMeasure"] == 0.0


# ------------------------------------------------------------------ bad input
@pytest.fixture()
def small_set(tmp_path):
    names = [l.split()[-1] for l in
             (FIX / RUNS["noisy_boundary__unmatched"]["names_file"]).read_text().splitlines()][:3]
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    for n in names:
        write_label_png(gt_dir / n, read_label_png(GT_DIR / n))
        write_label_png(pred_dir / n, read_label_png(FIX / "predictions/noisy_boundary" / n))
    return gt_dir, pred_dir, names


def _cli(gt_dir, pred_dir, *extra):
    return luss(["evaluate", "--gt", str(gt_dir), "--pred", str(pred_dir), "--num-classes",
                 str(C), "--workers", "0", "--quiet", *extra])


def test_missing_predictions_listed(small_set, capsys):
    gt_dir, pred_dir, names = small_set
    (pred_dir / names[0]).unlink()
    (pred_dir / names[2]).unlink()
    assert _cli(gt_dir, pred_dir) == 2
    err = capsys.readouterr().err
    assert "2 prediction file(s) missing" in err and names[0] in err and names[2] in err
    assert _cli(gt_dir, pred_dir, "--missing-as-background") == 0
    assert "missing prediction" in capsys.readouterr().out


def test_size_mismatch_names_both_sizes(small_set, capsys):
    gt_dir, pred_dir, names = small_set
    gt = read_label_png(gt_dir / names[1])
    write_label_png(pred_dir / names[1], np.zeros((gt.shape[0] + 1, gt.shape[1]), np.int64))
    assert _cli(gt_dir, pred_dir) == 2
    err = capsys.readouterr().err
    assert names[1] in err and f"{gt.shape[0] + 1}x{gt.shape[1]}" in err
    assert f"{gt.shape[0]}x{gt.shape[1]}" in err


@pytest.mark.parametrize("mode", ["L", "P"])
def test_grayscale_or_palette_png(small_set, capsys, mode):
    gt_dir, pred_dir, names = small_set
    Image.new(mode, (10, 10)).save(pred_dir / names[0])
    assert _cli(gt_dir, pred_dir) == 2
    err = capsys.readouterr().err
    assert names[0] in err and "grayscale/palette" in err


def test_unreadable_png(small_set, capsys):
    gt_dir, pred_dir, names = small_set
    (pred_dir / names[2]).write_bytes(b"not a png")
    assert _cli(gt_dir, pred_dir) == 2
    err = capsys.readouterr().err
    assert names[2] in err and "cannot read" in err


def test_match_lacking_an_id(small_set, tmp_path, capsys):
    gt_dir, pred_dir, names = small_set
    used = set()
    for n in names:
        used |= set(np.unique(read_label_png(pred_dir / n)).tolist())
    drop = max(used)
    bad = {str(i): i for i in range(C + 1) if i != drop}
    (tmp_path / "m.json").write_text(json.dumps(bad))
    assert _cli(gt_dir, pred_dir, "--match", str(tmp_path / "m.json")) == 2
    err = capsys.readouterr().err
    assert "lacks predicted id" in err and str(drop) in err


def test_gt_out_of_range_is_an_error():
    ev = SegEvaluator(5)
    with pytest.raises(LusscoreError, match="outside 0..5"):
        ev.update(np.zeros((4, 4), np.int64), np.full((4, 4), 7), names=["x.png"])


def test_reset_and_out_of_range_ids():
    ev = SegEvaluator(3)
    p = np.array([[0, 1, 255], [4, 2, 2]])
    g = np.array([[0, 1, 1], [2, 2, 1000]])
    ev.update(p, g)
    r = ev.compute()
    assert r["out_of_range_ids"] == [4, 255]
    assert r["FMeasure"] > 0
    with pytest.raises(LusscoreError, match="Hungarian match covers"):
        ev.compute("hungarian")
    ev.reset()
    with pytest.raises(LusscoreError, match="no images"):
        ev.compute()


def _dist_worker(rank, world, init_file, pairs, out_file):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    ev = SegEvaluator(6)
    for pred, gt in pairs[rank::world]:
        ev.update(pred, gt)
    ev.all_reduce()
    if rank == 0:
        res = ev.compute()
        Path(out_file).write_text(json.dumps({k: res[k] for k in KEYS + ("out_of_range_ids",)}))
    dist.destroy_process_group()


def test_distributed_all_reduce(tmp_path):
    import torch.multiprocessing as mp
    pairs = [segmentation_pair(30, 40, 4, num_classes=6, seed=s) for s in range(5)]
    pairs[3][0][0, 0] = 20  # one rank sees a large id: its rows grow, the other's must follow
    out = tmp_path / "r.json"
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), pairs, str(out)), nprocs=2)
    ev = SegEvaluator(6)
    for rank in range(2):  # the same images in rank order
        for pred, gt in pairs[rank::2]:
            ev.update(pred, gt)
    want = ev.compute()
    got = json.loads(out.read_text())
    for k in KEYS:
        assert got[k] == pytest.approx(want[k], nan_ok=True), k
    assert got["out_of_range_ids"] == want["out_of_range_ids"] == [20]


def test_pass_bands_with_a_bijective_hungarian_match_change_nothing():
    spec = RUNS["permuted__hungarian"]
    res = evaluate(GT_DIR, FIX / spec["prediction_dir"], C, FIX / spec["names_file"],
                   "hungarian", pass_bands=True)
    assert match_to_json(res["match"]) == (FIX / spec["match_file"]).read_text()
    assert_official(res, spec["official"])


def test_state_merge_equals_one_pass():
    pairs = [segmentation_pair(30, 40, 4, num_classes=6, seed=s) for s in range(4)]
    pairs[1][0][0, :3] = torch.tensor([9, 15, -2])  # rows grow in one part only
    whole, first, second = SegEvaluator(6), SegEvaluator(6), SegEvaluator(6)
    for i, (p, g) in enumerate(pairs):
        whole.update(p, g)
        (first if i < 2 else second).update(p, g)
    for a, b in ((first, second), (second, first)):
        merged = SegEvaluator(6)
        merged.merge(a.state())
        merged.merge(b.state())
        assert merged.rows == whole.rows
        assert torch.equal(merged.region_conf, whole.region_conf)
        assert torch.equal(merged.boundary_conf, whole.boundary_conf)
    merged = SegEvaluator(6)
    merged.merge(first.state())
    merged.merge(second.state())
    got, want = merged.compute(), whole.compute()
    assert all(got[k] == pytest.approx(want[k], nan_ok=True) for k in KEYS)
    assert got["out_of_range_ids"] == [-2, 9, 15]


def test_ids_past_c_without_a_match_name_the_file(small_set, capsys):
    gt_dir, pred_dir, names = small_set
    pred = read_label_png(pred_dir / names[1])
    pred[0, 0] = C + 3
    write_label_png(pred_dir / names[1], pred)
    assert _cli(gt_dir, pred_dir) == 2
    assert (f"predicted ids outside 0..{C}: [{C + 3}], first in {pred_dir / names[1]}"
            in capsys.readouterr().err)
    assert _cli(gt_dir, pred_dir, "--out-of-range", "drop") == 0  # the official evaluator's way
    out = capsys.readouterr().out
    assert f"predicted ids outside 0..{C}: [{C + 3}], first in {pred_dir / names[1]}" in out


def test_num_classes_far_above_the_ids_present_is_said(small_set, capsys):
    gt_dir, pred_dir, names = small_set
    assert _cli(gt_dir, pred_dir) == 0
    assert "warning: --num-classes" not in capsys.readouterr().out
    assert luss(["evaluate", "--gt", str(gt_dir), "--pred", str(pred_dir), "--num-classes",
                 str(10 * (C + 1)), "--workers", "0", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"warning: --num-classes {10 * (C + 1)}, but the GT and the predictions hold ids" in out


def test_munkres_opcheck_and_compile():
    cost = torch.tensor([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]])
    torch.library.opcheck(torch.ops.lusscore.munkres_assign.default, (cost,))
    compiled = torch.compile(lambda c: munkres_assign(c) * 1, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(cost), munkres_assign(cost))
    assert munkres_assign(cost).tolist() == [1, 0, 2]


def test_without_other_means_leave_out_the_other_class():
    """App. B (Tab 15): mIoU and mBIoU over classes 1..C only."""
    spec = RUNS["noisy_boundary__unmatched"]
    res = _evaluator(spec["prediction_dir"], spec["names_file"], "cpu").compute()
    assert res["mIoU_without_other"] == pytest.approx(np.mean(res["IoUs"][1:]))
    assert res["mBIoU_without_other"] == pytest.approx(np.mean(res["BIoUs"][1:]))
    with_other = np.mean(res["IoUs"])
    assert res["mIoU"] == pytest.approx(with_other)
    assert res["mIoU_without_other"] != pytest.approx(res["mIoU"])
    pred = torch.tensor([[0, 0, 1, 1], [0, 0, 2, 2]])
    gt = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 2]])
    ev = SegEvaluator(2)
    ev.update(pred, gt)
    r = ev.compute()  # IoU: other 1, class 1 2/3, class 2 1/2
    assert r["mIoU_without_other"] == pytest.approx(100 * (2 / 3 + 1 / 2) / 2)
    assert r["mIoU"] == pytest.approx(100 * (1 + 2 / 3 + 1 / 2) / 3)
