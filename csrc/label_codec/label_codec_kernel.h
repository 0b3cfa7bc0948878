// ATen-free math of rgb_to_label, shared by the CPU and CUDA kernels.
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace lusscore {

// ImageNet-S encoding: id = R + 256 * G (B and alpha are ignored).
LUSSCORE_HOST_DEVICE inline int64_t rgb_to_label_pixel(const uint8_t* px) {
  return static_cast<int64_t>(px[0]) + 256 * static_cast<int64_t>(px[1]);
}

}  // namespace lusscore
