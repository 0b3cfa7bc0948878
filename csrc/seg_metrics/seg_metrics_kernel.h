// ATen-free math of seg_metrics_update_, shared by the CPU and CUDA kernels.
//
// Accumulator layout (all int64, added to, never cleared by the op):
//   region_conf   (5, R+1, C+1): [set][pred row][gt id] pixel counts over valid pixels.
//   boundary_conf (5, R+1, C+2): [set][pred band row][gt band col]; pred band row = raw id
//                 when the pixel is in the prediction's band, R otherwise; gt band col = gt id
//                 when in the GT's band, C+1 otherwise.
//   set 0 = every valid pixel; set 1 + b = the pixels of size bucket b (S, MS, ML, L):
//   GT pixels of the classes of bucket b in this image plus the image's 'other' pixels.
//   pred row = the raw predicted id when 0 <= id < R, else R (out of range).
// Per-image outputs (overwritten): pred_stats (B, 2, R+1) = histogram of pred rows over valid
// pixels, and over valid pixels with GT != 0; gt_hist (B, C+2) = GT histogram over valid
// pixels, column C+1 counting GT ids outside 0..C.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/host_device.h"

namespace lusscore {
namespace seg {

constexpr int kNumSets = 5;     // all pixels + four size buckets
constexpr int kNoBucket = -1;

// Dilation of the boundary band: max(1, round_half_even(ratio * diagonal)), as Python's round.
// Any d >= max(H, W) puts every pixel in the band, so d is capped there: a huge (or infinite)
// ratio gives the all-band result instead of an out-of-range float-to-int conversion.
inline int64_t band_dilation(int64_t h, int64_t w, double ratio) {
  const double x = ratio * std::sqrt(static_cast<double>(h) * h + static_cast<double>(w) * w);
  const int64_t cap = h > w ? h : w;
  if (x >= static_cast<double>(cap)) return cap < 1 ? 1 : cap;
  const int64_t d = static_cast<int64_t>(std::nearbyint(x));  // default mode: half to even
  return d < 1 ? 1 : d;
}

// Size bucket of a GT class with n of N valid pixels: s = ceil(100 * n / N) in float32, as the
// official `math.ceil(100.0 * counts[c] / sum(counts))` on float32 tensors.
LUSSCORE_HOST_DEVICE inline int size_bucket(int64_t n, int64_t total) {
#ifdef __CUDA_ARCH__
  const float share = __fdiv_rn(__fmul_rn(static_cast<float>(n), 100.0f), static_cast<float>(total));
#else
  volatile float scaled = static_cast<float>(n) * 100.0f;  // volatile: no fused/extended math
  volatile float share = scaled / static_cast<float>(total);
#endif
  const float s = ceilf(share);
  if (s <= 5.0f) return 0;
  if (s <= 25.0f) return 1;
  if (s <= 50.0f) return 2;
  return 3;
}

// Row of a predicted id in the accumulators: the id itself when 0 <= id < rows, else rows.
LUSSCORE_HOST_DEVICE inline int64_t pred_row(int64_t id, int64_t rows) {
  return (id >= 0 && id < rows) ? id : rows;
}

}  // namespace seg
}  // namespace lusscore
