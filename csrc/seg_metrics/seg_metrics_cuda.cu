// CUDA seg_metrics_update_. The band test runs as prefix sums (O(H*W) for any d): a pixel is
// inside (not band) iff no label change lies in its row window (horizontal change counts) for
// all 2d+1 rows of its window, and the label does not change down the window's column.
// Counts go to global int64 accumulators through warp-aggregated atomics (a warp's pixels
// mostly share a cell: background, object interiors).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/cuda_utils.cuh"
#include "seg_metrics/seg_metrics_common.h"
#include "seg_metrics/seg_metrics_kernel.h"

namespace lusscore {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;

// Add 1 at base[idx] for every active lane, one atomic per distinct idx in the warp.
// Every lane of the warp must call it (inactive lanes pass active = false).
__device__ __forceinline__ void warp_add(int64_t* base, int64_t idx, bool active) {
  const long long key = active ? idx : -1;
  const unsigned peers = __match_any_sync(kFullMask, key);
  const int lane = threadIdx.x & 31;
  if (active && lane == __ffs(peers) - 1) {
    atomicAdd(reinterpret_cast<unsigned long long*>(base + idx),
              static_cast<unsigned long long>(__popc(peers)));
  }
}

// Horizontal label changes: 1 where L(y, x) != L(y, x-1).
__global__ void horizontal_changes_kernel(const int64_t* __restrict__ label,
                                          int32_t* __restrict__ change, int64_t total,
                                          int64_t w) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(blockDim.x) * gridDim.x) {
    const int64_t x = i % w;
    change[i] = (x > 0 && label[i] != label[i - 1]) ? 1 : 0;
  }
}

// bad = the row window around (y, x) is not uniform (or leaves the image); vchange = label
// differs from the pixel above.
__global__ void row_window_kernel(const int64_t* __restrict__ label,
                                  const int32_t* __restrict__ hprefix, int32_t* __restrict__ bad,
                                  int32_t* __restrict__ vchange, int64_t total, int64_t h,
                                  int64_t w, int64_t d) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(blockDim.x) * gridDim.x) {
    const int64_t x = i % w, y = (i / w) % h;
    const bool uniform = x >= d && x < w - d && hprefix[i + d] == hprefix[i - d];
    bad[i] = uniform ? 0 : 1;
    vchange[i] = (y > 0 && label[i] != label[i - w]) ? 1 : 0;
  }
}

__device__ __forceinline__ bool in_band(const int32_t* __restrict__ bad_prefix,
                                        const int32_t* __restrict__ vprefix, int64_t i,
                                        int64_t y, int64_t h, int64_t w, int64_t d) {
  if (y < d || y >= h - d) return true;
  const int32_t bad_before = (y - d - 1 >= 0) ? bad_prefix[i - (d + 1) * w] : 0;
  const bool rows_uniform = bad_prefix[i + d * w] == bad_before;
  const bool same_label = vprefix[i + d * w] == vprefix[i - d * w];
  return !(rows_uniform && same_label);
}

// Per-image histograms: gt_hist (B, C+2) and pred_stats (B, 2, R+1).
__global__ void image_hist_kernel(const int64_t* __restrict__ pred, const int64_t* __restrict__ gt,
                                  int64_t* __restrict__ pred_stats, int64_t* __restrict__ gt_hist,
                                  int64_t total, int64_t hw, int64_t c, int64_t rows,
                                  int64_t ignore) {
  for (int64_t start = blockIdx.x * int64_t(blockDim.x); start < total;
       start += int64_t(blockDim.x) * gridDim.x) {
    const int64_t i = start + threadIdx.x;
    const bool in = i < total;
    const int64_t g = in ? gt[i] : ignore;
    const bool valid = in && g != ignore;
    const int64_t b = in ? i / hw : 0;
    const int64_t r = seg::pred_row(in ? pred[i] : 0, rows);
    const int64_t col = (g >= 0 && g <= c) ? g : c + 1;
    warp_add(gt_hist, b * (c + 2) + col, valid);
    warp_add(pred_stats, b * 2 * (rows + 1) + r, valid);
    warp_add(pred_stats, b * 2 * (rows + 1) + rows + 1 + r, valid && g != 0);
  }
}

// Size bucket of each GT class of each image (one block per image) and the non-empty mask.
__global__ void bucket_kernel(const int64_t* __restrict__ gt_hist, int8_t* __restrict__ bucket,
                              int32_t* __restrict__ nonempty, int64_t c) {
  __shared__ unsigned long long valid;
  __shared__ int mask;
  const int64_t b = blockIdx.x;
  const int64_t* hist = gt_hist + b * (c + 2);
  if (threadIdx.x == 0) {
    valid = 0;
    mask = 0;
  }
  __syncthreads();
  unsigned long long part = 0;
  for (int64_t k = threadIdx.x; k < c + 2; k += blockDim.x) part += hist[k];
  atomicAdd(&valid, part);
  __syncthreads();
  for (int64_t k = threadIdx.x; k <= c; k += blockDim.x) {
    int8_t bk = seg::kNoBucket;
    if (k > 0 && hist[k] > 0) {
      bk = static_cast<int8_t>(seg::size_bucket(hist[k], static_cast<int64_t>(valid)));
      atomicOr(&mask, 1 << bk);
    }
    bucket[b * (c + 1) + k] = bk;
  }
  __syncthreads();
  if (threadIdx.x == 0) nonempty[b] = mask;
}

struct BandPrefix {
  const int32_t* bad;
  const int32_t* vchange;
};

__global__ void accumulate_kernel(const int64_t* __restrict__ pred, const int64_t* __restrict__ gt,
                                  BandPrefix pred_band, BandPrefix gt_band, bool all_band,
                                  const int8_t* __restrict__ bucket,
                                  const int32_t* __restrict__ nonempty,
                                  int64_t* __restrict__ region, int64_t* __restrict__ boundary,
                                  int64_t total, int64_t h, int64_t w, int64_t d, int64_t c,
                                  int64_t rows, int64_t ignore) {
  const int64_t hw = h * w;
  const int64_t rstride = (rows + 1) * (c + 1), bstride = (rows + 1) * (c + 2);
  for (int64_t start = blockIdx.x * int64_t(blockDim.x); start < total;
       start += int64_t(blockDim.x) * gridDim.x) {
    const int64_t i = start + threadIdx.x;
    const bool in = i < total;
    const int64_t g = in ? gt[i] : ignore;
    const bool valid = in && g != ignore && g >= 0 && g <= c;
    int64_t ri = 0, bi = 0, b = 0;
    if (valid) {
      b = i / hw;
      const int64_t y = (i / w) % h;
      const int64_t r = seg::pred_row(pred[i], rows);
      const bool bp = all_band || in_band(pred_band.bad, pred_band.vchange, i, y, h, w, d);
      const bool bg = all_band || in_band(gt_band.bad, gt_band.vchange, i, y, h, w, d);
      const int64_t rb = (bp && r < rows) ? r : rows;
      const int64_t cb = bg ? g : c + 1;
      ri = r * (c + 1) + g;
      bi = rb * (c + 2) + cb;
    }
    warp_add(region, ri, valid);
    warp_add(boundary, bi, valid);
    const int own = valid && g > 0 ? bucket[b * (c + 1) + g] : -1;
    const int mask = valid && g == 0 ? nonempty[b] : 0;
    for (int s = 0; s < 4; ++s) {
      const bool hit = valid && (g > 0 ? own == s : ((mask >> s) & 1));
      warp_add(region, (1 + s) * rstride + ri, hit);
      warp_add(boundary, (1 + s) * bstride + bi, hit);
    }
  }
}

void seg_metrics_update_cuda(const at::Tensor& pred, const at::Tensor& gt, int64_t num_classes,
                             int64_t ignore_index, double boundary_ratio,
                             const c10::optional<at::Tensor>& pred_lut,
                             const at::Tensor& region_conf, const at::Tensor& boundary_conf,
                             const at::Tensor& pred_stats, const at::Tensor& gt_hist) {
  const c10::cuda::CUDAGuard guard(pred.device());
  const SegMetricsShape shape = seg_metrics_check(pred, gt, num_classes, boundary_ratio, pred_lut,
                                                  region_conf, boundary_conf, pred_stats, gt_hist);
  pred_stats.zero_();
  gt_hist.zero_();
  const int64_t h = shape.height, w = shape.width, batch = shape.batch;
  const int64_t total = batch * h * w;
  if (total == 0) return;
  auto [p, g] = seg_metrics_inputs(pred, gt);
  // Any integer dtype the check admits: the kernels read int64 ids (the CPU casts the same way).
  at::Tensor pl = p.to(at::kLong);
  if (pred_lut.has_value() && pred_lut->numel() > 0) {
    const at::Tensor lut = pred_lut->contiguous();
    const int64_t n = lut.numel();
    const at::Tensor inside = pl.ge(0).logical_and(pl.lt(n));
    const at::Tensor mapped = lut.index_select(0, pl.clamp(0, n - 1).reshape(-1)).view(pl.sizes());
    pl = at::where(inside, mapped, pl);
  }
  const at::Tensor labels = at::stack({pl, g.to(at::kLong)}).contiguous();  // (2, B, H, W)
  const int64_t d = seg::band_dilation(h, w, boundary_ratio);
  const bool all_band = 2 * d >= h || 2 * d >= w;
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t both = 2 * total;
  at::Tensor bad_prefix, v_prefix;
  if (!all_band) {
    at::Tensor change = at::empty_like(labels, labels.options().dtype(at::kInt));
    horizontal_changes_kernel<<<capped_blocks(both), kThreads, 0, stream>>>(
        labels.data_ptr<int64_t>(), change.data_ptr<int32_t>(), both, w);
    LUSSCORE_CUDA_CHECK_LAUNCH();
    const at::Tensor h_prefix = at::cumsum(change, -1, at::kInt);
    at::Tensor bad = at::empty_like(change), vchange = at::empty_like(change);
    row_window_kernel<<<capped_blocks(both), kThreads, 0, stream>>>(
        labels.data_ptr<int64_t>(), h_prefix.data_ptr<int32_t>(), bad.data_ptr<int32_t>(),
        vchange.data_ptr<int32_t>(), both, h, w, d);
    LUSSCORE_CUDA_CHECK_LAUNCH();
    bad_prefix = at::cumsum(bad, -2, at::kInt).contiguous();
    v_prefix = at::cumsum(vchange, -2, at::kInt).contiguous();
  }
  const int64_t* pred_ptr = labels.data_ptr<int64_t>();
  const int64_t* gt_ptr = pred_ptr + total;
  image_hist_kernel<<<capped_blocks(total), kThreads, 0, stream>>>(
      pred_ptr, gt_ptr, pred_stats.data_ptr<int64_t>(), gt_hist.data_ptr<int64_t>(), total, h * w,
      num_classes, shape.rows, ignore_index);
  LUSSCORE_CUDA_CHECK_LAUNCH();
  at::Tensor bucket = at::empty({batch, num_classes + 1}, labels.options().dtype(at::kChar));
  at::Tensor nonempty = at::empty({batch}, labels.options().dtype(at::kInt));
  bucket_kernel<<<batch, kThreads, 0, stream>>>(gt_hist.data_ptr<int64_t>(),
                                                bucket.data_ptr<int8_t>(),
                                                nonempty.data_ptr<int32_t>(), num_classes);
  LUSSCORE_CUDA_CHECK_LAUNCH();
  BandPrefix pred_band{nullptr, nullptr}, gt_band{nullptr, nullptr};
  if (!all_band) {
    pred_band = {bad_prefix.data_ptr<int32_t>(), v_prefix.data_ptr<int32_t>()};
    gt_band = {pred_band.bad + total, pred_band.vchange + total};
  }
  accumulate_kernel<<<capped_blocks(total), kThreads, 0, stream>>>(
      pred_ptr, gt_ptr, pred_band, gt_band, all_band, bucket.data_ptr<int8_t>(),
      nonempty.data_ptr<int32_t>(), region_conf.data_ptr<int64_t>(),
      boundary_conf.data_ptr<int64_t>(), total, h, w, d, num_classes, shape.rows, ignore_index);
  LUSSCORE_CUDA_CHECK_LAUNCH();
}

}  // namespace

TORCH_LIBRARY_IMPL(lusscore, CUDA, m) { m.impl("seg_metrics_update_", &seg_metrics_update_cuda); }

}  // namespace lusscore
