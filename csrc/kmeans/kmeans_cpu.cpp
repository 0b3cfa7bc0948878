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
        double partial[kmeans::kCanonicalLanes];
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
            for (int l = 0; l < kmeans::kCanonicalLanes; ++l) {
              partial[l] = kmeans::canonical_partial(metric, xp + i * d, cp + (k0 + jj) * d, d, l);
            }
            const double exact = kmeans::canonical_score_host(metric, partial);
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

// ---- Fused float path: a register-blocked GEMM micro-kernel writes the scores of a few rows
// against all centroids into a small per-thread buffer (L1/L2-resident), tracking each row's
// minimum on the way; then the candidates within the margin are re-scored exactly. It replaces
// BLAS for float because the BLAS torch ships may run a generic path on some CPUs (MKL on AMD
// ran at half of OpenBLAS's speed here) and because the epilogue then costs no extra pass.

constexpr int kPanel = 32;           // centroids per packed panel
constexpr int64_t kFusedMaxD = 1024;  // beyond this the packed centroids leave L2: BLAS path

#if defined(__GNUC__) && !defined(__clang__)
#define LUSSCORE_INLINE inline __attribute__((always_inline))
#else
#define LUSSCORE_INLINE inline
#endif

typedef float float16v __attribute__((vector_size(64)));
typedef float float8v __attribute__((vector_size(32)));
typedef float float4v __attribute__((vector_size(16)));
template <int W> struct FloatVec;
template <> struct FloatVec<16> { using type = float16v; };
template <> struct FloatVec<8> { using type = float8v; };
template <> struct FloatVec<4> { using type = float4v; };

// Scores of MR rows of x (row stride d) against every packed panel: out[r][j] =
// bias[j] - scale * x_r.c_j, and row_min[r] = min_j out[r][j]. W floats per vector.
template <int MR, int W, bool kBroadcastFirst>
LUSSCORE_INLINE void score_rows_body(const float* x, int64_t d, const float* packed,
                                     const float* bias, float scale, int64_t panels, float* out,
                                     float* row_min) {
  using vec = typename FloatVec<W>::type;
  constexpr int NV = kPanel / W;
  const int64_t ld = panels * kPanel;
  vec mins[MR];
  for (int r = 0; r < MR; ++r)
    for (int l = 0; l < W; ++l) mins[r][l] = std::numeric_limits<float>::infinity();
  for (int64_t p = 0; p < panels; ++p) {
    vec acc[MR][NV];
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) acc[r][v] = vec{};
    const float* bp = packed + p * d * kPanel;
    for (int64_t j = 0; j < d; ++j) {
      if constexpr (kBroadcastFirst) {  // MR broadcasts + 1 vector of centroids live
        vec a[MR];
        for (int r = 0; r < MR; ++r) a[r] = x[r * d + j] - vec{};  // a broadcast (x - 0 is x)
        for (int v = 0; v < NV; ++v) {
          vec b;
          std::memcpy(&b, bp + j * kPanel + v * W, sizeof(vec));
          for (int r = 0; r < MR; ++r) acc[r][v] += a[r] * b;
        }
      } else {  // NV vectors of centroids + 1 broadcast live
        vec b[NV];
        for (int v = 0; v < NV; ++v) std::memcpy(&b[v], bp + j * kPanel + v * W, sizeof(vec));
        for (int r = 0; r < MR; ++r) {
          const vec a = x[r * d + j] - vec{};
          for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
        }
      }
    }
    for (int v = 0; v < NV; ++v) {
      vec bv;
      std::memcpy(&bv, bias + p * kPanel + v * W, sizeof(vec));
      for (int r = 0; r < MR; ++r) {
        const vec s = bv - scale * acc[r][v];
        std::memcpy(out + r * ld + p * kPanel + v * W, &s, sizeof(vec));
        mins[r] = s < mins[r] ? s : mins[r];
      }
    }
  }
  for (int r = 0; r < MR; ++r) {
    float m = mins[r][0];
    for (int l = 1; l < W; ++l) m = mins[r][l] < m ? mins[r][l] : m;
    row_min[r] = m;
  }
}

using ScoreRowsFn = void (*)(const float*, int64_t, const float*, const float*, float, int64_t,
                             float*, float*);

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
constexpr int kRowsAvx512 = 12;  // 12 rows x 2 zmm accumulators
constexpr int kRowsAvx2 = 3;     // 3 rows x 4 ymm accumulators (16 registers)
__attribute__((target("arch=x86-64-v4"))) void score_rows_avx512(
    const float* x, int64_t d, const float* packed, const float* bias, float scale, int64_t panels,
    float* out, float* row_min) {
  score_rows_body<kRowsAvx512, 16, false>(x, d, packed, bias, scale, panels, out, row_min);
}
__attribute__((target("arch=x86-64-v3"))) void score_rows_avx2(
    const float* x, int64_t d, const float* packed, const float* bias, float scale, int64_t panels,
    float* out, float* row_min) {
  score_rows_body<kRowsAvx2, 8, true>(x, d, packed, bias, scale, panels, out, row_min);
}
#endif
constexpr int kRowsGeneric = 4;
void score_rows_generic(const float* x, int64_t d, const float* packed, const float* bias,
                        float scale, int64_t panels, float* out, float* row_min) {
  score_rows_body<kRowsGeneric, 4, false>(x, d, packed, bias, scale, panels, out, row_min);
}

// The widest micro-kernel this CPU runs, and its rows per call. LUSSCORE_KMEANS_CPU_KERNEL=
// avx2|generic caps the choice (read once per process; the tests run every variant).
std::pair<ScoreRowsFn, int> pick_score_rows() {
  const char* env = std::getenv("LUSSCORE_KMEANS_CPU_KERNEL");
  const std::string cap = env == nullptr ? "" : env;
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  __builtin_cpu_init();
  if (cap != "avx2" && cap != "generic" && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl")) {
    return {&score_rows_avx512, kRowsAvx512};
  }
  if (cap != "generic" && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return {&score_rows_avx2, kRowsAvx2};
  }
#endif
  return {&score_rows_generic, kRowsGeneric};
}

// x: float32 / bf16 / fp16 rows (widened exactly to float per block of rows).
void assign_fused_float(const at::Tensor& x_in, const at::Tensor& centroids, Metric metric,
                        at::Tensor& labels, at::Tensor& values) {
  const int64_t n = x_in.size(0), k = centroids.size(0), d = x_in.size(1);
  static const std::pair<ScoreRowsFn, int> picked = pick_score_rows();
  const ScoreRowsFn score_rows = picked.first;
  const int mr = picked.second;
  const at::Tensor c = centroids.to(at::kFloat).contiguous();
  const float* cp = c.data_ptr<float>();
  const at::Tensor cnorm_t = c.square().sum(1);
  const float* cnorm = cnorm_t.data_ptr<float>();
  const double cmax = std::sqrt(c.to(at::kDouble).square().sum(1).max().item<double>());
  const int64_t panels = (k + kPanel - 1) / kPanel, ld = panels * kPanel;
  // Panel p holds centroids 32p .. 32p + 31 as (D, 32); zero past K, where the bias is +inf
  // so those columns never win nor become candidates.
  std::vector<float> packed(static_cast<size_t>(ld * d), 0.f), bias(static_cast<size_t>(ld));
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t jj = 0; jj < kPanel && p * kPanel + jj < k; ++jj) {
        const float* src = cp + (p * kPanel + jj) * d;
        float* dst = packed.data() + p * d * kPanel + jj;
        for (int64_t j = 0; j < d; ++j) dst[j * kPanel] = src[j];
      }
    }
  });
  for (int64_t j = 0; j < ld; ++j) {
    bias[j] = j >= k ? std::numeric_limits<float>::infinity() : (metric == Metric::L2 ? cnorm[j] : 0.f);
  }
  const float scale = metric == Metric::L2 ? 2.f : 1.f;
  // One fp32 FMA chain per dot product (inputs exact) and fp32 norms and scores.
  constexpr double u_acc = 0x1p-24;
  const bool direct = x_in.scalar_type() == at::kFloat && x_in.is_contiguous();
  const at::Tensor x = x_in.contiguous();
  const float* xf = direct ? x.data_ptr<float>() : nullptr;
  int64_t* label_out = labels.data_ptr<int64_t>();
  float* value_out = values.data_ptr<float>();
  const int64_t blocks = (n + mr - 1) / mr;
  // A few blocks per task: each task reuses its score buffer, and threads balance well.
  const int64_t grain = std::max<int64_t>(1, std::min<int64_t>(16, blocks / (8 * at::get_num_threads())));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    std::vector<float> scores(static_cast<size_t>(mr * ld));
    std::vector<float> xpad;
    float row_min[16];
    double partial[kmeans::kCanonicalLanes];
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * mr;
      const int64_t rows = std::min<int64_t>(mr, n - r0);
      const float* xb;
      if (direct && rows == mr) {
        xb = xf + r0 * d;
      } else {  // widen (bf16/fp16) and zero-pad the last block's rows
        xpad.assign(static_cast<size_t>(mr * d), 0.f);
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "kmeans_widen", [&] {
          const scalar_t* src = x.data_ptr<scalar_t>() + r0 * d;
          for (int64_t i = 0; i < rows * d; ++i) xpad[i] = static_cast<float>(src[i]);
        });
        xb = xpad.data();
      }
      score_rows(xb, d, packed.data(), bias.data(), scale, panels, scores.data(), row_min);
      for (int64_t r = 0; r < rows; ++r) {
        const float* xr = xb + r * d;
        double sq = 0;
        for (int64_t j = 0; j < d; ++j) sq += double(xr[j]) * double(xr[j]);
        const double threshold = double(row_min[r]) + kmeans::refine_margin(std::sqrt(sq), cmax, d, 0.0, u_acc);
        const float* srow = scores.data() + r * ld;
        double best = std::numeric_limits<double>::infinity();
        int64_t best_index = 0;
        // Every centroid within the margin of the fast minimum is re-scored exactly; lowest
        // index wins exact ties. (A NaN row has no candidate: label 0, value inf/NaN as before.)
        for (int64_t j = 0; j < k; ++j) {
          if (!(double(srow[j]) <= threshold)) continue;
          for (int l = 0; l < kmeans::kCanonicalLanes; ++l) {
            partial[l] = kmeans::canonical_partial(metric, xr, cp + j * d, d, l);
          }
          const double exact = kmeans::canonical_score_host(metric, partial);
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

TORCH_LIBRARY_IMPL(lusscore, CPU, m) {
  m.impl("kmeans_assign", &kmeans_assign_cpu);
  m.impl("kmeans_update", &kmeans_update_cpu);
}

}  // namespace lusscore
