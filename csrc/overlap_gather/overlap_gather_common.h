// Shape/dtype checks and output allocation of overlap_gather, shared by both devices.
#pragma once

#include <cstdint>
#include <limits>

#include "common/checks.h"
#include "overlap_gather/overlap_gather_kernel.h"

namespace lusscore {

// Largest lattice size: the kernels keep 2 x S taps per view in shared memory.
constexpr int64_t kOverlapMaxSize = 1024;

// A 4-D map is processed channels-last when it is laid out so (and not also plain
// contiguous, as happens with C == 1 or H == W == 1); anything else is made contiguous.
inline bool overlap_is_channels_last(const at::Tensor& t) {
  return !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

inline at::Tensor overlap_dense(const at::Tensor& t, bool channels_last) {
  return t.contiguous(channels_last ? at::MemoryFormat::ChannelsLast
                                    : at::MemoryFormat::Contiguous);
}

inline void overlap_check_pairs(const at::Tensor& ref, int64_t batch, const at::Tensor& boxes1,
                                const at::Tensor& boxes2, const at::Tensor& flips1,
                                const at::Tensor& flips2, int64_t size) {
  TORCH_CHECK(size >= 1 && size <= kOverlapMaxSize, "overlap_gather: size must be in [1, ",
              kOverlapMaxSize, "], got ", size);
  const std::pair<const at::Tensor*, const char*> boxes[] = {{&boxes1, "boxes1"},
                                                             {&boxes2, "boxes2"}};
  for (const auto& [t, name] : boxes) {
    check_same_device(ref, *t, "features", name);
    check_dtype(*t, {at::kFloat, at::kDouble}, name);
    TORCH_CHECK(t->dim() == 2 && t->size(0) == batch && t->size(1) == 4, name,
                " must have shape (B, 4) = (", batch, ", 4) as (left, top, width, height), got ",
                t->sizes());
  }
  const std::pair<const at::Tensor*, const char*> flips[] = {{&flips1, "flips1"},
                                                             {&flips2, "flips2"}};
  for (const auto& [t, name] : flips) {
    check_same_device(ref, *t, "features", name);
    check_dtype(*t, {at::kBool, at::kByte, at::kInt, at::kLong}, name);
    TORCH_CHECK(t->dim() == 1 && t->size(0) == batch, name, " must have shape (B) = (", batch,
                "), got ", t->sizes());
  }
}

inline OverlapGeometry overlap_geometry(const at::Tensor& boxes1, const at::Tensor& boxes2,
                                        const at::Tensor& flips1, const at::Tensor& flips2,
                                        int64_t size, bool cell_centers) {
  OverlapGeometry geo;
  geo.boxes1 = boxes1.data_ptr();
  geo.boxes2 = boxes2.data_ptr();
  geo.flips1 = flips1.data_ptr();
  geo.flips2 = flips2.data_ptr();
  geo.boxes1_double = boxes1.scalar_type() == at::kDouble;
  geo.boxes2_double = boxes2.scalar_type() == at::kDouble;
  geo.flips1_bytes = static_cast<int>(flips1.element_size());
  geo.flips2_bytes = static_cast<int>(flips2.element_size());
  geo.size = size;
  geo.cell_centers = cell_centers;
  return geo;
}

// The taps hold int32 map indices: H and W below 2^31 on both devices (a larger extent would
// wrap to "outside" and sample zeros).
inline void overlap_check_extent(int64_t h, int64_t w, const char* name) {
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(h <= kMax && w <= kMax, "overlap_gather: ", name,
              " must have H and W below 2^31, got ", h, "x", w);
}

inline void overlap_check_features(const at::Tensor& f1, const at::Tensor& f2) {
  check_dim(f1, 4, "f1");
  check_dim(f2, 4, "f2");
  overlap_check_extent(f1.size(2), f1.size(3), "f1");
  overlap_check_extent(f2.size(2), f2.size(3), "f2");
  check_dtype(f1, {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}, "f1");
  TORCH_CHECK(f2.scalar_type() == f1.scalar_type(), "f1 and f2 must have the same dtype, got ",
              f1.scalar_type(), " and ", f2.scalar_type());
  check_same_device(f1, f2, "f1", "f2");
  TORCH_CHECK(f1.size(0) == f2.size(0), "f1 and f2 must have the same batch size, got shapes ",
              f1.sizes(), " and ", f2.sizes());
}

// Outputs of the forward: g1, g2 (B, C, S, S) laid out like their feature map, valid (B).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> overlap_gather_outputs(
    const at::Tensor& f1, const at::Tensor& f2, int64_t size) {
  auto make = [&](const at::Tensor& f) {
    return at::empty({f.size(0), f.size(1), size, size},
                     f.options().memory_format(overlap_is_channels_last(f)
                                                   ? at::MemoryFormat::ChannelsLast
                                                   : at::MemoryFormat::Contiguous));
  };
  return {make(f1), make(f2), at::empty({f1.size(0)}, f1.options().dtype(at::kBool))};
}

inline void overlap_check_backward(const at::Tensor& grad_g1, const at::Tensor& grad_g2,
                                   int64_t size, int64_t h1, int64_t w1, int64_t h2,
                                   int64_t w2) {
  check_dim(grad_g1, 4, "grad_g1");
  check_dim(grad_g2, 4, "grad_g2");
  check_dtype(grad_g1, {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}, "grad_g1");
  TORCH_CHECK(grad_g2.scalar_type() == grad_g1.scalar_type(),
              "grad_g1 and grad_g2 must have the same dtype, got ", grad_g1.scalar_type(),
              " and ", grad_g2.scalar_type());
  check_same_device(grad_g1, grad_g2, "grad_g1", "grad_g2");
  for (const auto* g : {&grad_g1, &grad_g2}) {
    TORCH_CHECK(g->size(0) == grad_g1.size(0) && g->size(2) == size && g->size(3) == size,
                "overlap_gather_backward: grads must have shape (B, C, size, size) with B = ",
                grad_g1.size(0), " and size = ", size, ", got ", g->sizes());
  }
  TORCH_CHECK(h1 >= 0 && w1 >= 0 && h2 >= 0 && w2 >= 0,
              "overlap_gather_backward: map sizes must be non-negative, got ", h1, "x", w1,
              " and ", h2, "x", w2);
  overlap_check_extent(h1, w1, "the map of view 1 (height1 x width1)");
  overlap_check_extent(h2, w2, "the map of view 2 (height2 x width2)");
}

inline at::Tensor overlap_grad_input(const at::Tensor& grad_g, int64_t h, int64_t w,
                                     bool channels_last) {
  return at::empty({grad_g.size(0), grad_g.size(1), h, w},
                   grad_g.options().memory_format(channels_last ? at::MemoryFormat::ChannelsLast
                                                                : at::MemoryFormat::Contiguous));
}

}  // namespace lusscore
