// ATen-free math of kmeans_assign / kmeans_update, shared by the CPU and CUDA kernels.
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace lusscore {
namespace kmeans {

enum class Metric : int { L2 = 0, IP = 1 };

// Rows of x per segment of one cluster in kmeans_update: each segment is summed on its own
// (in row order), then the segment sums are added in order. Both devices use the same split,
// so their sums are bit-identical.
constexpr int64_t kUpdateSegment = 1024;

// The score that is minimised: ||c||^2 - 2 x.c for L2 (||x||^2 is the same for every
// centroid), -x.c for inner product.
template <typename T>
LUSSCORE_HOST_DEVICE inline T assign_score(Metric metric, T dot, T cnorm) {
  return metric == Metric::L2 ? cnorm - T(2) * dot : -dot;
}

// Is (score, index) better than (best, best_index)? Lower score wins; an exact tie goes to
// the lower index, whatever order the candidates are visited in.
template <typename T>
LUSSCORE_HOST_DEVICE inline bool assign_better(T score, int64_t index, T best, int64_t best_index) {
  return score < best || (score == best && index < best_index);
}

// ---- Exact refinement of near-ties.
// The fast scan scores every centroid from a GEMM (rounding depends on the GEMM: BLAS blocking,
// TF32, bf16). Every centroid whose fast score lies within the GEMM's error bound of the best is
// then re-scored canonically: in double, from exact differences, in one fixed order shared by
// both devices (32 lanes, lane l summing the columns l, l + 32, ..., then an xor butterfly).
// So equal centroids always tie exactly (lowest index wins), and both devices pick the same
// label and value whenever their candidate sets contain the true best.
constexpr int kCanonicalLanes = 32;

#ifdef __CUDA_ARCH__
LUSSCORE_HOST_DEVICE inline double canon_add(double a, double b) { return __dadd_rn(a, b); }
LUSSCORE_HOST_DEVICE inline double canon_mul(double a, double b) { return __dmul_rn(a, b); }
#else
inline double canon_add(double a, double b) { return a + b; }
inline double canon_mul(double a, double b) { return a * b; }
#endif

// Rows are widened exactly: half/bf16/float through float, double as is.
template <typename T>
LUSSCORE_HOST_DEVICE inline double widen(T v) {
  return static_cast<double>(static_cast<float>(v));
}
LUSSCORE_HOST_DEVICE inline double widen(double v) { return v; }

// Lane `lane`'s partial: squared differences (L2) or products (IP) of the columns
// lane, lane + 32, ..., in increasing order.
template <typename x_t, typename c_t>
LUSSCORE_HOST_DEVICE inline double canonical_partial(Metric metric, const x_t* x, const c_t* c,
                                                     int64_t d, int lane) {
  double acc = 0.0;
  for (int64_t j = lane; j < d; j += kCanonicalLanes) {
    const double xv = widen(x[j]);
    const double cv = widen(c[j]);
    if (metric == Metric::L2) {
      const double diff = xv - cv;
      acc = canon_add(acc, canon_mul(diff, diff));
    } else {
      acc = canon_add(acc, canon_mul(xv, cv));
    }
  }
  return acc;
}

// The canonical score to minimise of x against c, on the host: the 32 lanes advance together
// (lane l still sums the columns l, l + 32, ... in increasing order: the same partials as
// canonical_partial, with independent adds), then the butterfly.
template <typename x_t, typename c_t>
inline double canonical_score_host(Metric metric, const x_t* x, const c_t* c, int64_t d) {
  double partial[kCanonicalLanes] = {};
  for (int64_t j0 = 0; j0 < d; j0 += kCanonicalLanes) {
    const int width = d - j0 < kCanonicalLanes ? static_cast<int>(d - j0) : kCanonicalLanes;
    if (metric == Metric::L2) {
      for (int l = 0; l < width; ++l) {
        const double diff = widen(x[j0 + l]) - widen(c[j0 + l]);
        partial[l] = canon_add(partial[l], canon_mul(diff, diff));
      }
    } else {
      for (int l = 0; l < width; ++l) {
        partial[l] = canon_add(partial[l], canon_mul(widen(x[j0 + l]), widen(c[j0 + l])));
      }
    }
  }
  // The butterfly's lane 0: each round adds lane l + w to lane l for l < w (the lanes above w
  // would only repeat those sums: a + b == b + a exactly).
  for (int w = kCanonicalLanes / 2; w > 0; w >>= 1) {
    for (int l = 0; l < w; ++l) partial[l] = canon_add(partial[l], partial[l + w]);
  }
  return metric == Metric::L2 ? partial[0] : -partial[0];
}

// Bound on |fast score - exact score| for a row: the dot product x.c from a GEMM whose inputs
// are rounded with unit roundoff u_in (0 when exact) and accumulated with u_acc over d terms,
// doubled for safety, plus the fp32 rounding of ||c||^2 and of the score itself.
LUSSCORE_HOST_DEVICE inline double refine_margin(double xnorm, double cmax, int64_t d, double u_in,
                                                 double u_acc) {
  const double dot_bound = (2.0 * u_in + (static_cast<double>(d) + 4.0) * u_acc) * xnorm * cmax;
  const double norm_bound = (static_cast<double>(d) + 4.0) * u_acc * cmax * cmax;
  return 2.0 * (2.0 * dot_bound + norm_bound) + 8.0 * u_acc * (xnorm * xnorm + cmax * cmax);
}

}  // namespace kmeans
}  // namespace lusscore
