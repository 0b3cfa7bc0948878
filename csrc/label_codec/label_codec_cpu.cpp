#include <ATen/Parallel.h>
#include <torch/library.h>

#include "label_codec/label_codec_common.h"
#include "label_codec/label_codec_kernel.h"

namespace lusscore {
namespace {

at::Tensor rgb_to_label_cpu(const at::Tensor& rgb_in) {
  at::Tensor out = rgb_to_label_prepare(rgb_in);
  const int64_t n = out.numel();
  if (n == 0) return out;
  const at::Tensor rgb = rgb_in.contiguous();
  const int64_t channels = rgb.size(-1);
  const uint8_t* src = rgb.data_ptr<uint8_t>();
  int64_t* dst = out.data_ptr<int64_t>();
  at::parallel_for(0, n, 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) dst[i] = rgb_to_label_pixel(src + i * channels);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lusscore, CPU, m) { m.impl("rgb_to_label", &rgb_to_label_cpu); }

}  // namespace lusscore
