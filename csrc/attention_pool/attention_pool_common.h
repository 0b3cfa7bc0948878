// Shape/dtype/device checks of attention_pool and its backward, shared by both devices.
#pragma once

#include <string>

#include "common/checks.h"

namespace lusscore {

// The ISA level of the CPU kernel attention_pool would run now (attention_pool_cpu.cpp):
// avx512, avx2 or generic.
std::string attention_pool_cpu_kernel();

// x and a: float32/bf16/fp16 on both devices, float64 only where allow_double_x (the CPU).
// theta may have any of the four float dtypes on both devices: it is read in the accumulation
// type, and its gradient is returned in its own dtype.
inline void attention_pool_check(const at::Tensor& x, const at::Tensor& a, const at::Tensor& theta,
                                 bool allow_double_x) {
  TORCH_CHECK(allow_double_x || x.scalar_type() != at::kDouble,
              "x must have dtype in {Float, Half, BFloat16} on ", x.device(),
              ", got Double (float64 x and a are CPU-only)");
  check_dtype(x, {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}, "x");
  check_dtype(theta, {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}, "theta");
  check_dim(x, 4, "x (B, L, H, W)");
  TORCH_CHECK(a.sizes() == x.sizes(), "a must have the shape of x ", x.sizes(), ", got ",
              a.sizes());
  TORCH_CHECK(a.scalar_type() == x.scalar_type(), "a must have the dtype of x (",
              x.scalar_type(), "), got ", a.scalar_type());
  check_dim(theta, 1, "theta (L)");
  TORCH_CHECK(theta.size(0) == x.size(1), "theta must have L = ", x.size(1),
              " entries (the channels of x), got ", theta.size(0));
  check_same_device(x, a, "x", "a");
  check_same_device(x, theta, "x", "theta");
  // The CUDA kernels index a warp's segment of 32 maps with 32-bit ints: 32 * H*W < 2^31.
  // One limit for both devices.
  TORCH_CHECK(x.size(2) * x.size(3) < (int64_t(1) << 25),
              "attention_pool supports fewer than 2^25 pixels per map, got H*W = ",
              x.size(2) * x.size(3), " for x of shape ", x.sizes());
}

inline void attention_pool_backward_check(const at::Tensor& grad_pooled,
                                          const c10::optional<at::Tensor>& grad_mean_attention,
                                          const at::Tensor& x) {
  TORCH_CHECK(grad_pooled.dim() == 2 && grad_pooled.size(0) == x.size(0) &&
                  grad_pooled.size(1) == x.size(1),
              "grad_pooled must have shape (B, L) = (", x.size(0), ", ", x.size(1), "), got ",
              grad_pooled.sizes());
  check_same_device(grad_pooled, x, "grad_pooled", "x");
  if (grad_mean_attention.has_value() && grad_mean_attention->defined() &&
      grad_mean_attention->numel() > 0) {
    const auto& gm = *grad_mean_attention;
    TORCH_CHECK(gm.dim() == 3 && gm.size(0) == x.size(0) && gm.size(1) == x.size(2) &&
                    gm.size(2) == x.size(3),
                "grad_mean_attention must have shape (B, H, W) = (", x.size(0), ", ", x.size(2),
                ", ", x.size(3), "), got ", gm.sizes());
    check_same_device(gm, x, "grad_mean_attention", "x");
  }
}

// The mean-attention gradient when it takes part (defined and non-empty), else undefined.
inline at::Tensor attention_pool_grad_mean(const c10::optional<at::Tensor>& g, const at::Tensor& x) {
  if (!g.has_value() || !g->defined() || g->numel() == 0) return at::Tensor();
  return g->to(x.scalar_type()).contiguous();
}

}  // namespace lusscore
