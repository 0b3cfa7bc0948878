// The CUDA k-means kernels' shared pieces: the canonical (exact, device-independent) warp
// score, warp reductions, and the entry points of the two assign paths (assign_fused.cu,
// assign_buffered.cu); kmeans_update is in update.cu.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "kmeans/kmeans_common.h"
#include "kmeans/kmeans_kernel.h"

namespace lusscore {
namespace kmeans_cuda {

using kmeans::Metric;

constexpr int kWarpsPerBlock = 8;

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}

// The canonical (exact, device-independent) score of one row against centroid c, computed by
// a whole warp: lane l's partial (kmeans_kernel.h), then the fixed xor butterfly.
template <typename T>
__device__ __forceinline__ double canonical_score_warp(Metric metric, const T* xr, const float* c,
                                                       int64_t d, int lane) {
  double p = kmeans::canonical_partial(metric, xr, c, d, lane);
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    p = __dadd_rn(p, __shfl_xor_sync(0xffffffffu, p, offset));
  }
  return metric == Metric::L2 ? p : -p;
}

__device__ __forceinline__ float warp_min(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}


// Buffered path (assign_buffered.cu): the rows of x (contiguous, on the GPU) against the fp32
// centroids c32, through cuBLAS GEMMs into a bounded score buffer.
void assign_buffered(const at::Tensor& x_in, const at::Tensor& c32, Metric metric,
                     const at::Tensor& labels, const at::Tensor& values);

}  // namespace kmeans_cuda
}  // namespace lusscore
