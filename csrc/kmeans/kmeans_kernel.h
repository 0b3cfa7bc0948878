// ATen-free math of kmeans_assign / kmeans_update, shared by the CPU and CUDA kernels.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define LUSSCORE_HOST_DEVICE __host__ __device__
#else
#define LUSSCORE_HOST_DEVICE
#endif

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

// What the op returns per row: squared distance (never below 0) or similarity.
template <typename T>
LUSSCORE_HOST_DEVICE inline T assign_value(Metric metric, T best, T xnorm) {
  if (metric == Metric::IP) return -best;
  const T d = xnorm + best;
  return d > T(0) ? d : T(0);
}

}  // namespace kmeans
}  // namespace lusscore
