#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/cuda_utils.cuh"
#include "label_codec/label_codec_common.h"
#include "label_codec/label_codec_kernel.h"

namespace lusscore {
namespace {

__global__ void rgb_to_label_kernel(const uint8_t* __restrict__ src, int64_t* __restrict__ dst,
                                    int64_t n, int64_t channels) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(blockDim.x) * gridDim.x) {
    dst[i] = rgb_to_label_pixel(src + i * channels);
  }
}

at::Tensor rgb_to_label_cuda(const at::Tensor& rgb_in) {
  const c10::cuda::CUDAGuard guard(rgb_in.device());
  at::Tensor out = rgb_to_label_prepare(rgb_in);
  const int64_t n = out.numel();
  if (n == 0) return out;
  const at::Tensor rgb = rgb_in.contiguous();
  rgb_to_label_kernel<<<capped_blocks(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      rgb.data_ptr<uint8_t>(), out.data_ptr<int64_t>(), n, rgb.size(-1));
  LUSSCORE_CUDA_CHECK_LAUNCH();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lusscore, CUDA, m) { m.impl("rgb_to_label", &rgb_to_label_cuda); }

}  // namespace lusscore
