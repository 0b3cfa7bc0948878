// Shape/dtype checks of rgb_to_label, shared by both devices.
#pragma once

#include "common/checks.h"

namespace lusscore {

inline at::Tensor rgb_to_label_prepare(const at::Tensor& rgb) {
  check_dtype(rgb, {at::kByte}, "rgb");
  TORCH_CHECK(rgb.dim() >= 1 && (rgb.size(-1) == 3 || rgb.size(-1) == 4),
              "rgb must end in a channel dimension of 3 (RGB) or 4 (RGBA), got shape ",
              rgb.sizes());
  auto sizes = rgb.sizes().vec();
  sizes.pop_back();
  return at::empty(sizes, rgb.options().dtype(at::kLong));
}

}  // namespace lusscore
