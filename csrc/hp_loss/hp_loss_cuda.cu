#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/cuda_utils.cuh"
#include "hp_loss/hp_loss_common.h"

namespace lusscore {
namespace {

constexpr int kHpThreads = 256;  // a power of two: the block reduction halves it

// Whether contrast j (k-th of its Philox block) of anchor i enters the denominator besides
// the positives; the block's draws are computed on first use.
__device__ inline bool hp_sampled_lazy(const HpParams& p, int64_t i, int64_t j, int k,
                                       Philox4& draws, bool& have) {
  if (p.keep == 0) return false;
  if (p.keep >= (1u << 24)) return true;
  if (!have) draws = hp_draws(p.seed, i, j >> 2), have = true;
  return hp_sampled(draws.w[k], p.keep);
}

// One block per anchor row of the tile; each thread takes whole Philox blocks of 4 contrasts
// (tiles start at multiples of 4), then the block merges its partial sums into the row's
// running accumulators (rows are independent; tiles of one row run one launch after another).
template <typename acc_t>
__global__ void __launch_bounds__(kHpThreads)
hp_forward_tile_kernel(const acc_t* __restrict__ zz, const acc_t* __restrict__ ff,
                       const acc_t* __restrict__ ss, const acc_t* __restrict__ pf,
                       const acc_t* __restrict__ ps, int64_t r0, int64_t c0, int64_t cols,
                       HpParams p, acc_t* __restrict__ lse_max, acc_t* __restrict__ lse_sum,
                       acc_t* __restrict__ sum_wx, acc_t* __restrict__ sum_w) {
  const int64_t ii = blockIdx.x, i = r0 + ii, off = ii * cols;
  const acc_t inv_tau = static_cast<acc_t>(p.inv_tau), lam = static_cast<acc_t>(p.lam);
  const acc_t pf_i = pf[i], ps_i = ps[i];
  acc_t m = 0, l = 0, wx = 0, w = 0;
  for (int64_t jj0 = 4 * int64_t(threadIdx.x); jj0 < cols; jj0 += 4 * int64_t(blockDim.x)) {
    Philox4 draws;
    bool have = false;
    for (int k = 0; k < 4 && jj0 + k < cols; ++k) {
      const int64_t jj = jj0 + k, j = c0 + jj;
      if (j == i) continue;
      const acc_t wij = hp_pair_weight<acc_t>(ff[off + jj], pf_i, pf[j], ss[off + jj], ps_i,
                                              ps[j], lam);
      const acc_t x = zz[off + jj] * inv_tau;
      if (wij > 0) {
        wx += wij * x, w += wij;
        hp_add_lse(m, l, x);
      } else if (hp_sampled_lazy(p, i, j, k, draws, have)) {
        hp_add_lse(m, l, x);
      }
    }
  }
  __shared__ acc_t s_m[kHpThreads], s_l[kHpThreads], s_wx[kHpThreads], s_w[kHpThreads];
  const int t = threadIdx.x;
  s_m[t] = m, s_l[t] = l, s_wx[t] = wx, s_w[t] = w;
  __syncthreads();
  for (int half = kHpThreads / 2; half > 0; half >>= 1) {
    if (t < half) {
      hp_merge_lse(s_m[t], s_l[t], s_m[t + half], s_l[t + half]);
      s_wx[t] += s_wx[t + half], s_w[t] += s_w[t + half];
    }
    __syncthreads();
  }
  if (t == 0) {
    hp_merge_lse(lse_max[i], lse_sum[i], s_m[0], s_l[0]);
    sum_wx[i] += s_wx[0], sum_w[i] += s_w[0];
  }
}

// coef[ii, jj] = scale_i (p_ij [j in D_i] - W_ij / w_i), 0 on the diagonal; one thread per
// Philox block of 4 contrasts.
template <typename acc_t>
__global__ void hp_backward_tile_kernel(const acc_t* __restrict__ zz, const acc_t* __restrict__ ff,
                                        const acc_t* __restrict__ ss, const acc_t* __restrict__ pf,
                                        const acc_t* __restrict__ ps, int64_t r0, int64_t c0,
                                        int64_t rows, int64_t cols, HpParams p,
                                        const acc_t* __restrict__ scale,
                                        const acc_t* __restrict__ weight,
                                        const acc_t* __restrict__ lse, acc_t* __restrict__ coef) {
  const int64_t groups = (cols + 3) / 4;
  const acc_t inv_tau = static_cast<acc_t>(p.inv_tau), lam = static_cast<acc_t>(p.lam);
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < rows * groups;
       idx += int64_t(blockDim.x) * gridDim.x) {
    const int64_t ii = idx / groups, jj0 = 4 * (idx % groups), i = r0 + ii, off = ii * cols;
    const acc_t g = scale[i];
    const acc_t g_over_w = g == acc_t(0) ? acc_t(0) : g / weight[i];
    Philox4 draws;
    bool have = false;
    for (int k = 0; k < 4 && jj0 + k < cols; ++k) {
      const int64_t jj = jj0 + k, j = c0 + jj;
      acc_t c = 0;
      if (j != i && g != acc_t(0)) {
        const acc_t wij = hp_pair_weight<acc_t>(ff[off + jj], pf[i], pf[j], ss[off + jj], ps[i],
                                                ps[j], lam);
        if (wij > 0 || hp_sampled_lazy(p, i, j, k, draws, have)) {
          c = g * hp_exp(zz[off + jj] * inv_tau - lse[i]);
        }
        c -= g_over_w * wij;
      }
      coef[off + jj] = c;
    }
  }
}

struct HpCuda {
  static constexpr int64_t kTile = 4096;

  static void forward_tile(const HpTiles& t, const at::Tensor& phi_f, const at::Tensor& phi_s,
                           int64_t r0, int64_t c0, const HpParams& p, HpStats& st) {
    const int64_t rows = t.zz.size(0), cols = t.zz.size(1);
    AT_DISPATCH_FLOATING_TYPES(t.zz.scalar_type(), "hp_contrastive_loss_cuda", [&] {
      hp_forward_tile_kernel<scalar_t>
          <<<rows, kHpThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              t.zz.data_ptr<scalar_t>(), t.ff.data_ptr<scalar_t>(), t.ss.data_ptr<scalar_t>(),
              phi_f.data_ptr<scalar_t>(), phi_s.data_ptr<scalar_t>(), r0, c0, cols, p,
              st.lse_max.data_ptr<scalar_t>(), st.lse_sum.data_ptr<scalar_t>(),
              st.sum_wx.data_ptr<scalar_t>(), st.sum_w.data_ptr<scalar_t>());
      LUSSCORE_CUDA_CHECK_LAUNCH();
    });
  }

  static void backward_tile(const HpTiles& t, const at::Tensor& phi_f, const at::Tensor& phi_s,
                            int64_t r0, int64_t c0, const HpParams& p, const at::Tensor& scale,
                            const at::Tensor& weight, const at::Tensor& lse, at::Tensor& coef) {
    const int64_t rows = t.zz.size(0), cols = t.zz.size(1);
    const int64_t work = rows * ((cols + 3) / 4);
    AT_DISPATCH_FLOATING_TYPES(t.zz.scalar_type(), "hp_contrastive_loss_backward_cuda", [&] {
      hp_backward_tile_kernel<scalar_t>
          <<<capped_blocks(work), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              t.zz.data_ptr<scalar_t>(), t.ff.data_ptr<scalar_t>(), t.ss.data_ptr<scalar_t>(),
              phi_f.data_ptr<scalar_t>(), phi_s.data_ptr<scalar_t>(), r0, c0, rows, cols, p,
              scale.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(),
              coef.data_ptr<scalar_t>());
      LUSSCORE_CUDA_CHECK_LAUNCH();
    });
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> hp_contrastive_loss_cuda(
    const at::Tensor& z, const at::Tensor& f, const at::Tensor& phi_f, const at::Tensor& s,
    const at::Tensor& phi_s, double tau, double rho, double lam, int64_t seed) {
  check_device_type(z, at::kCUDA, "z");
  const c10::cuda::CUDAGuard guard(z.device());
  return hp_loss_forward<HpCuda>(z, f, phi_f, s, phi_s, tau, rho, lam, seed);
}

at::Tensor hp_contrastive_loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& z,
                                             const at::Tensor& f, const at::Tensor& phi_f,
                                             const at::Tensor& s, const at::Tensor& phi_s,
                                             const at::Tensor& weight, const at::Tensor& lse,
                                             double tau, double rho, double lam, int64_t seed) {
  check_device_type(z, at::kCUDA, "z");
  const c10::cuda::CUDAGuard guard(z.device());
  return hp_loss_backward<HpCuda>(grad_loss, z, f, phi_f, s, phi_s, weight, lse, tau, rho, lam,
                                  seed);
}

}  // namespace

TORCH_LIBRARY_IMPL(lusscore, CUDA, m) {
  m.impl("hp_contrastive_loss", &hp_contrastive_loss_cuda);
  m.impl("hp_contrastive_loss_backward", &hp_contrastive_loss_backward_cuda);
}

}  // namespace lusscore
