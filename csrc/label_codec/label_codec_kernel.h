// ATen-free math of rgb_to_label, shared by the CPU and CUDA kernels.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define LUSSCORE_HOST_DEVICE __host__ __device__
#else
#define LUSSCORE_HOST_DEVICE
#endif

namespace lusscore {

// ImageNet-S encoding: id = R + 256 * G (B and alpha are ignored).
LUSSCORE_HOST_DEVICE inline int64_t rgb_to_label_pixel(const uint8_t* px) {
  return static_cast<int64_t>(px[0]) + 256 * static_cast<int64_t>(px[1]);
}

}  // namespace lusscore
