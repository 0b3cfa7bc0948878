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

std::tuple<at::Tensor, at::Tensor> kmeans_assign_cpu(const at::Tensor& x,
                                                     const at::Tensor& centroids,
                                                     c10::string_view metric_name) {
  const Metric metric = kmeans::parse_metric(metric_name);
  auto [labels, values] = kmeans::assign_prepare(x, centroids, /*allow_double=*/true);
  if (x.size(0) == 0) return {labels, values};
  if (values.scalar_type() == at::kDouble) {
    assign_tiles<double>(x, centroids, metric, labels, values);
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
