// kmeans_assign / kmeans_update on CUDA.
//
// assign: bounded chunks of rows times tiles of centroids go through one cuBLAS GEMM each (fp32,
// or bf16/fp16 on the tensor cores with fp32 output), and a fused warp-per-row kernel keeps each
// row's running best (score, index) across centroid tiles; the last tile also computes ||x||^2
// and writes the distance. The score buffer is bounded (256 MB), never N x K.
// update: a stable radix sort of row indices by label, per-(cluster, segment) sums of the rows
// in row order (in double, one thread per column), then the segments of each cluster added in
// order: deterministic, and bit-identical to the CPU kernel.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/device/device_radix_sort.cuh>

#include <algorithm>
#include <limits>

#include "common/cuda_utils.cuh"
#include "kmeans/kmeans_common.h"
#include "kmeans/kmeans_kernel.h"

namespace lusscore {
namespace {

using kmeans::Metric;

constexpr int64_t kScoreBufferElems = int64_t(1) << 26;  // 256 MB of fp32 scores
constexpr int64_t kMaxCentroidTile = 8192;
constexpr int kWarpsPerBlock = 8;

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}

// One warp per row: the best (score, index) over this centroid tile, merged with the running
// best of earlier tiles (kept in labels/values); on the last tile the value becomes the
// distance (adding ||x||^2) or the similarity.
template <typename x_t>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    argmin_tile_kernel(const float* __restrict__ dots, int64_t rows, int64_t cols, int64_t k0,
                       const float* __restrict__ cnorm, Metric metric, bool first, bool last,
                       const x_t* __restrict__ x, int64_t d, int64_t* __restrict__ labels,
                       float* __restrict__ values) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * kWarpsPerBlock;
  const bool vec4 = (cols % 4) == 0;
  for (int64_t r = blockIdx.x * int64_t(kWarpsPerBlock) + (threadIdx.x >> 5); r < rows;
       r += warps) {
    const float* row = dots + r * cols;
    float best = INFINITY;
    int64_t best_index = 0;
    if (vec4) {
      const float4* row4 = reinterpret_cast<const float4*>(row);
      for (int64_t q = lane; q < cols / 4; q += 32) {
        const float4 v = __ldcs(row4 + q);  // read once: do not keep in L2
        const float vs[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int t = 0; t < 4; ++t) {
          const int64_t j = 4 * q + t;
          const float s = kmeans::assign_score<float>(metric, vs[t], cnorm[k0 + j]);
          if (kmeans::assign_better<float>(s, k0 + j, best, best_index)) {
            best = s;
            best_index = k0 + j;
          }
        }
      }
    } else {
      for (int64_t j = lane; j < cols; j += 32) {
        const float s = kmeans::assign_score<float>(metric, __ldcs(row + j), cnorm[k0 + j]);
        if (kmeans::assign_better<float>(s, k0 + j, best, best_index)) {
          best = s;
          best_index = k0 + j;
        }
      }
    }
    // Warp reduction; assign_better breaks exact ties by the lower index.
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      const float other = __shfl_down_sync(0xffffffffu, best, offset);
      const int64_t other_index = __shfl_down_sync(0xffffffffu, best_index, offset);
      if (kmeans::assign_better<float>(other, other_index, best, best_index)) {
        best = other;
        best_index = other_index;
      }
    }
    best = __shfl_sync(0xffffffffu, best, 0);
    best_index = __shfl_sync(0xffffffffu, best_index, 0);
    if (!first) {
      const float prev = values[r];
      const int64_t prev_index = labels[r];
      if (kmeans::assign_better<float>(prev, prev_index, best, best_index)) {
        best = prev;
        best_index = prev_index;
      }
    }
    float xnorm = 0.f;
    if (last && metric == Metric::L2) {
      const x_t* xr = x + r * d;
      for (int64_t j = lane; j < d; j += 32) {
        const float v = to_float(xr[j]);
        xnorm = fmaf(v, v, xnorm);
      }
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) {
        xnorm += __shfl_xor_sync(0xffffffffu, xnorm, offset);
      }
    }
    if (lane == 0) {
      labels[r] = best_index;
      values[r] = last ? kmeans::assign_value<float>(metric, best, xnorm) : best;
    }
  }
}

std::tuple<at::Tensor, at::Tensor> kmeans_assign_cuda(const at::Tensor& x_in,
                                                      const at::Tensor& centroids,
                                                      c10::string_view metric_name) {
  const Metric metric = kmeans::parse_metric(metric_name);
  const c10::cuda::CUDAGuard guard(x_in.device());
  auto [labels, values] = kmeans::assign_prepare(x_in, centroids, /*allow_double=*/false);
  const int64_t n = x_in.size(0), k = centroids.size(0), d = x_in.size(1);
  if (n == 0) return {labels, values};
  const auto gemm_type = x_in.scalar_type();
  // The GEMM runs in x's dtype; the norms are those of the centroids it actually uses.
  const at::Tensor c = centroids.to(gemm_type).contiguous();
  const at::Tensor cnorm = c.to(at::kFloat).square().sum(1);
  const int64_t k_tile = std::min(k, kMaxCentroidTile);
  const int64_t n_tile = std::min(n, std::max<int64_t>(1024, kScoreBufferElems / k_tile));
  const at::Tensor buffer = at::empty({n_tile * k_tile}, x_in.options().dtype(at::kFloat));
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;

  for (int64_t r0 = 0; r0 < n; r0 += n_tile) {
    const int64_t rows = std::min(n_tile, n - r0);
    const at::Tensor xt = x_in.narrow(0, r0, rows).contiguous();
    for (int64_t k0 = 0; k0 < k; k0 += k_tile) {
      const int64_t cols = std::min(k_tile, k - k0);
      at::Tensor dots = buffer.narrow(0, 0, rows * cols).view({rows, cols});
      const at::Tensor ct = c.narrow(0, k0, cols).t();
      if (d == 0) {
        dots.zero_();
      } else if (gemm_type == at::kFloat) {
        at::mm_out(dots, xt, ct);
      } else {
        at::mm_out(dots, xt, ct, at::kFloat);  // bf16/fp16 products, fp32 accumulate and output
      }
      const int64_t blocks =
          std::max<int64_t>(1, std::min<int64_t>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock,
                                                 int64_t(sms) * 16));
      const bool first = k0 == 0, last = k0 + cols >= k;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gemm_type, "kmeans_assign_cuda", [&] {
        argmin_tile_kernel<scalar_t><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(
            dots.data_ptr<float>(), rows, cols, k0, cnorm.data_ptr<float>(), metric, first, last,
            xt.data_ptr<scalar_t>(), d, labels.data_ptr<int64_t>() + r0,
            values.data_ptr<float>() + r0);
      });
      LUSSCORE_CUDA_CHECK_LAUNCH();
    }
  }
  return {labels, values};
}

// ---------------------------------------------------------------------------------------------
// kmeans_update

__global__ void labels_to_keys_kernel(const int64_t* __restrict__ labels, int32_t* __restrict__ keys,
                                      int32_t* __restrict__ rows, int64_t n,
                                      unsigned long long* __restrict__ counts) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(blockDim.x) * gridDim.x) {
    const int32_t key = static_cast<int32_t>(labels[i]);
    keys[i] = key;
    rows[i] = static_cast<int32_t>(i);
    atomicAdd(counts + key, 1ull);  // integer counts: exact in any order
  }
}

// Block b sums segment b (of the segments of all clusters, cluster-major) for a tile of
// columns: one thread per column, rows in sorted (= row) order, in double.
template <typename x_t>
__global__ void segment_sums_kernel(const x_t* __restrict__ x, int64_t d,
                                    const int32_t* __restrict__ order,
                                    const int64_t* __restrict__ starts,      // (K+1) row offsets
                                    const int64_t* __restrict__ seg_starts,  // (K+1) segment offsets
                                    int64_t k, double* __restrict__ partial) {
  const int64_t seg = blockIdx.x;
  if (seg >= seg_starts[k]) return;
  // The cluster owning this segment: the last c with seg_starts[c] <= seg.
  int64_t lo = 0, hi = k - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (seg_starts[mid] <= seg) lo = mid; else hi = mid - 1;
  }
  const int64_t cluster = lo;
  const int64_t m0 = starts[cluster] + (seg - seg_starts[cluster]) * kmeans::kUpdateSegment;
  const int64_t m1 = min(m0 + kmeans::kUpdateSegment, starts[cluster + 1]);
  const int64_t col = blockIdx.y * int64_t(blockDim.x) + threadIdx.x;
  if (col >= d) return;
  double acc = 0.0;
  int64_t m = m0;
  constexpr int kUnroll = 8;
  for (; m + kUnroll <= m1; m += kUnroll) {
    float v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = to_float(x[int64_t(order[m + u]) * d + col]);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) acc += static_cast<double>(v[u]);
  }
  for (; m < m1; ++m) acc += static_cast<double>(to_float(x[int64_t(order[m]) * d + col]));
  partial[seg * d + col] = acc;
}

template <typename out_t>
__global__ void cluster_sums_kernel(const double* __restrict__ partial,
                                    const int64_t* __restrict__ seg_starts, int64_t k, int64_t d,
                                    out_t* __restrict__ sums) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < k * d;
       i += int64_t(blockDim.x) * gridDim.x) {
    const int64_t cluster = i / d, col = i % d;
    double total = 0.0;
    for (int64_t s = seg_starts[cluster]; s < seg_starts[cluster + 1]; ++s) {
      total += partial[s * d + col];
    }
    sums[i] = static_cast<out_t>(total);
  }
}

int end_bit_for(int64_t k) {
  int bits = 1;
  while ((int64_t(1) << bits) < k) ++bits;
  return bits;
}

std::tuple<at::Tensor, at::Tensor> kmeans_update_cuda(const at::Tensor& x_in,
                                                      const at::Tensor& labels_in, int64_t k) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  kmeans::update_check(x_in, labels_in, k, /*allow_double=*/false);
  const int64_t n = x_in.size(0), d = x_in.size(1);
  at::Tensor sums = at::zeros({k, d}, x_in.options().dtype(at::kFloat));
  at::Tensor counts = at::zeros({k}, labels_in.options());
  if (n == 0) return {sums, counts};
  TORCH_CHECK(n < (int64_t(1) << 31), "kmeans_update on CUDA takes at most 2^31 - 1 rows per "
              "call, got ", n, " (pass chunks and add the sums)");
  const at::Tensor labels = labels_in.contiguous();
  {
    const auto [lo, hi] = at::aminmax(labels);
    const int64_t lo_v = lo.item<int64_t>(), hi_v = hi.item<int64_t>();
    TORCH_CHECK(lo_v >= 0 && hi_v < k, "labels must lie in [0, k) with k = ", k, ", got values in [",
                lo_v, ", ", hi_v, "]");
  }
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto i32 = labels.options().dtype(at::kInt);
  at::Tensor keys = at::empty({n}, i32), rows = at::empty({n}, i32);
  at::Tensor keys_sorted = at::empty({n}, i32), order = at::empty({n}, i32);
  labels_to_keys_kernel<<<capped_blocks(n), kThreads, 0, stream>>>(
      labels.data_ptr<int64_t>(), keys.data_ptr<int32_t>(), rows.data_ptr<int32_t>(), n,
      reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>()));
  LUSSCORE_CUDA_CHECK_LAUNCH();

  // Stable radix sort over only the bits a label can use.
  const int end_bit = end_bit_for(k);
  size_t temp_bytes = 0;
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
      nullptr, temp_bytes, keys.data_ptr<int32_t>(), keys_sorted.data_ptr<int32_t>(),
      rows.data_ptr<int32_t>(), order.data_ptr<int32_t>(), static_cast<int>(n), 0, end_bit, stream));
  at::Tensor temp = at::empty({static_cast<int64_t>(temp_bytes)}, labels.options().dtype(at::kByte));
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
      temp.data_ptr(), temp_bytes, keys.data_ptr<int32_t>(), keys_sorted.data_ptr<int32_t>(),
      rows.data_ptr<int32_t>(), order.data_ptr<int32_t>(), static_cast<int>(n), 0, end_bit, stream));
  if (d == 0) return {sums, counts};

  // Row offsets and segment offsets per cluster, (K + 1) each with a leading 0.
  at::Tensor starts = at::zeros({k + 1}, labels.options());
  starts.narrow(0, 1, k).copy_(at::cumsum(counts, 0));
  at::Tensor seg_counts = at::floor_divide(counts + (kmeans::kUpdateSegment - 1), kmeans::kUpdateSegment);
  at::Tensor seg_starts = at::zeros({k + 1}, labels.options());
  seg_starts.narrow(0, 1, k).copy_(at::cumsum(seg_counts, 0));
  // An upper bound on the number of segments avoids a device-to-host sync.
  const int64_t max_segments = n / kmeans::kUpdateSegment + std::min(n, k);
  at::Tensor partial = at::empty({max_segments, d}, x_in.options().dtype(at::kDouble));
  const at::Tensor x = x_in.contiguous();
  constexpr int kColumnThreads = 128;
  const dim3 grid(static_cast<unsigned>(max_segments),
                  static_cast<unsigned>((d + kColumnThreads - 1) / kColumnThreads));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "kmeans_update_cuda", [&] {
    segment_sums_kernel<scalar_t><<<grid, kColumnThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), d, order.data_ptr<int32_t>(), starts.data_ptr<int64_t>(),
        seg_starts.data_ptr<int64_t>(), k, partial.data_ptr<double>());
  });
  LUSSCORE_CUDA_CHECK_LAUNCH();
  cluster_sums_kernel<float><<<capped_blocks(k * d), kThreads, 0, stream>>>(
      partial.data_ptr<double>(), seg_starts.data_ptr<int64_t>(), k, d, sums.data_ptr<float>());
  LUSSCORE_CUDA_CHECK_LAUNCH();
  return {sums, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(lusscore, CUDA, m) {
  m.impl("kmeans_assign", &kmeans_assign_cuda);
  m.impl("kmeans_update", &kmeans_update_cuda);
}

}  // namespace lusscore
