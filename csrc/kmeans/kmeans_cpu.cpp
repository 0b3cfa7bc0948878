// kmeans_assign / kmeans_update on the CPU.
//
// assign: the rows are processed in tiles; for each (row tile, centroid tile) the dot products
// come from one bounded BLAS GEMM, and a fused pass finds the near-best candidates and re-scores
// them exactly (kmeans_kernel.h), so no N x K buffer ever exists and ties are exact.
// update: a stable counting sort by label, then each cluster's rows are
// summed in row order (in double, segment by segment) with no atomics: deterministic.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <type_traits>
#include <limits>
#include <vector>

#include "common/cpu_isa.h"
#include "kmeans/kmeans_common.h"
#include "kmeans/kmeans_kernel.h"

namespace lusscore {
namespace {

using kmeans::Metric;

// A (row tile x centroid tile) score block stays around 16 MB.
constexpr int64_t kTileElems = int64_t(1) << 22;
constexpr int64_t kMaxCentroidTile = 1024;

template <typename scalar_t>
void assign_tiles(const at::Tensor& x, const at::Tensor& centroids, Metric metric,
                  at::Tensor& labels, at::Tensor& values) {
  const int64_t n = x.size(0), k = centroids.size(0), d = x.size(1);
  const auto compute_type = c10::CppTypeToScalarType<scalar_t>::value;
  const at::Tensor c = centroids.to(compute_type).contiguous();
  const at::Tensor cnorm_t = c.square().sum(1);
  const scalar_t* cnorm = cnorm_t.data_ptr<scalar_t>();
  const scalar_t* cp = c.data_ptr<scalar_t>();
  const double cmax = std::sqrt(c.to(at::kDouble).square().sum(1).max().item<double>());
  // BLAS accumulates in the compute type; its inputs are exact (x is widened exactly).
  const double u_acc = std::is_same_v<scalar_t, double> ? 0x1p-53 : 0x1p-24;
  const int64_t k_tile = std::min(k, kMaxCentroidTile);
  const int64_t n_tile = std::max<int64_t>(64, std::min<int64_t>(8192, kTileElems / k_tile));
  int64_t* label_out = labels.data_ptr<int64_t>();
  scalar_t* value_out = values.data_ptr<scalar_t>();
  std::vector<double> margin(n_tile), fast_best(n_tile), best(n_tile);
  std::vector<int64_t> best_index(n_tile);

  for (int64_t r0 = 0; r0 < n; r0 += n_tile) {
    const int64_t rows = std::min(n_tile, n - r0);
    const at::Tensor xt = x.narrow(0, r0, rows).to(compute_type).contiguous();
    const scalar_t* xp = xt.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        double sq = 0;
        for (int64_t j = 0; j < d; ++j) sq += double(xp[i * d + j]) * double(xp[i * d + j]);
        margin[i] = kmeans::refine_margin(std::sqrt(sq), cmax, d, 0.0, u_acc);
        fast_best[i] = best[i] = std::numeric_limits<double>::infinity();
        best_index[i] = 0;
      }
    });
    for (int64_t k0 = 0; k0 < k; k0 += k_tile) {
      const int64_t cols = std::min(k_tile, k - k0);
      // d == 0 gives zero dot products (at::mm handles the empty inner dimension).
      at::Tensor dots = at::mm(xt, c.narrow(0, k0, cols).t()).contiguous();
      scalar_t* dp = dots.data_ptr<scalar_t>();
      const scalar_t* cn = cnorm + k0;
      at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
        constexpr int kMinLanes = 8;  // independent running minima: vectorisable, no reduction chain
        for (int64_t i = begin; i < end; ++i) {
          scalar_t* row = dp + i * cols;
          // Pass 1: fast scores, written over the dot products, and their minimum.
          if (metric == Metric::L2) {
            for (int64_t j = 0; j < cols; ++j) row[j] = cn[j] - scalar_t(2) * row[j];
          } else {
            for (int64_t j = 0; j < cols; ++j) row[j] = -row[j];
          }
          scalar_t lane_min[kMinLanes];
          for (int l = 0; l < kMinLanes; ++l) lane_min[l] = std::numeric_limits<scalar_t>::infinity();
          int64_t j = 0;
          for (; j + kMinLanes <= cols; j += kMinLanes) {
            for (int l = 0; l < kMinLanes; ++l) {
              lane_min[l] = row[j + l] < lane_min[l] ? row[j + l] : lane_min[l];
            }
          }
          for (; j < cols; ++j) lane_min[0] = row[j] < lane_min[0] ? row[j] : lane_min[0];
          scalar_t tile_min = lane_min[0];
          for (int l = 1; l < kMinLanes; ++l) tile_min = lane_min[l] < tile_min ? lane_min[l] : tile_min;
          if (!(double(tile_min) <= fast_best[i] + margin[i])) continue;
          const double threshold = std::min(double(tile_min), fast_best[i]) + margin[i];
          fast_best[i] = std::min(double(tile_min), fast_best[i]);
          // Pass 2: re-score the near-best candidates exactly; lowest index wins exact ties.
          for (int64_t jj = 0; jj < cols; ++jj) {
            if (!(double(row[jj]) <= threshold)) continue;
            const double exact = kmeans::canonical_score_host(metric, xp + i * d, cp + (k0 + jj) * d, d);
            if (kmeans::assign_better<double>(exact, k0 + jj, best[i], best_index[i])) {
              best[i] = exact;
              best_index[i] = k0 + jj;
            }
          }
        }
      });
    }
    for (int64_t i = 0; i < rows; ++i) {
      label_out[r0 + i] = best_index[i];
      value_out[r0 + i] = static_cast<scalar_t>(metric == Metric::IP ? -best[i] : best[i]);
    }
  }
}

// ---- Fused float path. The rows go in blocks of a few dozen. For each panel of NR packed
// centroids (L1-resident while the block's rows pass over it) a register-blocked micro-kernel
// computes an MR x NR tile of fast scores over all of D; the tile goes to a block-sized score
// buffer (L2-resident) while each row's minimum is kept lane-wise. Then the columns within a
// row's margin of its minimum are re-scored exactly. It replaces BLAS for float because the BLAS
// torch ships may run a generic path on some CPUs (MKL on AMD ran at half of OpenBLAS's speed)
// and because the arg-min then costs no pass over a GEMM's output in memory.

constexpr int64_t kFusedMaxD = 1024;         // beyond this a panel leaves L2: BLAS path
constexpr int64_t kBlockBytes = 32 * 1024;   // a block's rows of x
constexpr int64_t kScoreBytes = 256 * 1024;  // at most this much of a block's scores

#if defined(__GNUC__) && !defined(__clang__)
#define LUSSCORE_INLINE inline __attribute__((always_inline))
#else
#define LUSSCORE_INLINE inline
#endif

typedef float float16v __attribute__((vector_size(64)));
typedef float float8v __attribute__((vector_size(32)));
typedef float float4v __attribute__((vector_size(16)));
typedef int32_t int16v __attribute__((vector_size(64)));
typedef int32_t int8v __attribute__((vector_size(32)));
typedef int32_t int4v __attribute__((vector_size(16)));
template <int W> struct FloatVec;
template <> struct FloatVec<16> { using type = float16v; using mask = int16v; };
template <> struct FloatVec<8> { using type = float8v; using mask = int8v; };
template <> struct FloatVec<4> { using type = float4v; using mask = int4v; };
constexpr int kMaxLanes = 16;

// The centroids as the micro-kernel reads them, and what each row's margin needs.
struct PackedCentroids {
  const float* panels;  // panel p: centroids p NR .. p NR + NR - 1 as (D, NR)
  const float* bias;    // per column: ||c||^2 (L2) or 0 (IP); +inf past K
  float scale;          // score = bias - scale x.c
  int64_t count, k, d;  // panels, centroids, dimension
  double cmax;          // largest centroid norm
};

// A row's search: its margin, fast minimum and candidates (fast score, centroid).
struct RowSearch {
  double margin;
  double best_fast;
  std::vector<std::pair<float, int64_t>> near;
};

// Per-task buffers of one block.
struct BlockScratch {
  std::vector<float> scores, lane_min;
  std::vector<RowSearch> rows;
};

// The smallest float >= v (NaN stays NaN): a float test that never drops a double candidate.
float round_up_to_float(double v) {
  float f = static_cast<float>(v);
  if (static_cast<double>(f) < v) f = std::nextafter(f, std::numeric_limits<float>::infinity());
  return f;
}

// Is any lane of a compare mask set? Wide masks are folded in halves first (one extract and
// one OR each): cheaper than reading every lane.
template <typename mask>
LUSSCORE_INLINE bool any_lane(const mask& m) {
  if constexpr (sizeof(mask) > sizeof(int4v)) {
    using half = typename FloatVec<sizeof(mask) / 8>::mask;
    half lo, hi;
    std::memcpy(&lo, &m, sizeof(half));
    std::memcpy(&hi, reinterpret_cast<const char*>(&m) + sizeof(half), sizeof(half));
    return any_lane(lo | hi);
  } else {
    return (m[0] | m[1] | m[2] | m[3]) != 0;
  }
}

// sum_j x_j^2 in double (the margin's bound holds whatever its last-bit rounding), over 8
// independent lanes: no one long chain of dependent adds.
LUSSCORE_INLINE double squared_norm(const float* x, int64_t d) {
  double lane[8] = {};
  int64_t j = 0;
  for (; j + 8 <= d; j += 8) {
    for (int l = 0; l < 8; ++l) lane[l] += double(x[j + l]) * double(x[j + l]);
  }
  for (; j < d; ++j) lane[0] += double(x[j]) * double(x[j]);
  return ((lane[0] + lane[4]) + (lane[1] + lane[5])) + ((lane[2] + lane[6]) + (lane[3] + lane[7]));
}

// One block of `rows` rows of x (row-major, a multiple of MR) against every panel: rows[r]
// gets its margin, fast minimum and the columns within its margin of that minimum.
template <int MR, int W>
LUSSCORE_INLINE void search_block_body(const PackedCentroids& c, const float* x, int64_t rows,
                                       BlockScratch& scratch) {
  using vec = typename FloatVec<W>::type;
  constexpr int NR = 2 * W;
  const int64_t d = c.d, ld = c.count * NR;
  constexpr double u_acc = 0x1p-24;  // one fp32 FMA chain per dot product (inputs exact)
  for (int64_t r = 0; r < rows; ++r) {
    const double sq = squared_norm(x + r * d, d);
    scratch.rows[r].margin = kmeans::refine_margin(std::sqrt(sq), c.cmax, d, 0.0, u_acc);
    scratch.rows[r].near.clear();
  }
  float* scores = scratch.scores.data();
  float* lane_min = scratch.lane_min.data();
  std::fill(lane_min, lane_min + rows * W, std::numeric_limits<float>::infinity());
  for (int64_t p = 0; p < c.count; ++p) {
    const float* bp = c.panels + p * d * NR;
    vec bias0, bias1;
    std::memcpy(&bias0, c.bias + p * NR, sizeof(vec));
    std::memcpy(&bias1, c.bias + p * NR + W, sizeof(vec));
    for (int64_t r0 = 0; r0 < rows; r0 += MR) {
      const float* xa = x + r0 * d;
      vec acc0[MR], acc1[MR];
      for (int r = 0; r < MR; ++r) acc0[r] = acc1[r] = vec{};
#pragma GCC unroll 4
      for (int64_t j = 0; j < d; ++j) {  // 2 centroid vectors + 1 broadcast live
        vec b0, b1;
        std::memcpy(&b0, bp + j * NR, sizeof(vec));
        std::memcpy(&b1, bp + j * NR + W, sizeof(vec));
        for (int r = 0; r < MR; ++r) {
          const vec a = xa[r * d + j] - vec{};  // a broadcast (x - 0 is x)
          acc0[r] += a * b0;
          acc1[r] += a * b1;
        }
      }
      for (int r = 0; r < MR; ++r) {
        const vec s0 = bias0 - c.scale * acc0[r], s1 = bias1 - c.scale * acc1[r];
        float* out = scores + (r0 + r) * ld + p * NR;
        std::memcpy(out, &s0, sizeof(vec));
        std::memcpy(out + W, &s1, sizeof(vec));
        vec m;  // a NaN score never becomes the minimum
        std::memcpy(&m, lane_min + (r0 + r) * W, sizeof(vec));
        m = s0 < m ? s0 : m;
        m = s1 < m ? s1 : m;
        std::memcpy(lane_min + (r0 + r) * W, &m, sizeof(vec));
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    RowSearch& row = scratch.rows[r];
    float best = lane_min[r * W];
    for (int l = 1; l < W; ++l) best = std::min(best, lane_min[r * W + l]);
    row.best_fast = best;
    const double threshold = row.best_fast + row.margin;
    const vec t = round_up_to_float(threshold) - vec{};
    const float* srow = scores + r * ld;
    for (int64_t p = 0; p < c.count; ++p) {
      vec s0, s1;
      std::memcpy(&s0, srow + p * NR, sizeof(vec));
      std::memcpy(&s1, srow + p * NR + W, sizeof(vec));
      if (!any_lane((s0 <= t) | (s1 <= t))) continue;  // the common case: nothing near
      for (int64_t j = p * NR; j < std::min(c.k, (p + 1) * NR); ++j) {
        if (double(srow[j]) <= threshold) row.near.emplace_back(srow[j], j);
      }
    }
  }
}

using SearchBlockFn = void (*)(const PackedCentroids&, const float*, int64_t, BlockScratch&);

struct MicroKernel {
  SearchBlockFn search_block;
  int rows;     // MR: rows per tile
  int columns;  // NR: centroids per packed panel
  const char* name;
};

#if LUSSCORE_X86_TARGETS
// AVX-512: 12 rows x 2 zmm = 24 accumulators of 32 registers.
__attribute__((target("arch=x86-64-v4"))) void search_block_avx512(
    const PackedCentroids& c, const float* x, int64_t rows, BlockScratch& scratch) {
  search_block_body<12, 16>(c, x, rows, scratch);
}
// AVX2 + FMA: 6 rows x 2 ymm = 12 accumulators + 2 centroid vectors + 1 broadcast of 16.
__attribute__((target("arch=x86-64-v3"))) void search_block_avx2(
    const PackedCentroids& c, const float* x, int64_t rows, BlockScratch& scratch) {
  search_block_body<6, 8>(c, x, rows, scratch);
}
#endif
void search_block_generic(const PackedCentroids& c, const float* x, int64_t rows,
                          BlockScratch& scratch) {
  search_block_body<4, 4>(c, x, rows, scratch);
}

// The widest micro-kernel this CPU runs, or the one LUSSCORE_KMEANS_CPU_KERNEL names.
MicroKernel pick_micro_kernel() {
  switch (cpu_isa("LUSSCORE_KMEANS_CPU_KERNEL")) {
#if LUSSCORE_X86_TARGETS
    case CpuIsa::avx512: return {&search_block_avx512, 12, 32, "avx512"};
    case CpuIsa::avx2: return {&search_block_avx2, 6, 16, "avx2"};
#endif
    default: return {&search_block_generic, 4, 8, "generic"};
  }
}

// x: float32 / bf16 / fp16 rows (widened exactly to float per block of rows).
void assign_fused_float(const at::Tensor& x_in, const at::Tensor& centroids, Metric metric,
                        at::Tensor& labels, at::Tensor& values) {
  const int64_t n = x_in.size(0), k = centroids.size(0), d = x_in.size(1);
  const MicroKernel kernel = pick_micro_kernel();
  const int64_t mr = kernel.rows, nr = kernel.columns;
  const at::Tensor c = centroids.to(at::kFloat).contiguous();
  const float* cp = c.data_ptr<float>();
  const at::Tensor cnorm_t = c.square().sum(1);
  const float* cnorm = cnorm_t.data_ptr<float>();
  const int64_t panels = (k + nr - 1) / nr, ld = panels * nr;
  // Zero past K, where the bias is +inf, so those columns never become candidates.
  std::vector<float> packed(static_cast<size_t>(ld * d), 0.f), bias(static_cast<size_t>(ld));
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t jj = 0; jj < nr && p * nr + jj < k; ++jj) {
        const float* src = cp + (p * nr + jj) * d;
        float* dst = packed.data() + p * d * nr + jj;
        for (int64_t j = 0; j < d; ++j) dst[j * nr] = src[j];
      }
    }
  });
  for (int64_t j = 0; j < ld; ++j) {
    bias[j] = j >= k ? std::numeric_limits<float>::infinity() : (metric == Metric::L2 ? cnorm[j] : 0.f);
  }
  const PackedCentroids packed_c{packed.data(), bias.data(), metric == Metric::L2 ? 2.f : 1.f,
                                 panels, k, d,
                                 std::sqrt(c.to(at::kDouble).square().sum(1).max().item<double>())};
  const bool direct = x_in.scalar_type() == at::kFloat && x_in.is_contiguous();
  const at::Tensor x = x_in.contiguous();
  int64_t* label_out = labels.data_ptr<int64_t>();
  float* value_out = values.data_ptr<float>();
  const int64_t block_rows = mr * std::max<int64_t>(1, std::min(kBlockBytes / (mr * d * 4),
                                                                kScoreBytes / (mr * ld * 4)));
  const int64_t blocks = (n + block_rows - 1) / block_rows;
  // A few blocks per task: each task reuses its buffers, and threads balance well.
  const int64_t grain = std::max<int64_t>(1, std::min<int64_t>(8, blocks / (8 * at::get_num_threads())));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    BlockScratch scratch{std::vector<float>(block_rows * ld), std::vector<float>(block_rows * kMaxLanes),
                         std::vector<RowSearch>(block_rows)};
    std::vector<float> xpad;
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * block_rows;
      const int64_t rows = std::min<int64_t>(block_rows, n - r0);
      const float* xb;
      if (direct && rows == block_rows) {
        xb = x.data_ptr<float>() + r0 * d;
      } else {  // widen (bf16/fp16) and zero-pad the last block's rows
        xpad.assign(static_cast<size_t>(block_rows * d), 0.f);
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "kmeans_widen", [&] {
          const scalar_t* src = x.data_ptr<scalar_t>() + r0 * d;
          for (int64_t i = 0; i < rows * d; ++i) xpad[i] = static_cast<float>(src[i]);
        });
        xb = xpad.data();
      }
      kernel.search_block(packed_c, xb, block_rows, scratch);
      for (int64_t r = 0; r < rows; ++r) {
        // Every centroid within the margin of the fast minimum is re-scored exactly; lowest
        // index wins exact ties. (A NaN row has no candidate: label 0, value inf.)
        double best = std::numeric_limits<double>::infinity();
        int64_t best_index = 0;
        for (const auto& [fast, j] : scratch.rows[r].near) {
          const double exact = kmeans::canonical_score_host(metric, xb + r * d, cp + j * d, d);
          if (kmeans::assign_better<double>(exact, j, best, best_index)) {
            best = exact;
            best_index = j;
          }
        }
        label_out[r0 + r] = best_index;
        value_out[r0 + r] = static_cast<float>(metric == Metric::IP ? -best : best);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> kmeans_assign_cpu(const at::Tensor& x,
                                                     const at::Tensor& centroids,
                                                     c10::string_view metric_name) {
  const Metric metric = kmeans::parse_metric(metric_name);
  auto [labels, values] = kmeans::assign_prepare(x, centroids, /*allow_double_x=*/true);
  if (x.size(0) == 0) return {labels, values};
  if (values.scalar_type() == at::kDouble) {
    assign_tiles<double>(x, centroids, metric, labels, values);
  } else if (x.size(1) >= 1 && x.size(1) <= kFusedMaxD) {
    assign_fused_float(x, centroids, metric, labels, values);
  } else {
    assign_tiles<float>(x, centroids, metric, labels, values);
  }
  return {labels, values};
}

// Columns of the sums one task owns.
constexpr int64_t kColumnBlock = 64;

template <typename scalar_t, typename out_t>
void update_sums(const scalar_t* xp, int64_t d, const std::vector<int64_t>& order,
                 const std::vector<int64_t>& start, int64_t k, out_t* sums) {
  const int64_t col_blocks = (d + kColumnBlock - 1) / kColumnBlock;
  at::parallel_for(0, k * col_blocks, 1, [&](int64_t begin, int64_t end) {
    double total[kColumnBlock];
    double segment[kColumnBlock];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t cluster = task / col_blocks;
      const int64_t c0 = (task % col_blocks) * kColumnBlock;
      const int64_t width = std::min(kColumnBlock, d - c0);
      std::fill(total, total + width, 0.0);
      for (int64_t s0 = start[cluster]; s0 < start[cluster + 1]; s0 += kmeans::kUpdateSegment) {
        const int64_t s1 = std::min(s0 + kmeans::kUpdateSegment, start[cluster + 1]);
        std::fill(segment, segment + width, 0.0);
        for (int64_t m = s0; m < s1; ++m) {
          const scalar_t* row = xp + order[m] * d + c0;
          for (int64_t j = 0; j < width; ++j) segment[j] += static_cast<double>(row[j]);
        }
        for (int64_t j = 0; j < width; ++j) total[j] += segment[j];
      }
      out_t* dst = sums + cluster * d + c0;
      for (int64_t j = 0; j < width; ++j) dst[j] = static_cast<out_t>(total[j]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> kmeans_update_cpu(const at::Tensor& x_in,
                                                     const at::Tensor& labels_in, int64_t k) {
  kmeans::update_check(x_in, labels_in, k, /*allow_double=*/true);
  const int64_t n = x_in.size(0), d = x_in.size(1);
  const auto sum_type = x_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor sums = at::zeros({k, d}, x_in.options().dtype(sum_type));
  at::Tensor counts = at::zeros({k}, labels_in.options());
  if (n == 0) return {sums, counts};
  const at::Tensor labels = labels_in.contiguous();
  const int64_t* lp = labels.data_ptr<int64_t>();
  int64_t* cp = counts.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(lp[i] >= 0 && lp[i] < k, "labels must lie in [0, k) with k = ", k,
                ", got labels[", i, "] = ", lp[i]);
    ++cp[lp[i]];
  }
  // Stable counting sort: each cluster's rows in increasing row order.
  std::vector<int64_t> start(k + 1, 0);
  for (int64_t c = 0; c < k; ++c) start[c + 1] = start[c] + cp[c];
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  std::vector<int64_t> order(n);
  for (int64_t i = 0; i < n; ++i) order[fill[lp[i]]++] = i;
  if (d == 0) return {sums, counts};
  const at::Tensor x = x_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "kmeans_update_cpu", [&] {
    if (sum_type == at::kDouble) {
      update_sums<scalar_t, double>(x.data_ptr<scalar_t>(), d, order, start, k,
                                    sums.data_ptr<double>());
    } else {
      update_sums<scalar_t, float>(x.data_ptr<scalar_t>(), d, order, start, k,
                                   sums.data_ptr<float>());
    }
  });
  return {sums, counts};
}

}  // namespace

std::string kmeans_cpu_kernel() { return pick_micro_kernel().name; }

TORCH_LIBRARY_IMPL(lusscore, CPU, m) {
  m.impl("kmeans_assign", &kmeans_assign_cpu);
  m.impl("kmeans_update", &kmeans_update_cpu);
}

}  // namespace lusscore
