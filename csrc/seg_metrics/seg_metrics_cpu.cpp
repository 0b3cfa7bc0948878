#include <ATen/Dispatch_v2.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "seg_metrics/seg_metrics_common.h"
#include "seg_metrics/seg_metrics_kernel.h"

namespace lusscore {
namespace {

// inner[x] = 1 when the (2d+1)^2 window around x lies inside the image and holds only L(x):
// the complement of the boundary band of every label at once. O(H*W) for any d: a window is
// uniform iff its row segments are uniform (run lengths along the row reach d on both sides)
// and those rows continue the same label (run lengths along the column of that property).
template <typename T>
void band_interior(const T* label, int64_t h, int64_t w, int64_t d, uint8_t* inner,
                   std::vector<uint8_t>& row_ok, std::vector<uint8_t>& up_ok) {
  const int64_t n = h * w;
  if (2 * d >= h || 2 * d >= w) {  // every pixel is within d of the border
    std::fill(inner, inner + n, 0);
    return;
  }
  row_ok.resize(n);
  up_ok.resize(n);
  uint8_t* rok = row_ok.data();
  uint8_t* uok = up_ok.data();
  // Serial on purpose: one map is ~1 ms, and callers parallelise across images (decoding
  // workers, batches); per-map thread barriers cost more than they save on busy machines.
  // Rows: a pixel's row segment [x-d, x+d] is uniform iff its run [a, b] covers it, i.e.
  // a + d <= x <= b - d.
  std::fill(rok, rok + n, 0);
  for (int64_t y = 0; y < h; ++y) {
    const T* row = label + y * w;
    uint8_t* ok = rok + y * w;
    int64_t a = 0;
    for (int64_t x = 1; x <= w; ++x) {
      if (x == w || row[x] != row[a]) {
        if (x - 1 - d >= a + d) std::fill(ok + a + d, ok + x - d, 1);
        a = x;
      }
    }
  }
  // Columns: run lengths of row-uniform pixels continuing the same label, up then down
  // (branch-free so that the compiler vectorises across x).
  std::vector<int32_t> run(w, 0);
  const int32_t dd = static_cast<int32_t>(d);
  for (int64_t x = 0; x < w; ++x) uok[x] = 0;  // row 0: nothing above
  for (int64_t y = 1; y < h; ++y) {
    const int64_t o = y * w;
    const uint8_t* r0 = rok + o;
    const uint8_t* r1 = rok + o - w;
    const T* l0 = label + o;
    const T* l1 = label + o - w;
    uint8_t* u = uok + o;
    for (int64_t x = 0; x < w; ++x) {
      const int32_t cont = (r0[x] & r1[x]) & static_cast<int32_t>(l0[x] == l1[x]);
      run[x] = (run[x] + 1) * cont;
      u[x] = static_cast<uint8_t>(r0[x] & static_cast<uint8_t>(run[x] >= dd));
    }
  }
  std::fill(run.begin(), run.end(), 0);
  for (int64_t x = 0; x < w; ++x) inner[(h - 1) * w + x] = 0;  // last row: nothing below
  for (int64_t y = h - 2; y >= 0; --y) {
    const int64_t o = y * w;
    const uint8_t* r0 = rok + o;
    const uint8_t* r1 = rok + o + w;
    const T* l0 = label + o;
    const T* l1 = label + o + w;
    const uint8_t* u = uok + o;
    uint8_t* in = inner + o;
    for (int64_t x = 0; x < w; ++x) {
      const int32_t cont = (r0[x] & r1[x]) & static_cast<int32_t>(l0[x] == l1[x]);
      run[x] = (run[x] + 1) * cont;
      in[x] = static_cast<uint8_t>(u[x] & static_cast<uint8_t>(run[x] >= dd));
    }
  }
}

struct Accumulators {
  int64_t* region;    // (5, R+1, C+1)
  int64_t* boundary;  // (5, R+1, C+2)
  int64_t rows, num_classes;
};

template <typename T>
void update_image(const T* pred_in, const T* gt, int64_t h, int64_t w, int64_t ignore,
                  double ratio, const int64_t* lut, int64_t lut_size, const Accumulators& acc,
                  int64_t* pred_stats, int64_t* gt_hist) {
  const int64_t n = h * w, c = acc.num_classes, rows = acc.rows;
  const int64_t d = seg::band_dilation(h, w, ratio);
  // Relabel first (PASS variant: bands of the relabelled prediction).
  std::vector<int64_t> relabelled;
  if (lut != nullptr) {
    relabelled.resize(n);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t v = static_cast<int64_t>(pred_in[i]);
      relabelled[i] = (v >= 0 && v < lut_size) ? lut[v] : v;
    }
  }
  std::vector<uint8_t> inner_p(n), inner_g(n), row_ok, up_ok;
  if (lut != nullptr) {
    band_interior(relabelled.data(), h, w, d, inner_p.data(), row_ok, up_ok);
  } else {
    band_interior(pred_in, h, w, d, inner_p.data(), row_ok, up_ok);
  }
  band_interior(gt, h, w, d, inner_g.data(), row_ok, up_ok);
  auto pred_at = [&](int64_t i) -> int64_t {
    return lut != nullptr ? relabelled[i] : static_cast<int64_t>(pred_in[i]);
  };

  // Pass 1: per-image histograms.
  std::fill(pred_stats, pred_stats + 2 * (rows + 1), 0);
  std::fill(gt_hist, gt_hist + c + 2, 0);
  int64_t* pred_hist = pred_stats;
  int64_t* pred_fg_hist = pred_stats + rows + 1;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t g = static_cast<int64_t>(gt[i]);
    if (g == ignore) continue;
    const int64_t r = seg::pred_row(pred_at(i), rows);
    gt_hist[(g >= 0 && g <= c) ? g : c + 1]++;
    pred_hist[r]++;
    if (g != 0) pred_fg_hist[r]++;
  }
  int64_t valid = 0;
  for (int64_t k = 0; k <= c + 1; ++k) valid += gt_hist[k];
  std::vector<int8_t> bucket(c + 1, seg::kNoBucket);
  int nonempty[4];
  int num_nonempty = 0;
  bool used[4] = {false, false, false, false};
  for (int64_t k = 1; k <= c; ++k) {
    if (gt_hist[k] > 0) {
      bucket[k] = static_cast<int8_t>(seg::size_bucket(gt_hist[k], valid));
      used[bucket[k]] = true;
    }
  }
  for (int b = 0; b < 4; ++b) {
    if (used[b]) nonempty[num_nonempty++] = b;
  }

  // Pass 2: region and boundary confusions, for all pixels and per size bucket.
  const int64_t rstride = (rows + 1) * (c + 1), bstride = (rows + 1) * (c + 2);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t g = static_cast<int64_t>(gt[i]);
    if (g == ignore || g < 0 || g > c) continue;
    const int64_t r = seg::pred_row(pred_at(i), rows);
    const int64_t rb = (!inner_p[i] && r < rows) ? r : rows;
    const int64_t cb = !inner_g[i] ? g : c + 1;
    const int64_t ri = r * (c + 1) + g, bi = rb * (c + 2) + cb;
    acc.region[ri]++;
    acc.boundary[bi]++;
    if (g != 0) {
      const int64_t s = 1 + bucket[g];
      acc.region[s * rstride + ri]++;
      acc.boundary[s * bstride + bi]++;
    } else {
      for (int k = 0; k < num_nonempty; ++k) {
        const int64_t s = 1 + nonempty[k];
        acc.region[s * rstride + ri]++;
        acc.boundary[s * bstride + bi]++;
      }
    }
  }
}

void seg_metrics_update_cpu(const at::Tensor& pred, const at::Tensor& gt, int64_t num_classes,
                            int64_t ignore_index, double boundary_ratio,
                            const c10::optional<at::Tensor>& pred_lut, const at::Tensor& region_conf,
                            const at::Tensor& boundary_conf, const at::Tensor& pred_stats,
                            const at::Tensor& gt_hist) {
  const SegMetricsShape shape = seg_metrics_check(pred, gt, num_classes, boundary_ratio, pred_lut,
                                                  region_conf, boundary_conf, pred_stats, gt_hist);
  if (shape.batch == 0) return;
  auto [p, g] = seg_metrics_inputs(pred, gt);
  at::Tensor lut;
  if (pred_lut.has_value()) lut = pred_lut->contiguous();
  const Accumulators acc{region_conf.data_ptr<int64_t>(), boundary_conf.data_ptr<int64_t>(),
                         shape.rows, num_classes};
  const int64_t hw = shape.height * shape.width;
  // Every integer dtype seg_metrics_check admits, the unsigned 16/32/64-bit ones included (as
  // on CUDA, ids are compared as int64).
  AT_DISPATCH_V2(p.scalar_type(), "seg_metrics_update_cpu", AT_WRAP([&] {
    const scalar_t* pp = p.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    for (int64_t b = 0; b < shape.batch; ++b) {
      update_image<scalar_t>(pp + b * hw, gp + b * hw, shape.height, shape.width, ignore_index,
                             boundary_ratio, lut.defined() ? lut.data_ptr<int64_t>() : nullptr,
                             lut.defined() ? lut.numel() : 0, acc,
                             pred_stats.data_ptr<int64_t>() + b * 2 * (shape.rows + 1),
                             gt_hist.data_ptr<int64_t>() + b * (num_classes + 2));
    }
  }), AT_EXPAND(AT_INTEGRAL_TYPES_V2));
}

}  // namespace

TORCH_LIBRARY_IMPL(lusscore, CPU, m) { m.impl("seg_metrics_update_", &seg_metrics_update_cpu); }

}  // namespace lusscore
