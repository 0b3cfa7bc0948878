// kmeans_assign / kmeans_update on CUDA.
//
// assign, fused path (the default for large N): one kernel per call. Each block takes 128 rows
// of x and streams every centroid through shared memory in 128 x 128-byte tiles (cp.async,
// three stages), multiplies on the tensor cores with mma.sync (TF32 for fp32 rows, bf16/fp16
// natively; fp32 accumulation) and, in registers, turns the dot products into scores and keeps
// each row's best and second-best fast score: no score buffer. A row whose second-best is
// farther than the proven error bound (refine_margin) from its best has one candidate, which
// is re-scored canonically for the exact value. The other rows are flagged, gathered, and run
// through the same kernel again in its collect mode, which lists every centroid within the
// row's threshold (at most 16; more: the buffered path below); a warp per row then re-scores
// the list canonically.
// assign, buffered path (small N, D = 0, GPUs before sm_80, and the flagged rows): bounded
// chunks of rows times tiles of centroids go through one cuBLAS GEMM each (fp32, or bf16/fp16
// on the tensor cores with fp32 output), and a warp-per-row kernel finds the near-best
// candidates of each row and re-scores them exactly (the same canonical double arithmetic as
// the CPU kernel, so labels and values agree across devices). The score buffer is bounded
// (256 MB), never N x K.
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
#include <string>
#include <type_traits>

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

// ---------------------------------------------------------------------------------------------
// Fused path: GEMM + best/second-best in one kernel (see the top of the file).

namespace fused {
constexpr int kBM = 128;                  // rows of x per block
constexpr int kBN = 128;                  // centroids per tile
constexpr int kThreads = 256;             // 8 warps: 4 along rows (32 each) x 2 along centroids (64 each)
constexpr int kChunkBytes = 128;          // one chunk of D per row: 32 fp32 or 64 bf16/fp16
constexpr int kRowBytes = kChunkBytes + 16;  // padded row: conflict-free fragment loads, 16-byte aligned
constexpr int kRowWords = kRowBytes / 4;     // 36: lane (g, t) reads word g * 36 + t, 32 distinct banks
constexpr int kStageBytes = (kBM + kBN) * kRowBytes;
constexpr int kStages = 3;
constexpr int kSmemBytes = kStages * kStageBytes;  // 110,592: two blocks per H100 SM
static_assert(kSmemBytes >= 2 * kBM * (2 * sizeof(float) + sizeof(int)), "reduction scratch fits");
constexpr int kMaxCandidates = 16;  // per flagged row in the collect pass; more: buffered path
constexpr int64_t kCollectRows = int64_t(1) << 22;  // flagged rows per collect pass (256 MB of lists)
}  // namespace fused

// Outputs of the scan pass, and inputs / outputs of the collect pass.
struct FusedIo {
  int64_t* labels;
  float* values;
  uint8_t* flags;          // scan: 1 where a row has more than one candidate
  float* thresholds;       // scan: writes best fast score + margin (rounded up); collect: reads it
  int* counts;             // collect: candidates found per row
  int* candidates;         // collect: their indices, kMaxCandidates per row
};

// One mma.sync of a 16 x 8 tile, k = 8 (TF32) or 16 (bf16 / fp16), fp32 accumulators.
// Fragment layouts (PTX ISA, mma.m16n8k8 / m16n8k16), g = lane / 4, t = lane % 4:
//   a: {row g, row g + 8} x {word t, word t + 4} of the k-chunk; b: column g, words t, t + 4;
//   c: rows g (c0, c1) and g + 8 (c2, c3), columns 2t, 2t + 1.
template <typename T>
__device__ __forceinline__ void mma_16x8(float (&acc)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, float>) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    static_assert(std::is_same_v<T, c10::Half>, "fp32, bf16 or fp16");
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#else
  __trap();  // the host only launches the fused kernel on sm_80 and newer
#endif
}

// fp32 bits rounded to nearest TF32 (unit roundoff 2^-11), as the tensor cores read them.
__device__ __forceinline__ uint32_t to_tf32(uint32_t bits) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint32_t out;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(out) : "f"(__uint_as_float(bits)));
  return out;
#else
  return bits;
#endif
}

// 16 bytes global -> shared without registers; zero-filled when !valid (src is not read then).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(bytes)
               : "memory");
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}

// (b1, i1) the best fast score and its centroid, b2 the second-best score; merged with another
// such triple. Exact ties of b1 go to the lower index; b2 is the second-lowest of all scores.
__device__ __forceinline__ void merge_top2(float& b1, int& i1, float& b2, float o1, int oi, float o2) {
  if (o1 < b1 || (o1 == b1 && oi < i1)) {
    b2 = fminf(b1, o2);
    b1 = o1;
    i1 = oi;
  } else {
    b2 = fminf(b2, o1);
  }
}

// kVec: D * sizeof(T) is a multiple of 16 and both matrices are 16-byte aligned, so tiles are
// copied 16 bytes at a time with cp.async (zero-filled past N, K and D). Otherwise element by
// element through registers (zero-padded the same way).
// kCollect = false (scan): each row's best and second-best fast score, then the exact score of
// the only candidate or a flag. kCollect = true (collect, on the flagged rows gathered): every
// centroid whose fast score is within the row's threshold is listed for exact re-scoring.
// Two blocks per SM (2 x 108 KB of shared memory on Hopper): at most 128 registers a thread.
template <typename T, bool kVec, bool kCollect>
__global__ void __launch_bounds__(fused::kThreads, 2)
    fused_assign_kernel(const T* __restrict__ x, const T* __restrict__ c,
                        const float* __restrict__ cnorm, const float* __restrict__ c32,
                        const double* __restrict__ cmax, int64_t n, int k, int64_t d, Metric metric,
                        double u_in, double u_acc, FusedIo io) {
  using namespace fused;
  constexpr int kChunk = kChunkBytes / static_cast<int>(sizeof(T));  // elements of D per chunk
  extern __shared__ __align__(16) unsigned char smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int wm0 = (warp & 3) * 32, wn0 = (warp >> 2) * 64;
  const int64_t row0 = int64_t(blockIdx.x) * kBM;
  const int chunks = static_cast<int>((d + kChunk - 1) / kChunk);
  const int tiles = (k + kBN - 1) / kBN;
  const int64_t steps = int64_t(tiles) * chunks;

  // Copies chunk `dc` of the block's rows and of centroid tile `kt` into stage `stage`.
  auto load_stage = [&](int kt, int dc, int stage) {
    unsigned char* a_s = smem + stage * kStageBytes;
    unsigned char* b_s = a_s + kBM * kRowBytes;
    const int64_t col0 = int64_t(dc) * kChunk;
    const int64_t c_row0 = int64_t(kt) * kBN;
    if constexpr (kVec) {
      constexpr int kVecElems = 16 / static_cast<int>(sizeof(T));
#pragma unroll
      for (int i = 0; i < kBM * kChunkBytes / 16 / kThreads; ++i) {
        const int v = tid + i * kThreads;
        const int r = v / (kChunkBytes / 16), seg = v % (kChunkBytes / 16);
        const int64_t col = col0 + seg * kVecElems;  // a vector is wholly inside D or past it
        const bool ok_x = row0 + r < n && col < d;
        cp_async16(a_s + r * kRowBytes + seg * 16, ok_x ? x + (row0 + r) * d + col : x, ok_x);
        const bool ok_c = c_row0 + r < k && col < d;
        cp_async16(b_s + r * kRowBytes + seg * 16, ok_c ? c + (c_row0 + r) * d + col : c, ok_c);
      }
    } else {
      using raw_t = std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>;
      const raw_t* xr = reinterpret_cast<const raw_t*>(x);
      const raw_t* cr = reinterpret_cast<const raw_t*>(c);
#pragma unroll 4
      for (int i = 0; i < kBM * kChunk / kThreads; ++i) {
        const int e = tid + i * kThreads;
        const int r = e / kChunk, cc = e % kChunk;
        const int64_t col = col0 + cc;
        raw_t vx = 0, vc = 0;
        if (row0 + r < n && col < d) vx = xr[(row0 + r) * d + col];
        if (c_row0 + r < k && col < d) vc = cr[(c_row0 + r) * d + col];
        *reinterpret_cast<raw_t*>(a_s + r * kRowBytes + cc * sizeof(T)) = vx;
        *reinterpret_cast<raw_t*>(b_s + r * kRowBytes + cc * sizeof(T)) = vc;
      }
    }
  };

  float acc[2][8][4];
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int ni = 0; ni < 8; ++ni)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[mi][ni][q] = 0.f;
  // Running best / second-best of this thread's 4 rows (wm0 + 16 mi + g + 8 h) over its columns.
  float best[4], second[4];
  int best_index[4];
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    best[s] = second[s] = INFINITY;
    best_index[s] = 0;
  }
  const bool l2 = metric == Metric::L2;
  const float scale = l2 ? 2.f : 1.f;  // score = cnorm - 2 x.c (l2) or 0 - x.c (ip)
  float threshold[4];  // collect pass: the rows' thresholds (-inf past N: no candidates)
  if constexpr (kCollect) {
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      const int64_t row = row0 + wm0 + (s >> 1) * 16 + g + 8 * (s & 1);
      threshold[s] = row < n ? io.thresholds[row] : -INFINITY;
    }
  }

  // Prologue: the first kStages - 1 steps in flight.
  int load_kt = 0, load_dc = 0;
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < steps) {
      load_stage(load_kt, load_dc, s);
      if (++load_dc == chunks) { load_dc = 0; ++load_kt; }
    }
    cp_async_commit();
  }
  int kt = 0, dc = 0;
  for (int64_t step = 0; step < steps; ++step) {
    cp_async_wait<kStages - 2>();  // this step's copies have landed (for this thread)
    __syncthreads();               // ... for every thread; and the stage refilled below is free
    if (step + kStages - 1 < steps) {
      load_stage(load_kt, load_dc, static_cast<int>((step + kStages - 1) % kStages));
      if (++load_dc == chunks) { load_dc = 0; ++load_kt; }
    }
    cp_async_commit();  // possibly empty: keeps the group count uniform

    const uint32_t* a_w = reinterpret_cast<const uint32_t*>(smem + (step % kStages) * kStageBytes);
    const uint32_t* b_w = a_w + kBM * kRowWords;
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) {  // 4 k-steps of 8 words (8 TF32 or 16 bf16/fp16 values)
      uint32_t af[2][4], bf[8][2];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
        const uint32_t* p = a_w + (wm0 + mi * 16 + g) * kRowWords + ks * 8 + t;
        af[mi][0] = p[0];
        af[mi][1] = p[8 * kRowWords];
        af[mi][2] = p[4];
        af[mi][3] = p[8 * kRowWords + 4];
      }
#pragma unroll
      for (int ni = 0; ni < 8; ++ni) {
        const uint32_t* p = b_w + (wn0 + ni * 8 + g) * kRowWords + ks * 8 + t;
        bf[ni][0] = p[0];
        bf[ni][1] = p[4];
      }
      if constexpr (std::is_same_v<T, float>) {
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
          for (int q = 0; q < 4; ++q) af[mi][q] = to_tf32(af[mi][q]);
#pragma unroll
        for (int ni = 0; ni < 8; ++ni) {
          bf[ni][0] = to_tf32(bf[ni][0]);
          bf[ni][1] = to_tf32(bf[ni][1]);
        }
      }
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 8; ++ni) mma_16x8<T>(acc[mi][ni], af[mi], bf[ni]);
    }

    if (dc == chunks - 1) {
      // Epilogue of centroid tile kt, in registers: scores, running best and second-best.
      // Each thread visits its columns in increasing order, so a strict < keeps the lowest
      // index among equal scores.
      const int col_base = kt * kBN + wn0 + 2 * t;
      float bias[8][2];
#pragma unroll
      for (int ni = 0; ni < 8; ++ni)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int col = col_base + ni * 8 + j;
          bias[ni][j] = (l2 && col < k) ? cnorm[col] : 0.f;
        }
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int ni = 0; ni < 8; ++ni)
#pragma unroll
            for (int j = 0; j < 2; ++j) {
              const int col = col_base + ni * 8 + j;
              const float s = fmaf(-scale, acc[mi][ni][2 * h + j], bias[ni][j]);
              const int slot = mi * 2 + h;
              if constexpr (kCollect) {
                if (col < k && s <= threshold[slot]) {
                  const int64_t row = row0 + wm0 + mi * 16 + g + 8 * h;
                  const int at_pos = atomicAdd(io.counts + row, 1);
                  if (at_pos < kMaxCandidates) io.candidates[row * kMaxCandidates + at_pos] = col;
                }
              } else if (col < k && s < second[slot]) {
                if (s < best[slot]) {
                  second[slot] = best[slot];
                  best[slot] = s;
                  best_index[slot] = col;
                } else {
                  second[slot] = s;
                }
              }
            }
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 8; ++ni)
#pragma unroll
          for (int q = 0; q < 4; ++q) acc[mi][ni][q] = 0.f;
    }
    if (++dc == chunks) { dc = 0; ++kt; }
  }
  cp_async_wait<0>();
  if constexpr (kCollect) return;
  __syncthreads();  // the stages are now free for the reduction scratch

  // The 4 lanes of a quad hold the same rows: merge them.
#pragma unroll
  for (int s = 0; s < 4; ++s) {
#pragma unroll
    for (int offset = 1; offset <= 2; offset <<= 1) {
      const float o1 = __shfl_xor_sync(0xffffffffu, best[s], offset);
      const int oi = __shfl_xor_sync(0xffffffffu, best_index[s], offset);
      const float o2 = __shfl_xor_sync(0xffffffffu, second[s], offset);
      merge_top2(best[s], best_index[s], second[s], o1, oi, o2);
    }
  }
  // The two warps along the centroids hold the same rows: merge through shared memory.
  float* red_best = reinterpret_cast<float*>(smem);
  float* red_second = red_best + 2 * kBM;
  int* red_index = reinterpret_cast<int*>(red_second + 2 * kBM);
  if (t == 0) {
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int slot = (warp >> 2) * kBM + wm0 + mi * 16 + g + 8 * h;
        red_best[slot] = best[mi * 2 + h];
        red_second[slot] = second[mi * 2 + h];
        red_index[slot] = best_index[mi * 2 + h];
      }
  }
  __syncthreads();

  // One warp per row: the margin from the row's norm, then either the exact score of the only
  // candidate (canonical, as the buffered path and the CPU compute it) or a flag.
  const double c_max = *cmax;
  for (int rl = warp; rl < kBM; rl += kThreads / 32) {
    const int64_t row = row0 + rl;
    if (row >= n) break;  // warp-uniform
    float b1 = red_best[rl], b2 = red_second[rl];
    int i1 = red_index[rl];
    merge_top2(b1, i1, b2, red_best[kBM + rl], red_index[kBM + rl], red_second[kBM + rl]);
    const T* xr = x + row * d;
    double sq = 0.0;
    for (int64_t j = lane; j < d; j += 32) {
      const double v = static_cast<double>(to_float(xr[j]));
      sq += v * v;
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, offset);
    const double margin = kmeans::refine_margin(sqrt(sq), c_max, d, u_in, u_acc);
    const bool unique = static_cast<double>(b2) > static_cast<double>(b1) + margin;
    double score = 0.0;
    if (unique) {
      score = canonical_score_warp(metric, xr, c32 + int64_t(i1) * d, d, lane);
    }
    if (lane == 0) {
      io.labels[row] = i1;
      io.values[row] = static_cast<float>(metric == Metric::IP ? -score : score);
      io.flags[row] = unique ? 0 : 1;
      // Every centroid that can be the best has a fast score within this (rounded up).
      io.thresholds[row] = __double2float_ru(static_cast<double>(b1) + margin);
    }
  }
}

// One warp per collected row: the listed candidates re-scored canonically, lowest index
// winning exact ties (the list's order does not matter). Rows with more candidates than the
// list holds are flagged for the buffered path.
template <typename T>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    rescore_candidates_kernel(const T* __restrict__ x, int64_t n, int64_t d,
                              const float* __restrict__ c32, Metric metric,
                              const int* __restrict__ counts, const int* __restrict__ candidates,
                              int64_t* __restrict__ labels, float* __restrict__ values,
                              uint8_t* __restrict__ overflow) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * kWarpsPerBlock;
  for (int64_t r = blockIdx.x * int64_t(kWarpsPerBlock) + (threadIdx.x >> 5); r < n; r += warps) {
    const int count = counts[r];
    if (count > fused::kMaxCandidates) {
      if (lane == 0) overflow[r] = 1;
      continue;
    }
    const T* xr = x + r * d;
    double best = INFINITY;
    int64_t best_index = 0;
    for (int q = 0; q < count; ++q) {
      const int64_t j = candidates[r * fused::kMaxCandidates + q];
      const double score = canonical_score_warp(metric, xr, c32 + j * d, d, lane);
      if (kmeans::assign_better<double>(score, j, best, best_index)) {
        best = score;
        best_index = j;
      }
    }
    if (lane == 0) {
      labels[r] = best_index;
      values[r] = static_cast<float>(metric == Metric::IP ? -best : best);
      overflow[r] = 0;
    }
  }
}

// Which assign path: LUSSCORE_KMEANS_ASSIGN=fused|buffered forces one (tests, benchmarks);
// by default the fused kernel runs whenever it fills the GPU (at least one 128-row block per
// SM) and can run; for fewer rows the buffered path's cuBLAS GEMMs spread the centroids over
// all SMs instead.
bool use_fused(int64_t n, int64_t k, int64_t d) {
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  const bool can = d >= 1 && k < (int64_t(1) << 31) - fused::kBN && prop->major >= 8 &&
                   prop->sharedMemPerBlockOptin >= static_cast<size_t>(fused::kSmemBytes);
  const char* env = std::getenv("LUSSCORE_KMEANS_ASSIGN");
  if (env != nullptr && std::string(env) == "buffered") return false;
  if (env != nullptr && std::string(env) == "fused") return can;
  return can && (n + fused::kBM - 1) / fused::kBM >= prop->multiProcessorCount;
}

template <typename T, bool kCollect>
void launch_fused(const at::Tensor& x, const at::Tensor& c, const at::Tensor& cnorm,
                  const at::Tensor& c32, const at::Tensor& cmax, Metric metric, double u_in,
                  double u_acc, const FusedIo& io) {
  const int64_t n = x.size(0), k = c.size(0), d = x.size(1);
  const int64_t blocks = (n + fused::kBM - 1) / fused::kBM;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "kmeans_assign: too many rows for one call (", n, ")");
  const bool vec = (d * int64_t(sizeof(T))) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 == 0;
  auto kernel = vec ? fused_assign_kernel<T, true, kCollect> : fused_assign_kernel<T, false, kCollect>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      fused::kSmemBytes));
  kernel<<<static_cast<unsigned>(blocks), fused::kThreads, fused::kSmemBytes,
           at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const T*>(x.data_ptr()), reinterpret_cast<const T*>(c.data_ptr()),
      cnorm.data_ptr<float>(), c32.data_ptr<float>(), cmax.data_ptr<double>(), n,
      static_cast<int>(k), d, metric, u_in, u_acc, io);
  LUSSCORE_CUDA_CHECK_LAUNCH();
}

template <typename T>
void assign_fused_typed(const at::Tensor& x, const at::Tensor& c32, Metric metric,
                        const at::Tensor& labels, const at::Tensor& values) {
  const int64_t n = x.size(0), d = x.size(1);
  const at::Tensor c = c32.to(x.scalar_type()).contiguous();  // the MMA's B operand, in x's dtype
  const at::Tensor cnorm = c32.square().sum(1);
  const at::Tensor cmax = cnorm.max().to(at::kDouble).sqrt();
  // Input rounding of the products: fp32 rows and centroids to TF32 (round to nearest,
  // 2^-11); bf16 / fp16 rows are exact and only the centroids are rounded (2^-8 / 2^-11).
  // The tensor cores may truncate while accumulating: 2^-23 per addition.
  const double u_in = std::is_same_v<T, c10::BFloat16> ? 0x1p-8 : 0x1p-11;
  const double u_acc = 0x1p-23;
  const at::Tensor flags = at::empty({n}, x.options().dtype(at::kByte));
  const at::Tensor thresholds = at::empty({n}, x.options().dtype(at::kFloat));
  FusedIo scan{labels.data_ptr<int64_t>(), values.data_ptr<float>(), flags.data_ptr<uint8_t>(),
               thresholds.data_ptr<float>(), nullptr, nullptr};
  launch_fused<T, false>(x, c, cnorm, c32, cmax, metric, u_in, u_acc, scan);

  // Rows with more than one candidate (one device-to-host sync for their count): the collect
  // pass lists their candidates, which are then re-scored exactly; rows with too many go
  // through the buffered path.
  const at::Tensor flagged = flags.nonzero().squeeze(1);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  for (int64_t f0 = 0; f0 < flagged.numel(); f0 += fused::kCollectRows) {
    const at::Tensor rows = flagged.narrow(0, f0, std::min(fused::kCollectRows, flagged.numel() - f0));
    const int64_t m = rows.numel();
    const at::Tensor sub_x = x.index_select(0, rows);
    at::Tensor sub_thresholds = thresholds.index_select(0, rows);
    at::Tensor counts = at::zeros({m}, x.options().dtype(at::kInt));
    at::Tensor candidates = at::empty({m * fused::kMaxCandidates}, x.options().dtype(at::kInt));
    at::Tensor sub_labels = at::empty({m}, labels.options());
    at::Tensor sub_values = at::empty({m}, values.options());
    at::Tensor overflow = at::empty({m}, flags.options());
    FusedIo collect{nullptr, nullptr, nullptr, sub_thresholds.data_ptr<float>(),
                    counts.data_ptr<int>(), candidates.data_ptr<int>()};
    launch_fused<T, true>(sub_x, c, cnorm, c32, cmax, metric, u_in, u_acc, collect);
    const int64_t blocks = std::max<int64_t>(
        1, std::min<int64_t>((m + kWarpsPerBlock - 1) / kWarpsPerBlock, int64_t(sms) * 16));
    rescore_candidates_kernel<T><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(
        reinterpret_cast<const T*>(sub_x.data_ptr()), m, d, c32.data_ptr<float>(), metric,
        counts.data_ptr<int>(), candidates.data_ptr<int>(), sub_labels.data_ptr<int64_t>(),
        sub_values.data_ptr<float>(), overflow.data_ptr<uint8_t>());
    LUSSCORE_CUDA_CHECK_LAUNCH();
    const at::Tensor many = overflow.nonzero().squeeze(1);
    if (many.numel() > 0) {
      at::Tensor many_labels = at::empty({many.numel()}, labels.options());
      at::Tensor many_values = at::empty({many.numel()}, values.options());
      assign_buffered(sub_x.index_select(0, many), c32, metric, many_labels, many_values);
      sub_labels.index_copy_(0, many, many_labels);
      sub_values.index_copy_(0, many, many_values);
    }
    labels.index_copy_(0, rows, sub_labels);
    values.index_copy_(0, rows, sub_values);
  }
}

void assign_fused(const at::Tensor& x_in, const at::Tensor& c32, Metric metric,
                  const at::Tensor& labels, const at::Tensor& values) {
  const at::Tensor x = x_in.contiguous();
  const auto type = x.scalar_type();
  if (type == at::kFloat) {
    assign_fused_typed<float>(x, c32, metric, labels, values);
  } else if (type == at::kBFloat16) {
    assign_fused_typed<c10::BFloat16>(x, c32, metric, labels, values);
  } else {
    assign_fused_typed<c10::Half>(x, c32, metric, labels, values);
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
  const at::Tensor c32 = centroids.to(at::kFloat).contiguous();
  if (use_fused(n, k, d)) {
    assign_fused(x_in, c32, metric, labels, values);
  } else {
    assign_buffered(x_in, c32, metric, labels, values);
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
