// kmeans_assign / kmeans_update on CUDA.
//
// assign: bounded chunks of rows times tiles of centroids go through one cuBLAS GEMM each (fp32,
// or bf16/fp16 on the tensor cores with fp32 output), and a fused warp-per-row kernel finds the
// near-best candidates of each row and re-scores them exactly (the same canonical double
// arithmetic as the CPU kernel, so labels and values agree across devices). The score buffer is
// bounded (256 MB), never N x K.
// update: a stable radix sort of row indices by label, per-(cluster, segment) sums of the rows
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

#include "common/cuda_utils.cuh"
#include "kmeans/kmeans_common.h"
#include "kmeans/kmeans_kernel.h"

namespace lusscore {
namespace {

using kmeans::Metric;

// The GEMM score buffer: 256 MB by default. LUSSCORE_KMEANS_SCORE_MB overrides it (a buffer
// that fits in L2 trades DRAM traffic for more, smaller GEMMs; bench_kmeans.py sweeps it).
int64_t score_buffer_elems() {
  int64_t mb = 256;
  if (const char* env = std::getenv("LUSSCORE_KMEANS_SCORE_MB")) {
    const long long v = std::atoll(env);
    if (v > 0) mb = v;
  }
  return mb * (int64_t(1) << 20) / int64_t(sizeof(float));
}
constexpr int64_t kMaxCentroidTile = 8192;
constexpr int kWarpsPerBlock = 8;

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}

__device__ __forceinline__ float warp_min(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Per-row running state across centroid tiles of one row chunk.
struct RowState {
  double* margin;  // bound on |fast score - exact score|
  float* fast;     // best fast score so far
  double* exact;   // best canonical score so far (the label is its index)
};

// One warp per row. Pass 1 finds the tile's best fast score (from the GEMM). Pass 2 re-scores,
// canonically in double (kmeans_kernel.h), every centroid whose fast score is within the
// margin of the best, keeping the lowest index among exact ties. On the last tile the label
// and the value (exact squared distance or similarity) are written.
template <typename x_t>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    argmin_tile_kernel(const float* __restrict__ dots, int64_t rows, int64_t cols, int64_t k0,
                       const float* __restrict__ cnorm, const float* __restrict__ c32,
                       const double* __restrict__ cmax, double u_in, Metric metric, bool first,
                       bool last, const x_t* __restrict__ x, int64_t d, RowState state,
                       int64_t* __restrict__ labels, float* __restrict__ values) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * kWarpsPerBlock;
  const bool vec4 = (cols % 4) == 0;
  for (int64_t r = blockIdx.x * int64_t(kWarpsPerBlock) + (threadIdx.x >> 5); r < rows;
       r += warps) {
    const float* row = dots + r * cols;
    const x_t* xr = x + r * d;
    double margin, exact;
    float fast;
    int64_t best_index;
    if (first) {
      double sq = 0.0;
      for (int64_t j = lane; j < d; j += 32) {
        const double v = static_cast<double>(to_float(xr[j]));
        sq += v * v;
      }
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, offset);
      margin = kmeans::refine_margin(sqrt(sq), *cmax, d, u_in, 0x1p-24);
      fast = INFINITY;
      exact = INFINITY;
      best_index = 0;
    } else {
      margin = state.margin[r];
      fast = state.fast[r];
      exact = state.exact[r];
      best_index = labels[r];
    }
    // Pass 1: the tile's best fast score.
    float tile_min = INFINITY;
    if (vec4) {
      const float4* row4 = reinterpret_cast<const float4*>(row);
      for (int64_t q = lane; q < cols / 4; q += 32) {
        const float4 v = row4[q];
        tile_min = fminf(tile_min, kmeans::assign_score<float>(metric, v.x, cnorm[k0 + 4 * q]));
        tile_min = fminf(tile_min, kmeans::assign_score<float>(metric, v.y, cnorm[k0 + 4 * q + 1]));
        tile_min = fminf(tile_min, kmeans::assign_score<float>(metric, v.z, cnorm[k0 + 4 * q + 2]));
        tile_min = fminf(tile_min, kmeans::assign_score<float>(metric, v.w, cnorm[k0 + 4 * q + 3]));
      }
    } else {
      for (int64_t j = lane; j < cols; j += 32) {
        tile_min = fminf(tile_min, kmeans::assign_score<float>(metric, row[j], cnorm[k0 + j]));
      }
    }
    tile_min = warp_min(tile_min);
    // Pass 2 (the row is still in L1): exact re-scoring of the candidates, warp-uniform.
    if (static_cast<double>(tile_min) <= static_cast<double>(fast) + margin) {
      const double threshold = fmin(static_cast<double>(tile_min), static_cast<double>(fast)) + margin;
      fast = fminf(fast, tile_min);
      for (int64_t base = 0; base < cols; base += 32) {
        const int64_t j = base + lane;
        const bool candidate =
            j < cols &&
            static_cast<double>(kmeans::assign_score<float>(metric, row[j], cnorm[k0 + j])) <= threshold;
        unsigned mask = __ballot_sync(0xffffffffu, candidate);
        while (mask) {
          const int bit = __ffs(mask) - 1;
          mask &= mask - 1;
          const int64_t jj = k0 + base + bit;
          double p = kmeans::canonical_partial(metric, xr, c32 + jj * d, d, lane);
#pragma unroll
          for (int offset = 16; offset > 0; offset >>= 1) {
            p = __dadd_rn(p, __shfl_xor_sync(0xffffffffu, p, offset));
          }
          const double score = metric == Metric::L2 ? p : -p;
          if (kmeans::assign_better<double>(score, jj, exact, best_index)) {
            exact = score;
            best_index = jj;
          }
        }
      }
    }
    if (lane == 0) {
      labels[r] = best_index;
      if (last) {
        values[r] = static_cast<float>(metric == Metric::IP ? -exact : exact);
      } else {
        state.exact[r] = exact;
        state.fast[r] = fast;
        if (first) state.margin[r] = margin;
      }
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
  // The GEMM runs in x's dtype (centroids rounded to it); the exact re-scoring uses the fp32
  // centroids, like the CPU kernel.
  const at::Tensor c32 = centroids.to(at::kFloat).contiguous();
  const at::Tensor c = c32.to(gemm_type).contiguous();
  const at::Tensor cnorm = c32.square().sum(1);
  const at::Tensor cmax = cnorm.max().to(at::kDouble).sqrt();
  // Unit roundoff of the GEMM's input rounding: bf16 / fp16 centroids, or TF32 (or lower)
  // when fp32 matmuls may use it; exact fp32 otherwise.
  double u_in = 0.0;
  if (gemm_type == at::kBFloat16) {
    u_in = 0x1p-8;
  } else if (gemm_type == at::kHalf) {
    u_in = 0x1p-11;
  } else if (at::globalContext().allowTF32CuBLAS() ||
             at::globalContext().float32MatmulPrecision() != at::Float32MatmulPrecision::HIGHEST) {
    u_in = 0x1p-8;
  }
  const int64_t k_tile = std::min(k, kMaxCentroidTile);
  const int64_t n_tile = std::min(n, std::max<int64_t>(1024, score_buffer_elems() / k_tile));
  const at::Tensor buffer = at::empty({n_tile * k_tile}, x_in.options().dtype(at::kFloat));
  const bool multi_tile = k_tile < k;
  at::Tensor margin, fast, exact;
  RowState state{nullptr, nullptr, nullptr};
  if (multi_tile) {
    margin = at::empty({n_tile}, x_in.options().dtype(at::kDouble));
    exact = at::empty({n_tile}, x_in.options().dtype(at::kDouble));
    fast = at::empty({n_tile}, x_in.options().dtype(at::kFloat));
    state = RowState{margin.data_ptr<double>(), fast.data_ptr<float>(), exact.data_ptr<double>()};
  }
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
            dots.data_ptr<float>(), rows, cols, k0, cnorm.data_ptr<float>(), c32.data_ptr<float>(),
            cmax.data_ptr<double>(), u_in, metric, first, last, xt.data_ptr<scalar_t>(), d, state,
            labels.data_ptr<int64_t>() + r0, values.data_ptr<float>() + r0);
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
