"""Benchmark overlap_gather (two views, forward and forward+backward) against the
F.grid_sample reference, torch.compile of it, and torchvision's roi_align.

roi_align is timed on the overlap boxes in each map's pixel frame (aligned=True,
sampling_ratio=1: one bilinear sample per bin centre, i.e. the cell-centre lattice); it has
no horizontal flip, so it does slightly less work than the others.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT / "python_tests", Path(__file__).resolve().parent, ROOT):
    sys.path.insert(0, str(path))  # this checkout's lusscore, the bench helpers and samples

from common import parser, peak_memory, time_fn, write_results  # noqa: E402
from samples import overlap_boxes, overlap_maps  # noqa: E402

import lusscore.ops as ops  # noqa: E402
from lusscore.reference import overlap_gather as ref  # noqa: E402

# (batch, channels, map size, lattice size, dtypes): the shapes of the issue.
FULL = [(256, 512, 7, 7, [torch.float32, torch.bfloat16]),
        (256, 2048, 7, 7, [torch.bfloat16, torch.float16]),
        (64, 2048, 28, 14, [torch.float16, torch.bfloat16])]
QUICK = [(4, 16, 7, 7, [torch.float32]), (2, 32, 14, 5, [torch.float32])]
# On the CPU: the stage-4 pair of a ResNet-18/50 batch (torch.compile's peer takes minutes on
# the larger maps).
CPU = [(256, 512, 7, 7, [torch.float32, torch.bfloat16]), (256, 2048, 7, 7, [torch.float32])]


def roi_boxes(boxes1, boxes2, hw, dtype):
    """The overlap box of each pair in view 1's map pixels, as roi_align's (K, 5) rois."""
    u1, _, _ = ref.overlap_coordinates(boxes1, boxes2, torch.zeros_like(boxes1[:, 0], dtype=torch.bool),
                                       torch.zeros_like(boxes1[:, 0], dtype=torch.bool), 2, False)
    h, w = hw
    idx = torch.arange(boxes1.shape[0], device=boxes1.device, dtype=torch.float64)
    rois = torch.stack([idx, u1[:, 0, 0] * w, u1[:, 1, 0] * h, u1[:, 0, 1] * w, u1[:, 1, 1] * h], 1)
    return rois.to(dtype)


def implementations(pairs, size, hw):
    impls = {
        "lusscore": lambda a, b: ops.overlap_gather(a, b, *pairs, size=size)[:2],
        "reference_grid_sample": lambda a, b: ref.overlap_gather(a, b, *pairs, size=size)[:2],
    }
    compiled = torch.compile(ref.overlap_gather)
    impls["reference_compiled"] = lambda a, b: compiled(a, b, *pairs, size=size)[:2]
    try:
        from torchvision.ops import roi_align
        rois = {}

        def run_roi(a, b):
            key = a.dtype
            if key not in rois:
                rois[key] = (roi_boxes(pairs[0], pairs[1], hw, a.dtype),
                             roi_boxes(pairs[1], pairs[0], hw, a.dtype))
            r1, r2 = rois[key]
            return (roi_align(a, r1, size, 1.0, 1, True), roi_align(b, r2, size, 1.0, 1, True))

        impls["torchvision_roi_align"] = run_roi
    except ImportError:
        pass
    return impls


def main():
    p = parser(__doc__)
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    args = p.parse_args()
    device = torch.device(args.device)
    results = []
    sizes = QUICK if args.quick else CPU if device.type == "cpu" else FULL
    for batch, channels, hw, size, dtypes in sizes:
        pairs = overlap_boxes(batch, seed=0, device=device)
        for dtype in dtypes:
            for layout in ("contiguous", "channels_last"):
                cl = layout == "channels_last"
                f1 = overlap_maps(batch, channels, hw, hw, seed=1, dtype=dtype, device=device,
                                  channels_last=cl)
                f2 = overlap_maps(batch, channels, hw, hw, seed=2, dtype=dtype, device=device,
                                  channels_last=cl)
                grads = [overlap_maps(batch, channels, size, size, seed=3, dtype=dtype,
                                      device=device, channels_last=cl)] * 2  # layout of g
                for name, fn in implementations(pairs, size, (hw, hw)).items():
                    if cl and name != "lusscore":
                        continue  # the peers are timed on their native contiguous layout
                    case = dict(case=f"({batch},{channels},{hw},{hw})->{size}x{size}",
                                dtype=str(dtype).replace("torch.", ""), layout=layout, impl=name)
                    try:
                        a = f1.detach().requires_grad_()
                        b = f2.detach().requires_grad_()

                        def fwd():
                            with torch.no_grad():
                                return fn(f1, f2)

                        def fwd_bwd():
                            g1, g2 = fn(a, b)
                            torch.autograd.backward([g1, g2], grads)

                        res = {"forward": time_fn(fwd, device), "fwd_bwd": time_fn(fwd_bwd, device),
                               "peak_bytes": peak_memory(fwd_bwd, device)}
                    except Exception as e:  # a peer without this dtype (roi_align bf16)
                        res = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
                    results.append({**case, **res})
                    ms = ({k: round(v["median_s"] * 1e3, 4) for k, v in res.items()
                           if isinstance(v, dict)} if "error" not in res else res)
                    print(case, ms, file=sys.stderr)
    write_results(args.json, "overlap_gather", device, results)


if __name__ == "__main__":
    main()
