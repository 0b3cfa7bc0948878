#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "hp_loss/hp_loss_common.h"

namespace lusscore {
namespace {

// The denominator draws of one anchor row, computed once per Philox block of 4 contrasts.
class RowDraws {
 public:
  RowDraws(const HpParams& p, int64_t i) : p_(p), i_(i) {}
  // Whether contrast j enters the denominator of anchor i besides the positives.
  bool sampled(int64_t j) {
    if (p_.keep == 0) return false;
    if (p_.keep >= (1u << 24)) return true;
    const int64_t q = j >> 2;
    if (q != block_) draws_ = hp_draws(p_.seed, i_, q), block_ = q;
    return hp_sampled(draws_.w[j & 3], p_.keep);
  }

 private:
  const HpParams& p_;
  int64_t i_;
  int64_t block_ = -1;
  Philox4 draws_{};
};

struct HpCpu {
  static constexpr int64_t kTile = 512;

  template <typename acc_t>
  static void forward_rows(const HpTiles& t, const acc_t* pf, const acc_t* ps, int64_t r0,
                           int64_t c0, const HpParams& p, HpStats& st) {
    const int64_t rows = t.zz.size(0), cols = t.zz.size(1);
    const acc_t *zz = t.zz.data_ptr<acc_t>(), *ff = t.ff.data_ptr<acc_t>(),
                *ss = t.ss.data_ptr<acc_t>();
    acc_t *lse_max = st.lse_max.data_ptr<acc_t>(), *lse_sum = st.lse_sum.data_ptr<acc_t>(),
          *sum_wx = st.sum_wx.data_ptr<acc_t>(), *sum_w = st.sum_w.data_ptr<acc_t>();
    const acc_t inv_tau = static_cast<acc_t>(p.inv_tau), lam = static_cast<acc_t>(p.lam);
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t ii = begin; ii < end; ++ii) {
        const int64_t i = r0 + ii;
        RowDraws draws(p, i);
        acc_t m = 0, l = 0, wx = 0, w = 0;
        const int64_t off = ii * cols;
        for (int64_t jj = 0; jj < cols; ++jj) {
          const int64_t j = c0 + jj;
          if (j == i) continue;
          const acc_t wij = hp_pair_weight<acc_t>(ff[off + jj], pf[i], pf[j], ss[off + jj], ps[i],
                                                  ps[j], lam);
          const acc_t x = zz[off + jj] * inv_tau;
          if (wij > 0) {
            wx += wij * x, w += wij;
            hp_add_lse(m, l, x);
          } else if (draws.sampled(j)) {
            hp_add_lse(m, l, x);
          }
        }
        hp_merge_lse(lse_max[i], lse_sum[i], m, l);
        sum_wx[i] += wx, sum_w[i] += w;
      }
    });
  }

  template <typename acc_t>
  static void backward_rows(const HpTiles& t, const acc_t* pf, const acc_t* ps, int64_t r0,
                            int64_t c0, const HpParams& p, const acc_t* scale,
                            const acc_t* weight, const acc_t* lse, acc_t* coef) {
    const int64_t rows = t.zz.size(0), cols = t.zz.size(1);
    const acc_t *zz = t.zz.data_ptr<acc_t>(), *ff = t.ff.data_ptr<acc_t>(),
                *ss = t.ss.data_ptr<acc_t>();
    const acc_t inv_tau = static_cast<acc_t>(p.inv_tau), lam = static_cast<acc_t>(p.lam);
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t ii = begin; ii < end; ++ii) {
        const int64_t i = r0 + ii, off = ii * cols;
        if (scale[i] == 0) {
          std::fill(coef + off, coef + off + cols, acc_t(0));
          continue;
        }
        RowDraws draws(p, i);
        const acc_t g = scale[i], g_over_w = scale[i] / weight[i], lse_i = lse[i];
        for (int64_t jj = 0; jj < cols; ++jj) {
          const int64_t j = c0 + jj;
          acc_t c = 0;
          if (j != i) {
            const acc_t wij = hp_pair_weight<acc_t>(ff[off + jj], pf[i], pf[j], ss[off + jj],
                                                    ps[i], ps[j], lam);
            if (wij > 0 || draws.sampled(j)) c = g * hp_exp(zz[off + jj] * inv_tau - lse_i);
            c -= g_over_w * wij;
          }
          coef[off + jj] = c;
        }
      }
    });
  }

  static void forward_tile(const HpTiles& t, const at::Tensor& phi_f, const at::Tensor& phi_s,
                           int64_t r0, int64_t c0, const HpParams& p, HpStats& st) {
    AT_DISPATCH_FLOATING_TYPES(t.zz.scalar_type(), "hp_contrastive_loss_cpu", [&] {
      forward_rows<scalar_t>(t, phi_f.data_ptr<scalar_t>(), phi_s.data_ptr<scalar_t>(), r0, c0,
                             p, st);
    });
  }

  static void backward_tile(const HpTiles& t, const at::Tensor& phi_f, const at::Tensor& phi_s,
                            int64_t r0, int64_t c0, const HpParams& p, const at::Tensor& scale,
                            const at::Tensor& weight, const at::Tensor& lse, at::Tensor& coef) {
    AT_DISPATCH_FLOATING_TYPES(t.zz.scalar_type(), "hp_contrastive_loss_backward_cpu", [&] {
      backward_rows<scalar_t>(t, phi_f.data_ptr<scalar_t>(), phi_s.data_ptr<scalar_t>(), r0, c0,
                              p, scale.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                              lse.data_ptr<scalar_t>(), coef.data_ptr<scalar_t>());
    });
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> hp_contrastive_loss_cpu(
    const at::Tensor& z, const at::Tensor& f, const at::Tensor& phi_f, const at::Tensor& s,
    const at::Tensor& phi_s, double tau, double rho, double lam, int64_t seed) {
  check_device_type(z, at::kCPU, "z");
  return hp_loss_forward<HpCpu>(z, f, phi_f, s, phi_s, tau, rho, lam, seed);
}

at::Tensor hp_contrastive_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& z,
                                            const at::Tensor& f, const at::Tensor& phi_f,
                                            const at::Tensor& s, const at::Tensor& phi_s,
                                            const at::Tensor& weight, const at::Tensor& lse,
                                            double tau, double rho, double lam, int64_t seed) {
  check_device_type(z, at::kCPU, "z");
  return hp_loss_backward<HpCpu>(grad_loss, z, f, phi_f, s, phi_s, weight, lse, tau, rho, lam,
                                 seed);
}

}  // namespace

TORCH_LIBRARY_IMPL(lusscore, CPU, m) {
  m.impl("hp_contrastive_loss", &hp_contrastive_loss_cpu);
  m.impl("hp_contrastive_loss_backward", &hp_contrastive_loss_backward_cpu);
}

}  // namespace lusscore
