// Checks and the tiled driver of hp_contrastive_loss, shared by both devices.
//
// The driver walks the N x N pairs in T x T tiles (anchors x contrasts). Per tile it forms the
// three similarity tiles z.z, f.f and s.s with one matrix product each (BLAS / cuBLAS), and the
// device's epilogue turns them into the hidden-positive weights, the sampled denominator and
// the per-anchor accumulators in one pass: memory O(N * d + T^2), never N x N. The backward
// recomputes the tiles and forms the gradient coefficients C (T x T), then
// grad_z[rows] += C z[cols] and grad_z[cols] += C^T z[rows].
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

#include "common/checks.h"
#include "hp_loss/hp_loss_kernel.h"

namespace lusscore {

struct HpParams {
  double inv_tau;
  double lam;
  uint32_t keep;  // hp_keep_threshold(rho)
  uint64_t seed;
};

// The per-anchor accumulators of the forward: log-sum-exp (max, sum) over D_i, sum_j W_ij x_ij
// and sum_j W_ij, with x_ij = z_i.z_j / tau.
struct HpStats {
  at::Tensor lse_max, lse_sum, sum_wx, sum_w;
};

inline void hp_loss_check(const at::Tensor& z, const at::Tensor& f, const at::Tensor& phi_f,
                          const at::Tensor& s, const at::Tensor& phi_s, double tau, double rho,
                          double lam) {
  const std::initializer_list<at::ScalarType> floats = {at::kFloat, at::kDouble, at::kHalf,
                                                        at::kBFloat16};
  check_dim(z, 2, "z (N, d)");
  check_dim(f, 2, "f (N, d_f)");
  check_dim(s, 2, "s (N, d_s)");
  check_dim(phi_f, 1, "phi_f (N)");
  check_dim(phi_s, 1, "phi_s (N)");
  check_dtype(z, floats, "z");
  check_dtype(f, floats, "f");
  check_dtype(s, floats, "s");
  check_dtype(phi_f, floats, "phi_f");
  check_dtype(phi_s, floats, "phi_s");
  const int64_t n = z.size(0);
  TORCH_CHECK(f.size(0) == n && s.size(0) == n && phi_f.size(0) == n && phi_s.size(0) == n,
              "z, f, s, phi_f and phi_s must have the same number of rows N, got z ", z.sizes(),
              ", f ", f.sizes(), ", phi_f ", phi_f.sizes(), ", s ", s.sizes(), ", phi_s ",
              phi_s.sizes());
  check_same_device(z, f, "z", "f");
  check_same_device(z, s, "z", "s");
  check_same_device(z, phi_f, "z", "phi_f");
  check_same_device(z, phi_s, "z", "phi_s");
  TORCH_CHECK(std::isfinite(tau) && tau > 0, "tau must be a positive number, got ", tau);
  TORCH_CHECK(rho >= 0 && rho <= 1, "rho must lie in [0, 1], got ", rho);
  TORCH_CHECK(std::isfinite(lam) && lam >= 0, "lam must be a finite number >= 0, got ", lam);
}

inline HpParams hp_params(double tau, double rho, double lam, int64_t seed) {
  return HpParams{1.0 / tau, lam, hp_keep_threshold(rho), static_cast<uint64_t>(seed)};
}

// fp64 inputs are computed in fp64 (gradcheck); every other dtype in fp32.
inline at::ScalarType hp_acc_type(const at::Tensor& z) {
  return z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The tile products of rows [r0, r0 + rows) x contrasts [c0, c0 + cols), written into the
// front of the three T*T buffers and returned as contiguous (rows, cols) views.
struct HpTiles {
  at::Tensor zz, ff, ss;
};

inline HpTiles hp_tiles(const at::Tensor& z, const at::Tensor& f, const at::Tensor& s,
                        at::Tensor& buf_z, at::Tensor& buf_f, at::Tensor& buf_s, int64_t r0,
                        int64_t rows, int64_t c0, int64_t cols) {
  auto product = [&](const at::Tensor& x, at::Tensor& buf) {
    at::Tensor out = buf.narrow(0, 0, rows * cols).view({rows, cols});
    at::mm_out(out, x.narrow(0, r0, rows), x.narrow(0, c0, cols).t());
    return out;
  };
  return HpTiles{product(z, buf_z), product(f, buf_f), product(s, buf_s)};
}

// Device is a struct with
//   static void forward_tile(const HpTiles&, const at::Tensor& phi_f, const at::Tensor& phi_s,
//                            int64_t r0, int64_t c0, const HpParams&, HpStats&);
//   static void backward_tile(const HpTiles&, const at::Tensor& phi_f, const at::Tensor& phi_s,
//                             int64_t r0, int64_t c0, const HpParams&, const at::Tensor& scale,
//                             const at::Tensor& weight, const at::Tensor& lse, at::Tensor& coef);
// and a tile edge kTile (a multiple of 4, so that tiles start on Philox blocks).
template <typename Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor> hp_loss_forward(
    const at::Tensor& z_in, const at::Tensor& f_in, const at::Tensor& phi_f_in,
    const at::Tensor& s_in, const at::Tensor& phi_s_in, double tau, double rho, double lam,
    int64_t seed) {
  hp_loss_check(z_in, f_in, phi_f_in, s_in, phi_s_in, tau, rho, lam);
  const auto acc = hp_acc_type(z_in);
  const auto opts = z_in.options().dtype(acc);
  const int64_t n = z_in.size(0);
  if (n == 0) return {at::zeros({0}, opts), at::zeros({0}, opts), at::zeros({0}, opts)};
  const at::Tensor z = z_in.to(acc).contiguous(), f = f_in.to(acc).contiguous(),
                   s = s_in.to(acc).contiguous(), phi_f = phi_f_in.to(acc).contiguous(),
                   phi_s = phi_s_in.to(acc).contiguous();
  const HpParams params = hp_params(tau, rho, lam, seed);
  HpStats stats{at::zeros({n}, opts), at::zeros({n}, opts), at::zeros({n}, opts),
                at::zeros({n}, opts)};
  const int64_t t = std::min<int64_t>(Device::kTile, n);
  at::Tensor buf_z = at::empty({t * t}, opts), buf_f = at::empty({t * t}, opts),
             buf_s = at::empty({t * t}, opts);
  for (int64_t r0 = 0; r0 < n; r0 += t) {
    const int64_t rows = std::min(t, n - r0);
    for (int64_t c0 = 0; c0 < n; c0 += t) {
      const int64_t cols = std::min(t, n - c0);
      const HpTiles tiles = hp_tiles(z, f, s, buf_z, buf_f, buf_s, r0, rows, c0, cols);
      Device::forward_tile(tiles, phi_f, phi_s, r0, c0, params, stats);
    }
  }
  const at::Tensor& weight = stats.sum_w;
  const at::Tensor positive = weight > 0;
  // An anchor without positives has loss 0 (and lse 0, so that nothing downstream is inf).
  const at::Tensor lse = at::where(positive, stats.lse_max + at::log(stats.lse_sum),
                                   at::zeros({}, opts));
  const at::Tensor loss = at::where(positive, lse - stats.sum_wx / weight.clamp_min(1e-30),
                                    at::zeros({}, opts));
  return {loss, weight, lse};
}

template <typename Device>
at::Tensor hp_loss_backward(const at::Tensor& grad_loss, const at::Tensor& z_in,
                            const at::Tensor& f_in, const at::Tensor& phi_f_in,
                            const at::Tensor& s_in, const at::Tensor& phi_s_in,
                            const at::Tensor& weight_in, const at::Tensor& lse_in, double tau,
                            double rho, double lam, int64_t seed) {
  hp_loss_check(z_in, f_in, phi_f_in, s_in, phi_s_in, tau, rho, lam);
  const int64_t n = z_in.size(0);
  for (const auto* t : {&grad_loss, &weight_in, &lse_in}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == n,
                "grad_loss, weight and lse must have shape (N) = (", n, "), got ", t->sizes());
    check_same_device(*t, z_in, "grad_loss, weight and lse", "z");
  }
  const auto acc = hp_acc_type(z_in);
  const auto opts = z_in.options().dtype(acc);
  at::Tensor grad = at::zeros({n, z_in.size(1)}, opts);
  if (n == 0 || z_in.size(1) == 0) return grad.to(z_in.scalar_type());
  const at::Tensor z = z_in.to(acc).contiguous(), f = f_in.to(acc).contiguous(),
                   s = s_in.to(acc).contiguous(), phi_f = phi_f_in.to(acc).contiguous(),
                   phi_s = phi_s_in.to(acc).contiguous();
  const at::Tensor weight = weight_in.to(acc).contiguous(), lse = lse_in.to(acc).contiguous();
  // d loss_i / d x_ij = p_ij [j in D_i] - W_ij / w_i (0 for anchors without positives); the
  // epilogue multiplies by scale_i = grad_loss_i / tau.
  const at::Tensor scale = at::where(weight > 0, grad_loss.to(acc) / tau, at::zeros({}, opts))
                               .contiguous();
  const HpParams params = hp_params(tau, rho, lam, seed);
  const int64_t t = std::min<int64_t>(Device::kTile, n);
  at::Tensor buf_z = at::empty({t * t}, opts), buf_f = at::empty({t * t}, opts),
             buf_s = at::empty({t * t}, opts), buf_c = at::empty({t * t}, opts);
  for (int64_t r0 = 0; r0 < n; r0 += t) {
    const int64_t rows = std::min(t, n - r0);
    for (int64_t c0 = 0; c0 < n; c0 += t) {
      const int64_t cols = std::min(t, n - c0);
      const HpTiles tiles = hp_tiles(z, f, s, buf_z, buf_f, buf_s, r0, rows, c0, cols);
      at::Tensor coef = buf_c.narrow(0, 0, rows * cols).view({rows, cols});
      Device::backward_tile(tiles, phi_f, phi_s, r0, c0, params, scale, weight, lse, coef);
      grad.narrow(0, r0, rows).addmm_(coef, z.narrow(0, c0, cols));
      grad.narrow(0, c0, cols).addmm_(coef.t(), z.narrow(0, r0, rows));
    }
  }
  return grad.to(z_in.scalar_type());
}

}  // namespace lusscore
