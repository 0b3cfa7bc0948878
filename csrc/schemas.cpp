// Every op's schema, in one place. Kernels register per device in <op>/<op>_{cpu,cuda}.*;
// fake kernels and autograd live in Python beside each wrapper (lusscore/ops/).
#include <torch/library.h>

TORCH_LIBRARY(lusscore, m) {
  // label_codec: ImageNet-S label PNG pixels (..., 3|4) uint8 -> ids R + 256*G (...) int64.
  m.def("rgb_to_label(Tensor rgb) -> Tensor");
  // attention_pool: pooled (B,L) = mean_hw(sigmoid(a + theta) * x) for x, a (B,L,H,W), theta (L);
  // mean_attention (B,H,W) = mean_l sigmoid(a + theta) when requested (else an empty tensor).
  m.def("attention_pool(Tensor x, Tensor a, Tensor theta, bool return_mean_attention) -> "
        "(Tensor pooled, Tensor mean_attention)");
  // Its backward: (grad_x (empty unless compute_grad_x), grad_a, grad_theta), sigmoid recomputed.
  m.def("attention_pool_backward(Tensor grad_pooled, Tensor? grad_mean_attention, Tensor x, "
        "Tensor a, Tensor theta, bool compute_grad_x) -> (Tensor, Tensor, Tensor)");
}
