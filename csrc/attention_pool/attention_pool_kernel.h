// ATen-free math of attention_pool, shared by the CPU and CUDA kernels.
//   s = sigmoid(a + theta[l]);  pooled[b,l] = mean_hw(s * x);  mean_attention[b,hw] = mean_l(s)
//   grad_x = gp[b,l]/HW * s;  grad_a = (gp[b,l]/HW * x + gm[b,hw]/L) * s * (1 - s)
//   grad_theta[l] = sum over b, hw of grad_a.
#pragma once

#include <cmath>

#include "common/host_device.h"

namespace lusscore {

template <typename acc_t>
LUSSCORE_HOST_DEVICE inline acc_t attention_sigmoid(acc_t v) {
#ifdef __CUDA_ARCH__
  return acc_t(1) / (acc_t(1) + exp(-v));
#else
  return acc_t(1) / (acc_t(1) + std::exp(-v));
#endif
}

// grad_a of one element given the pooled-gradient scale gh = gp/HW and the mean-attention
// gradient scale gmh = gm/L of its pixel.
template <typename acc_t>
LUSSCORE_HOST_DEVICE inline acc_t attention_grad_a(acc_t s, acc_t x, acc_t gh, acc_t gmh) {
  return (gh * x + gmh) * s * (acc_t(1) - s);
}

}  // namespace lusscore
