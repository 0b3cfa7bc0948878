#include <ATen/OpMathType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <tuple>
#include <vector>

#include "attention_pool/attention_pool_common.h"
#include "attention_pool/attention_pool_kernel.h"

namespace lusscore {
namespace {

// Rows are the B*L (b, l) maps of H*W pixels; channels-last inputs are made contiguous first.
std::tuple<at::Tensor, at::Tensor> attention_pool_cpu(const at::Tensor& x_in, const at::Tensor& a_in,
                                                      const at::Tensor& theta_in,
                                                      bool return_mean_attention) {
  attention_pool_check(x_in, a_in, theta_in, /*allow_double=*/true);
  check_device_type(x_in, at::kCPU, "x");
  const int64_t B = x_in.size(0), L = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  const int64_t hw = H * W;
  at::Tensor pooled = at::empty({B, L}, x_in.options());
  at::Tensor mean_att = return_mean_attention ? at::empty({B, H, W}, x_in.options())
                                              : at::empty({0}, x_in.options());
  // Means over nothing are NaN, as torch.mean gives them.
  if (L == 0 && mean_att.numel() > 0) mean_att.fill_(std::numeric_limits<double>::quiet_NaN());
  if (hw == 0 && pooled.numel() > 0) pooled.fill_(std::numeric_limits<double>::quiet_NaN());
  if (B * L * hw == 0) return {pooled, mean_att};
  const at::Tensor x = x_in.contiguous(), a = a_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "attention_pool_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor theta = theta_in.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* ap = a.data_ptr<scalar_t>();
    const acc_t* tp = theta.data_ptr<acc_t>();
    scalar_t* out = pooled.data_ptr<scalar_t>();
    const acc_t inv_hw = acc_t(1) / acc_t(hw);
    at::parallel_for(0, B * L, std::max<int64_t>(1, (1 << 14) / hw), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* xr = xp + r * hw;
        const scalar_t* ar = ap + r * hw;
        const acc_t th = tp[r % L];
        acc_t sum = 0;
        for (int64_t i = 0; i < hw; ++i) {
          sum += attention_sigmoid<acc_t>(static_cast<acc_t>(ar[i]) + th) * static_cast<acc_t>(xr[i]);
        }
        out[r] = static_cast<scalar_t>(sum * inv_hw);
      }
    });
    if (return_mean_attention) {
      scalar_t* mp = mean_att.data_ptr<scalar_t>();
      const acc_t inv_l = acc_t(1) / acc_t(L);
      // One image per task; channels are added in order into a per-pixel buffer.
      at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> acc(hw);
        for (int64_t b = begin; b < end; ++b) {
          std::fill(acc.begin(), acc.end(), acc_t(0));
          for (int64_t l = 0; l < L; ++l) {
            const scalar_t* ar = ap + (b * L + l) * hw;
            const acc_t th = tp[l];
            for (int64_t i = 0; i < hw; ++i) {
              acc[i] += attention_sigmoid<acc_t>(static_cast<acc_t>(ar[i]) + th);
            }
          }
          for (int64_t i = 0; i < hw; ++i) mp[b * hw + i] = static_cast<scalar_t>(acc[i] * inv_l);
        }
      });
    }
  });
  return {pooled, mean_att};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_pool_backward_cpu(
    const at::Tensor& grad_pooled_in, const c10::optional<at::Tensor>& grad_mean_in,
    const at::Tensor& x_in, const at::Tensor& a_in, const at::Tensor& theta_in, bool compute_grad_x) {
  attention_pool_check(x_in, a_in, theta_in, /*allow_double=*/true);
  check_device_type(x_in, at::kCPU, "x");
  attention_pool_backward_check(grad_pooled_in, grad_mean_in, x_in);
  const int64_t B = x_in.size(0), L = x_in.size(1), hw = x_in.size(2) * x_in.size(3);
  at::Tensor grad_x = compute_grad_x ? at::empty(x_in.sizes(), x_in.options())
                                     : at::empty({0}, x_in.options());
  at::Tensor grad_a = at::empty(a_in.sizes(), a_in.options());
  at::Tensor grad_theta = at::zeros({L}, theta_in.options());
  if (B * L * hw == 0) return {grad_x, grad_a, grad_theta};
  const at::Tensor x = x_in.contiguous(), a = a_in.contiguous();
  const at::Tensor gm = attention_pool_grad_mean(grad_mean_in, x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "attention_pool_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor theta = theta_in.to(acc_type).contiguous();
    const at::Tensor gp = grad_pooled_in.to(acc_type).contiguous();
    at::Tensor row_sums = at::empty({B, L}, x.options().dtype(acc_type));
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* ap = a.data_ptr<scalar_t>();
    const acc_t* tp = theta.data_ptr<acc_t>();
    const acc_t* gpp = gp.data_ptr<acc_t>();
    const scalar_t* gmp = gm.defined() ? gm.data_ptr<scalar_t>() : nullptr;
    scalar_t* gxp = compute_grad_x ? grad_x.data_ptr<scalar_t>() : nullptr;
    scalar_t* gap = grad_a.data_ptr<scalar_t>();
    acc_t* rs = row_sums.data_ptr<acc_t>();
    const acc_t inv_hw = acc_t(1) / acc_t(hw), inv_l = acc_t(1) / acc_t(L);
    at::parallel_for(0, B * L, std::max<int64_t>(1, (1 << 14) / hw), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t off = r * hw;
        const acc_t th = tp[r % L];
        const acc_t gh = gpp[r] * inv_hw;
        const scalar_t* gmr = gmp ? gmp + (r / L) * hw : nullptr;
        acc_t sum = 0;
        for (int64_t i = 0; i < hw; ++i) {
          const acc_t s = attention_sigmoid<acc_t>(static_cast<acc_t>(ap[off + i]) + th);
          const acc_t gmh = gmr ? static_cast<acc_t>(gmr[i]) * inv_l : acc_t(0);
          const acc_t ga = attention_grad_a<acc_t>(s, static_cast<acc_t>(xp[off + i]), gh, gmh);
          gap[off + i] = static_cast<scalar_t>(ga);
          if (gxp) gxp[off + i] = static_cast<scalar_t>(gh * s);
          sum += ga;
        }
        rs[r] = sum;
      }
    });
    // grad_theta: images added in order, so the result does not depend on the thread count.
    std::vector<acc_t> gt(L, acc_t(0));
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t l = 0; l < L; ++l) gt[l] += rs[b * L + l];
    }
    at::Tensor gt_t = at::from_blob(gt.data(), {L}, x.options().dtype(acc_type));
    grad_theta.copy_(gt_t);
  });
  return {grad_x, grad_a, grad_theta};
}

}  // namespace

TORCH_LIBRARY_IMPL(lusscore, CPU, m) {
  m.impl("attention_pool", &attention_pool_cpu);
  m.impl("attention_pool_backward", &attention_pool_backward_cpu);
}

}  // namespace lusscore
