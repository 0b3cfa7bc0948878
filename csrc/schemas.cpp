// Every op's schema, in one place. Kernels register per device in <op>/<op>_{cpu,cuda}.*;
// fake kernels and autograd live in Python beside each wrapper (lusscore/ops/).
#include <torch/library.h>

TORCH_LIBRARY(lusscore, m) {
  // label_codec: ImageNet-S label PNG pixels (..., 3|4) uint8 -> ids R + 256*G (...) int64.
  m.def("rgb_to_label(Tensor rgb) -> Tensor");
  // seg_metrics: streaming ImageNet-S metrics, in-place int64 accumulators (layout in
  // csrc/seg_metrics/seg_metrics_kernel.h); pred_lut relabels predictions before the bands.
  m.def("seg_metrics_update_(Tensor pred, Tensor gt, int num_classes, int ignore_index, "
        "float boundary_ratio, Tensor? pred_lut, Tensor(a!) region_conf, "
        "Tensor(b!) boundary_conf, Tensor(c!) pred_stats, Tensor(d!) gt_hist) -> ()");
  // munkres_assign: Munkres 1.1.4 (same tie-breaking) on a cost matrix -> column of each row.
  m.def("munkres_assign(Tensor cost) -> Tensor");
}
