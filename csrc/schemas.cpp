// Every op's schema, in one place. Kernels register per device in <op>/<op>_{cpu,cuda}.*;
// fake kernels and autograd live in Python beside each wrapper (lusscore/ops/).
#include <torch/library.h>

TORCH_LIBRARY(lusscore, m) {
  // label_codec: ImageNet-S label PNG pixels (..., 3|4) uint8 -> ids R + 256*G (...) int64.
  m.def("rgb_to_label(Tensor rgb) -> Tensor");
  // kmeans: fused nearest-centroid search (labels int64, squared distance or similarity) and
  // deterministic per-cluster sums (K, D) fp32 + counts (K) int64.
  m.def("kmeans_assign(Tensor x, Tensor centroids, str metric) -> (Tensor, Tensor)");
  m.def("kmeans_update(Tensor x, Tensor labels, int k) -> (Tensor, Tensor)");
}
