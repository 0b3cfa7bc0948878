// ATen-free math of hp_contrastive_loss, shared by the CPU and CUDA kernels.
//
// For an anchor i and a contrast j != i (similarities already computed):
//   ag = f_i.f_j > phi_f[i] || f_i.f_j > phi_f[j]     task-agnostic hidden positive
//   sp = s_i.s_j > phi_s[i] || s_i.s_j > phi_s[j]     task-specific hidden positive
//   W_ij = ag + lam * sp
//   j is in the denominator set D_i when W_ij > 0 or when the Philox draw of (seed, i, j)
//   falls below rho.
// The draw: Philox4x32-10 (Salmon et al., SC'11) keyed by the 64-bit seed, counter
// (i, j / 4) as four 32-bit words, output word j % 4; j is kept when its top 24 bits are below
// floor(rho * 2^24). Every device and every tiling therefore draws the same set.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/host_device.h"

namespace lusscore {

struct Philox4 {
  uint32_t w[4];
};

LUSSCORE_HOST_DEVICE inline uint32_t philox_mulhilo(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
}

// Philox4x32 with 10 rounds on counter c and key (k0, k1).
LUSSCORE_HOST_DEVICE inline Philox4 philox4x32_10(Philox4 c, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = philox_mulhilo(0xD2511F53u, c.w[0], &hi0);
    const uint32_t lo1 = philox_mulhilo(0xCD9E8D57u, c.w[2], &hi1);
    c = Philox4{{hi1 ^ c.w[1] ^ k0, lo1, hi0 ^ c.w[3] ^ k1, lo0}};
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c;
}

// The four draws of contrasts 4q .. 4q+3 for anchor i (q = j / 4).
LUSSCORE_HOST_DEVICE inline Philox4 hp_draws(uint64_t seed, int64_t i, int64_t q) {
  const uint64_t ui = static_cast<uint64_t>(i), uq = static_cast<uint64_t>(q);
  return philox4x32_10(Philox4{{static_cast<uint32_t>(ui), static_cast<uint32_t>(ui >> 32),
                                static_cast<uint32_t>(uq), static_cast<uint32_t>(uq >> 32)}},
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// floor(rho * 2^24) for rho in [0, 1]: a draw w is kept when (w >> 8) < this.
inline uint32_t hp_keep_threshold(double rho) {
  return static_cast<uint32_t>(rho * 16777216.0);
}

template <typename acc_t>
LUSSCORE_HOST_DEVICE inline acc_t hp_pair_weight(acc_t sim_f, acc_t phi_f_i, acc_t phi_f_j,
                                                 acc_t sim_s, acc_t phi_s_i, acc_t phi_s_j,
                                                 acc_t lam) {
  const bool ag = sim_f > phi_f_i || sim_f > phi_f_j;
  const bool sp = sim_s > phi_s_i || sim_s > phi_s_j;
  return (ag ? acc_t(1) : acc_t(0)) + (sp ? lam : acc_t(0));
}

template <typename acc_t>
LUSSCORE_HOST_DEVICE inline acc_t hp_exp(acc_t v) {
#ifdef __CUDA_ARCH__
  return exp(v);
#else
  return std::exp(v);
#endif
}

// A log-sum-exp is carried as (M, L): the running max and the sum of exp(x - M); L = 0 for
// an empty set. Merges a partial (m, l) into (M, L).
template <typename acc_t>
LUSSCORE_HOST_DEVICE inline void hp_merge_lse(acc_t& M, acc_t& L, acc_t m, acc_t l) {
  if (l == acc_t(0)) return;
  if (L == acc_t(0)) {
    M = m, L = l;
    return;
  }
  const acc_t top = M > m ? M : m;
  L = L * hp_exp(M - top) + l * hp_exp(m - top);
  M = top;
}

// Adds one logit x to (M, L): one exp per element.
template <typename acc_t>
LUSSCORE_HOST_DEVICE inline void hp_add_lse(acc_t& M, acc_t& L, acc_t x) {
  if (L == acc_t(0)) {
    M = x, L = acc_t(1);
  } else if (x > M) {
    L = L * hp_exp(M - x) + acc_t(1), M = x;
  } else {
    L += hp_exp(x - M);
  }
}

LUSSCORE_HOST_DEVICE inline bool hp_sampled(uint32_t draw, uint32_t keep_threshold) {
  return (draw >> 8) < keep_threshold;
}

}  // namespace lusscore
