// kmeans_assign on CUDA, the buffered path (small N, D = 0, GPUs before sm_80, and the rows
// the fused path flags): bounded chunks of rows times tiles of centroids go through one cuBLAS
// GEMM each (fp32, or bf16/fp16 on the tensor cores with fp32 output), and a warp-per-row
// kernel finds the near-best candidates of each row and re-scores them exactly (the same
// canonical double arithmetic as the CPU kernel, so labels and values agree across devices).
// The score buffer is bounded (256 MB), never N x K.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

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

// The GEMM score buffer: 256 MB by default. LUSSCORE_KMEANS_SCORE_MB overrides it (a buffer
// that fits in L2 trades DRAM traffic for more, smaller GEMMs; bench_kmeans.py sweeps it).
// At least 1 MB; at most 2^31 - 1 scores, so one GEMM's output stays within cuBLAS's int range.
int64_t score_buffer_elems() {
  int64_t mb = 256;
  if (const char* env = std::getenv("LUSSCORE_KMEANS_SCORE_MB")) {
    const long long v = std::atoll(env);
    if (v > 0) mb = std::min<long long>(v, 8192);
  }
  return std::min<int64_t>(mb * (int64_t(1) << 20) / int64_t(sizeof(float)),
                           std::numeric_limits<int32_t>::max());
}
constexpr int64_t kMaxCentroidTile = 8192;

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
          const double score = canonical_score_warp(metric, xr, c32 + jj * d, d, lane);
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

}  // namespace

// Buffered path: cuBLAS GEMMs into a bounded score buffer, then argmin_tile_kernel. Writes the
// labels and values of the rows of x (contiguous, on the GPU) against the fp32 centroids c32.
void assign_buffered(const at::Tensor& x_in, const at::Tensor& c32, Metric metric,
                     const at::Tensor& labels, const at::Tensor& values) {
  const int64_t n = x_in.size(0), k = c32.size(0), d = x_in.size(1);
  if (n == 0) return;
  const auto gemm_type = x_in.scalar_type();
  // The GEMM runs in x's dtype (centroids rounded to it); the exact re-scoring uses the fp32
  // centroids, like the CPU kernel.
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
  // Rows per chunk: at least 1024 (a buffer under 1024 x k_tile scores grows to that).
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
}

}  // namespace kmeans_cuda

}  // namespace lusscore
