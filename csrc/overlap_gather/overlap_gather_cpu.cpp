#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "overlap_gather/overlap_gather_common.h"
#include "overlap_gather/overlap_gather_kernel.h"

namespace lusscore {
namespace {

constexpr int64_t kChannelBlock = 64;  // channels one task handles (inner, vectorisable loop)

// Tasks per thread chunk so that a chunk holds at least ~32k multiply-adds: tiny inputs run
// serially instead of paying for a parallel region.
int64_t grain_for(int64_t work_per_task) {
  return std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(1, work_per_task));
}

// Element strides of a dense (B, C, H, W) map, contiguous or channels-last.
struct MapStrides {
  int64_t batch, channel, row, col;
  MapStrides(int64_t C, int64_t H, int64_t W, bool channels_last)
      : batch(C * H * W),
        channel(channels_last ? 1 : H * W),
        row(channels_last ? W * C : W),
        col(channels_last ? C : 1) {}
};

// Taps of every pair for one view: [b][axis][k], axis 0 = x (width), 1 = y (height).
template <typename acc_t>
std::vector<OverlapTap<acc_t>> build_taps(const OverlapGeometry& geo, int view, int64_t B,
                                          int64_t H, int64_t W) {
  const int64_t S = geo.size;
  std::vector<OverlapTap<acc_t>> taps(B * 2 * S);
  at::parallel_for(0, B, 64, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int axis = 0; axis < 2; ++axis) {
        for (int64_t k = 0; k < S; ++k) {
          taps[(b * 2 + axis) * S + k] =
              overlap_geometry_tap<acc_t>(geo, b, view, axis, k, axis == 0 ? W : H);
        }
      }
    }
  });
  return taps;
}

template <typename scalar_t>
void gather_view(const at::Tensor& f, const at::Tensor& g, bool channels_last,
                 const OverlapGeometry& geo, int view) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = f.size(0), C = f.size(1), H = f.size(2), W = f.size(3), S = geo.size;
  const auto taps = build_taps<acc_t>(geo, view, B, H, W);
  const MapStrides in(C, H, W, channels_last), out(C, S, S, channels_last);
  const scalar_t* src = f.const_data_ptr<scalar_t>();
  scalar_t* dst = g.mutable_data_ptr<scalar_t>();
  const int64_t blocks = (C + kChannelBlock - 1) / kChannelBlock;
  const int64_t grain = grain_for(S * S * 4 * std::min(C, kChannelBlock));
  at::parallel_for(0, B * blocks, grain, [&](int64_t begin, int64_t end) {
    acc_t acc[kChannelBlock];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / blocks, c0 = (item % blocks) * kChannelBlock;
      const int64_t nc = std::min(kChannelBlock, C - c0);
      const OverlapTap<acc_t>* xt = &taps[(b * 2 + 0) * S];
      const OverlapTap<acc_t>* yt = &taps[(b * 2 + 1) * S];
      const scalar_t* fb = src + b * in.batch + c0 * in.channel;
      scalar_t* gb = dst + b * out.batch + c0 * out.channel;
      for (int64_t i = 0; i < S; ++i) {
        for (int64_t j = 0; j < S; ++j) {
          std::fill(acc, acc + nc, acc_t(0));
          // Tap order (y0,x0), (y0,x1), (y1,x0), (y1,x1), weights wx * wy as grid_sample.
          for (int ty = 0; ty < 2; ++ty) {
            const int64_t y = ty ? yt[i].i1 : yt[i].i0;
            if (y < 0) continue;
            const acc_t wy = ty ? yt[i].w1 : yt[i].w0;
            for (int tx = 0; tx < 2; ++tx) {
              const int64_t x = tx ? xt[j].i1 : xt[j].i0;
              if (x < 0) continue;
              const acc_t w = (tx ? xt[j].w1 : xt[j].w0) * wy;
              const scalar_t* p = fb + y * in.row + x * in.col;
              for (int64_t c = 0; c < nc; ++c) acc[c] += w * static_cast<acc_t>(p[c * in.channel]);
            }
          }
          scalar_t* q = gb + i * out.row + j * out.col;
          for (int64_t c = 0; c < nc; ++c) q[c * out.channel] = static_cast<scalar_t>(acc[c]);
        }
      }
    }
  });
}

// For each map index m along one axis, the first and last lattice points whose taps touch
// it (hi < lo when none): the backward gathers over that range only.
template <typename acc_t>
void touch_range(const OverlapTap<acc_t>* taps, int64_t S, int64_t m, int64_t* lo,
                 int64_t* hi) {
  *lo = 0;
  *hi = -1;
  for (int64_t k = 0; k < S; ++k) {
    if (overlap_tap_touches(taps[k], m)) {
      if (*hi < *lo) *lo = k;
      *hi = k;
    }
  }
}

// grad_f[y, x] = sum_i wy_i(y) * sum_j wx_j(x) * grad_g[i, j]: each input pixel gathers its
// contributions in a fixed order (the CUDA kernel uses the same order), so no two writers
// ever touch one element and the result is deterministic.
template <typename scalar_t>
void scatter_view(const at::Tensor& gg, const at::Tensor& gf, bool channels_last,
                  const OverlapGeometry& geo, int view) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = gf.size(0), C = gf.size(1), H = gf.size(2), W = gf.size(3), S = geo.size;
  const auto taps = build_taps<acc_t>(geo, view, B, H, W);
  const MapStrides in(C, S, S, channels_last), out(C, H, W, channels_last);
  const scalar_t* src = gg.const_data_ptr<scalar_t>();
  scalar_t* dst = gf.mutable_data_ptr<scalar_t>();
  const int64_t blocks = (C + kChannelBlock - 1) / kChannelBlock;
  const int64_t grain = grain_for(H * W * 4 * std::min(C, kChannelBlock));
  at::parallel_for(0, B * blocks, grain, [&](int64_t begin, int64_t end) {
    acc_t acc[kChannelBlock], row[kChannelBlock];
    std::vector<int64_t> xlo(W), xhi(W);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / blocks, c0 = (item % blocks) * kChannelBlock;
      const int64_t nc = std::min(kChannelBlock, C - c0);
      const OverlapTap<acc_t>* xt = &taps[(b * 2 + 0) * S];
      const OverlapTap<acc_t>* yt = &taps[(b * 2 + 1) * S];
      for (int64_t x = 0; x < W; ++x) touch_range(xt, S, x, &xlo[x], &xhi[x]);
      const scalar_t* gb = src + b * in.batch + c0 * in.channel;
      scalar_t* fb = dst + b * out.batch + c0 * out.channel;
      for (int64_t y = 0; y < H; ++y) {
        int64_t ylo, yhi;
        touch_range(yt, S, y, &ylo, &yhi);
        for (int64_t x = 0; x < W; ++x) {
          std::fill(acc, acc + nc, acc_t(0));
          for (int64_t i = ylo; i <= yhi; ++i) {
            if (!overlap_tap_touches(yt[i], y)) continue;
            const acc_t wy = overlap_tap_weight(yt[i], y);
            std::fill(row, row + nc, acc_t(0));
            for (int64_t j = xlo[x]; j <= xhi[x]; ++j) {
              if (!overlap_tap_touches(xt[j], x)) continue;
              const acc_t wx = overlap_tap_weight(xt[j], x);
              const scalar_t* p = gb + i * in.row + j * in.col;
              for (int64_t c = 0; c < nc; ++c) row[c] += wx * static_cast<acc_t>(p[c * in.channel]);
            }
            for (int64_t c = 0; c < nc; ++c) acc[c] += wy * row[c];
          }
          scalar_t* q = fb + y * out.row + x * out.col;
          for (int64_t c = 0; c < nc; ++c) q[c * out.channel] = static_cast<scalar_t>(acc[c]);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> overlap_gather_cpu(
    const at::Tensor& f1_in, const at::Tensor& f2_in, const at::Tensor& boxes1_in,
    const at::Tensor& boxes2_in, const at::Tensor& flips1_in, const at::Tensor& flips2_in,
    int64_t size, bool cell_centers) {
  overlap_check_features(f1_in, f2_in);
  check_device_type(f1_in, at::kCPU, "f1");
  overlap_check_pairs(f1_in, f1_in.size(0), boxes1_in, boxes2_in, flips1_in, flips2_in, size);
  auto [g1, g2, valid] = overlap_gather_outputs(f1_in, f2_in, size);
  const int64_t B = f1_in.size(0);
  if (B == 0) return {g1, g2, valid};
  const bool cl1 = overlap_is_channels_last(f1_in), cl2 = overlap_is_channels_last(f2_in);
  const at::Tensor f1 = overlap_dense(f1_in, cl1), f2 = overlap_dense(f2_in, cl2);
  const at::Tensor boxes1 = boxes1_in.contiguous(), boxes2 = boxes2_in.contiguous();
  const at::Tensor flips1 = flips1_in.contiguous(), flips2 = flips2_in.contiguous();
  const OverlapGeometry geo = overlap_geometry(boxes1, boxes2, flips1, flips2, size, cell_centers);
  bool* v = valid.mutable_data_ptr<bool>();
  for (int64_t b = 0; b < B; ++b) v[b] = overlap_geometry_valid(geo, b);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f1.scalar_type(), "overlap_gather_cpu",
                                  [&] {
                                    gather_view<scalar_t>(f1, g1, cl1, geo, 0);
                                    gather_view<scalar_t>(f2, g2, cl2, geo, 1);
                                  });
  return {g1, g2, valid};
}

std::tuple<at::Tensor, at::Tensor> overlap_gather_backward_cpu(
    const at::Tensor& grad_g1_in, const at::Tensor& grad_g2_in, const at::Tensor& boxes1_in,
    const at::Tensor& boxes2_in, const at::Tensor& flips1_in, const at::Tensor& flips2_in,
    int64_t height1, int64_t width1, int64_t height2, int64_t width2, int64_t size,
    bool cell_centers) {
  overlap_check_backward(grad_g1_in, grad_g2_in, size, height1, width1, height2, width2);
  check_device_type(grad_g1_in, at::kCPU, "grad_g1");
  overlap_check_pairs(grad_g1_in, grad_g1_in.size(0), boxes1_in, boxes2_in, flips1_in,
                      flips2_in, size);
  const bool cl1 = overlap_is_channels_last(grad_g1_in);
  const bool cl2 = overlap_is_channels_last(grad_g2_in);
  at::Tensor gf1 = overlap_grad_input(grad_g1_in, height1, width1, cl1);
  at::Tensor gf2 = overlap_grad_input(grad_g2_in, height2, width2, cl2);
  if (grad_g1_in.size(0) == 0) return {gf1, gf2};
  const at::Tensor gg1 = overlap_dense(grad_g1_in, cl1), gg2 = overlap_dense(grad_g2_in, cl2);
  const at::Tensor boxes1 = boxes1_in.contiguous(), boxes2 = boxes2_in.contiguous();
  const at::Tensor flips1 = flips1_in.contiguous(), flips2 = flips2_in.contiguous();
  const OverlapGeometry geo = overlap_geometry(boxes1, boxes2, flips1, flips2, size, cell_centers);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gg1.scalar_type(),
                                  "overlap_gather_backward_cpu", [&] {
                                    scatter_view<scalar_t>(gg1, gf1, cl1, geo, 0);
                                    scatter_view<scalar_t>(gg2, gf2, cl2, geo, 1);
                                  });
  return {gf1, gf2};
}

}  // namespace

TORCH_LIBRARY_IMPL(lusscore, CPU, m) {
  m.impl("overlap_gather", &overlap_gather_cpu);
  m.impl("overlap_gather_backward", &overlap_gather_backward_cpu);
}

}  // namespace lusscore
