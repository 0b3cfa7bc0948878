// CUDA launch helpers: a capped 1-D grid and a launch check after each kernel.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>

namespace lusscore {

constexpr int kThreads = 256;

// Enough blocks to cover n items once, capped so grid-stride loops do the rest.
inline int capped_blocks(int64_t n, int threads = kThreads) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t want = (n + threads - 1) / threads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, sms * 32)));
}

}  // namespace lusscore

#define LUSSCORE_CUDA_CHECK_LAUNCH() C10_CUDA_KERNEL_LAUNCH_CHECK()
