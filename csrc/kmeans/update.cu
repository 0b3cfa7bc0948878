// kmeans_update on CUDA.
//
// A stable radix sort of row indices by label, per-(cluster, segment) sums of the rows
// in row order (in double, one thread per column), then the segments of each cluster added in
// order: deterministic, and bit-identical to the CPU kernel.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/device/device_radix_sort.cuh>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <string>
#include <type_traits>

#include "common/cuda_utils.cuh"
#include "kmeans/kmeans_cuda.cuh"

namespace lusscore {
namespace kmeans_cuda {
namespace {

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

// Block (b, y) sums segment b (of the segments of all clusters, cluster-major) over the columns
// y * blockDim.x + threadIdx.x, stepping by gridDim.y * blockDim.x (grid.y is capped at 65535,
// so any D works): one thread per column at a time, rows in sorted (= row) order, in double.
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
  for (int64_t col = blockIdx.y * int64_t(blockDim.x) + threadIdx.x; col < d;
       col += int64_t(gridDim.y) * blockDim.x) {
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
  // An upper bound on the number of segments avoids a device-to-host sync. Every segment holds
  // a row, so it is at most n < 2^31: within grid.x's limit (2^31 - 1).
  const int64_t max_segments = std::min(n, n / kmeans::kUpdateSegment + std::min(n, k));
  at::Tensor partial = at::empty({max_segments, d}, x_in.options().dtype(at::kDouble));
  const at::Tensor x = x_in.contiguous();
  constexpr int kColumnThreads = 128;
  constexpr int64_t kMaxGridY = 65535;  // the kernel loops over the columns past grid.y's reach
  const dim3 grid(static_cast<unsigned>(max_segments),
                  static_cast<unsigned>(std::min(kMaxGridY, (d + kColumnThreads - 1) / kColumnThreads)));
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
}  // namespace kmeans_cuda

TORCH_LIBRARY_IMPL(lusscore, CUDA, m) { m.impl("kmeans_update", &kmeans_cuda::kmeans_update_cuda); }

}  // namespace lusscore
