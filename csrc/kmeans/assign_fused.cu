// kmeans_assign on CUDA: the fused path and the op's entry point (which picks the path).
//
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
//
// Centroids are rounded to fp32 (float64 ones too, as on the CPU). For fp16 rows, centroids past
// fp16's range (|value| > 65504) would become inf in x's dtype: then the rows run through the
// fp32 kernels, widened chunk by chunk (a range check with one device-to-host sync, fp16 only).
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
  if (env != nullptr && std::string(env) == "fused") {
    // Forced (tests, benchmarks): a silent fallback would compare buffered with buffered.
    TORCH_CHECK(can, "kmeans_assign: LUSSCORE_KMEANS_ASSIGN=fused, but the fused kernel cannot run "
                "here: it needs sm_80 or newer (this GPU: sm_", prop->major, prop->minor, "), ",
                fused::kSmemBytes, " bytes of shared memory per block (", prop->sharedMemPerBlockOptin,
                " here), D >= 1 (", d, ") and K < 2^31 - ", fused::kBN, " (", k, ")");
    return true;
  }
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


// Does a centroid lie past fp16's range (|value| > 65504)? Rounded to fp16 (the fused MMA's B
// operand, the buffered GEMM's input) it would become inf. One device-to-host sync.
bool exceeds_fp16(const at::Tensor& c32) {
  if (c32.numel() == 0) return false;
  const auto [lo, hi] = at::aminmax(c32);
  return at::maximum(hi, -lo).item<float>() > 65504.f;
}

// Rows of x widened to fp32 at a time by the fp16 fallback: the copy stays under 256 MB.
constexpr int64_t kWidenElems = int64_t(1) << 26;

std::tuple<at::Tensor, at::Tensor> kmeans_assign_cuda(const at::Tensor& x_in,
                                                      const at::Tensor& centroids,
                                                      c10::string_view metric_name) {
  const Metric metric = kmeans::parse_metric(metric_name);
  const c10::cuda::CUDAGuard guard(x_in.device());
  auto [labels, values] = kmeans::assign_prepare(x_in, centroids, /*allow_double_x=*/false);
  const int64_t n = x_in.size(0), k = centroids.size(0), d = x_in.size(1);
  if (n == 0) return {labels, values};
  // The path first: a forced fused path that cannot run fails before any copy.
  const bool fused = use_fused(n, k, d);
  // float64 centroids are rounded to fp32, as the CPU does for fp32/bf16/fp16 rows.
  const at::Tensor c32 = centroids.to(at::kFloat).contiguous();
  auto run = [&](const at::Tensor& x, const at::Tensor& l, const at::Tensor& v) {
    if (fused) {
      assign_fused(x, c32, metric, l, v);
    } else {
      assign_buffered(x, c32, metric, l, v);
    }
  };
  if (x_in.scalar_type() == at::kHalf && exceeds_fp16(c32)) {
    // fp16 rows against centroids past fp16's range: the fp32 kernels on the rows widened
    // (exactly), chunk by chunk, give the CPU's labels and values (it computes in fp32). The
    // range check costs one device-to-host sync per call, for fp16 x only.
    const int64_t chunk = std::max<int64_t>(1, kWidenElems / d);  // d >= 1: c32 is not empty
    for (int64_t r0 = 0; r0 < n; r0 += chunk) {
      const int64_t rows = std::min(chunk, n - r0);
      run(x_in.narrow(0, r0, rows).to(at::kFloat), labels.narrow(0, r0, rows),
          values.narrow(0, r0, rows));
    }
  } else {
    run(x_in, labels, values);
  }
  return {labels, values};
}

}  // namespace
}  // namespace kmeans_cuda

TORCH_LIBRARY_IMPL(lusscore, CUDA, m) { m.impl("kmeans_assign", &kmeans_cuda::kmeans_assign_cuda); }

}  // namespace lusscore
