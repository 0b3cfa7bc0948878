// photometric_augment on the CPU: each crop's colour jitter (in its own order), grayscale,
// inversion and Gaussian blur in one task, the crop's planes staying in cache between the
// steps. The arithmetic follows lusscore/reference/photometric.py step by step, in float
// (the contrast's mean gray accumulates in double). CPU only: the data loader's op.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/checks.h"
#include "common/cpu_isa.h"

namespace lusscore {
namespace {

constexpr int64_t kMaxTaps = 63;
enum JitterOp : int64_t { kBrightness = 0, kContrast = 1, kSaturation = 2, kHue = 3 };
constexpr float kGray[3] = {0.2989f, 0.587f, 0.114f};  // torchvision's luma weights

struct CropParams {
  float factor[4];  // brightness, contrast, saturation factors; hue shift in turns
  int64_t order[4];
  bool jitter, gray, invert;
  float sigma;  // <= 0: no blur
};

inline float luma(float r, float g, float b) { return kGray[0] * r + kGray[1] * g + kGray[2] * b; }
inline float clamp01(float v) { return std::min(std::max(v, 0.f), 1.f); }
// torch.remainder for b > 0: the result in [0, b).
inline float remainder(float a, float b) { return a - b * std::floor(a / b); }

#if defined(__GNUC__)
#define LUSSCORE_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define LUSSCORE_ALWAYS_INLINE inline
#endif

// One crop in place: x holds its three planes. Inlined into one function per ISA level, whose
// target the loops vectorise for.
LUSSCORE_ALWAYS_INLINE void augment_crop_body(float* x, int64_t h, int64_t w, const CropParams& p,
                                              int64_t kernel_size, std::vector<float>& scratch) {
  const int64_t hw = h * w;
  float* r = x;
  float* g = x + hw;
  float* b = x + 2 * hw;
  if (p.jitter) {
    for (int s = 0; s < 4; ++s) {
      const int64_t op = p.order[s];
      const float f = p.factor[op];
      if (op == kBrightness) {
        for (int64_t i = 0; i < 3 * hw; ++i) x[i] = clamp01(x[i] * f);
      } else if (op == kContrast) {
        double sum = 0;
        for (int64_t i = 0; i < hw; ++i) sum += luma(r[i], g[i], b[i]);
        const float mean = static_cast<float>(sum / static_cast<double>(hw));
        const float other = (1.f - f) * mean;
        for (int64_t i = 0; i < 3 * hw; ++i) x[i] = clamp01(f * x[i] + other);
      } else if (op == kSaturation) {
        const float keep = 1.f - f;
        for (int64_t i = 0; i < hw; ++i) {
          const float other = keep * luma(r[i], g[i], b[i]);
          r[i] = clamp01(f * r[i] + other);
          g[i] = clamp01(f * g[i] + other);
          b[i] = clamp01(f * b[i] + other);
        }
      } else {
        for (int64_t i = 0; i < hw; ++i) {
          const float rv = r[i], gv = g[i], bv = b[i];
          const float maxc = std::max(std::max(rv, gv), bv);
          const float minc = std::min(std::min(rv, gv), bv);
          const float chroma = maxc - minc;
          const float sat = chroma / (maxc == 0.f ? 1.f : maxc);
          const float c = chroma == 0.f ? 1.f : chroma;
          const float rc = (maxc - rv) / c, gc = (maxc - gv) / c, bc = (maxc - bv) / c;
          const float hue6 = maxc == rv ? bc - gc : (maxc == gv ? 2.f + rc - bc : 4.f + gc - rc);
          const float h6 = remainder(hue6 / 6.f + f, 1.f) * 6.f;
          const float vs = maxc * sat;
          const float kr = remainder(h6 + 5.f, 6.f), kg = remainder(h6 + 3.f, 6.f),
                      kb = remainder(h6 + 1.f, 6.f);
          r[i] = maxc - vs * clamp01(std::min(kr, 4.f - kr));
          g[i] = maxc - vs * clamp01(std::min(kg, 4.f - kg));
          b[i] = maxc - vs * clamp01(std::min(kb, 4.f - kb));
        }
      }
    }
  }
  if (p.gray) {
    for (int64_t i = 0; i < hw; ++i) r[i] = g[i] = b[i] = luma(r[i], g[i], b[i]);
  }
  if (p.invert) {
    for (int64_t i = 0; i < 3 * hw; ++i) x[i] = 1.f - x[i];
  }
  if (p.sigma > 0) {
    // Separable, reflect padding: along each row, then along each column.
    const int64_t half = kernel_size / 2;
    float taps[kMaxTaps];
    float total = 0;
    for (int64_t t = 0; t < kernel_size; ++t) {
      const float u = static_cast<float>(t - half) / p.sigma;
      taps[t] = std::exp(-0.5f * u * u);
      total += taps[t];
    }
    for (int64_t t = 0; t < kernel_size; ++t) taps[t] /= total;
    scratch.resize(static_cast<size_t>(hw + w + 2 * half));
    float* rows = scratch.data();
    float* line = rows + hw;
    for (int64_t ch = 0; ch < 3; ++ch) {
      float* plane = x + ch * hw;
      for (int64_t y = 0; y < h; ++y) {
        const float* src = plane + y * w;
        for (int64_t i = 0; i < half; ++i) {
          line[half - 1 - i] = src[i + 1];
          line[half + w + i] = src[w - 2 - i];
        }
        std::copy(src, src + w, line + half);
        float* dst = rows + y * w;
        std::fill(dst, dst + w, 0.f);
        for (int64_t t = 0; t < kernel_size; ++t) {
          for (int64_t i = 0; i < w; ++i) dst[i] += taps[t] * line[i + t];
        }
      }
      for (int64_t y = 0; y < h; ++y) {
        float* dst = plane + y * w;
        std::fill(dst, dst + w, 0.f);
        for (int64_t t = 0; t < kernel_size; ++t) {
          int64_t yy = y + t - half;
          yy = yy < 0 ? -yy : (yy >= h ? 2 * (h - 1) - yy : yy);
          const float* src = rows + yy * w;
          for (int64_t i = 0; i < w; ++i) dst[i] += taps[t] * src[i];
        }
      }
    }
  }
}

void augment_crop_generic(float* x, int64_t h, int64_t w, const CropParams& p,
                          int64_t kernel_size, std::vector<float>& scratch) {
  augment_crop_body(x, h, w, p, kernel_size, scratch);
}
#if LUSSCORE_X86_TARGETS
__attribute__((target("arch=x86-64-v3"))) void augment_crop_avx2(
    float* x, int64_t h, int64_t w, const CropParams& p, int64_t kernel_size,
    std::vector<float>& scratch) {
  augment_crop_body(x, h, w, p, kernel_size, scratch);
}
#endif

using AugmentCropFn = void (*)(float*, int64_t, int64_t, const CropParams&, int64_t,
                               std::vector<float>&);

AugmentCropFn pick_augment_crop() {
#if LUSSCORE_X86_TARGETS
  if (cpu_isa("LUSSCORE_PHOTOMETRIC_CPU_KERNEL") != CpuIsa::generic) return &augment_crop_avx2;
#endif
  return &augment_crop_generic;
}

at::Tensor photometric_augment_cpu(const at::Tensor& crops, const at::Tensor& factors,
                                   const at::Tensor& order, const at::Tensor& flags,
                                   const at::Tensor& sigma, int64_t kernel_size) {
  check_dim(crops, 4, "crops");
  TORCH_CHECK(crops.size(1) == 3, "crops must be RGB (N, 3, H, W), got shape ", crops.sizes());
  check_dtype(crops, {at::kByte, at::kFloat}, "crops");
  const int64_t n = crops.size(0), h = crops.size(2), w = crops.size(3);
  check_dim(factors, 2, "factors");
  check_dim(order, 2, "order");
  check_dim(flags, 2, "flags");
  check_dim(sigma, 1, "sigma");
  TORCH_CHECK(factors.size(0) == n && factors.size(1) == 4, "factors must be (", n, ", 4), got ",
              factors.sizes());
  TORCH_CHECK(order.size(0) == n && order.size(1) == 4, "order must be (", n, ", 4), got ",
              order.sizes());
  TORCH_CHECK(flags.size(0) == n && flags.size(1) == 3, "flags must be (", n, ", 3), got ",
              flags.sizes());
  TORCH_CHECK(sigma.size(0) == n, "sigma must be (", n, "), got ", sigma.sizes());
  check_dtype(factors, {at::kFloat}, "factors");
  check_dtype(order, {at::kLong}, "order");
  check_dtype(flags, {at::kBool}, "flags");
  check_dtype(sigma, {at::kFloat}, "sigma");
  check_device_type(crops, c10::DeviceType::CPU, "crops");
  check_device_type(factors, c10::DeviceType::CPU, "factors");
  check_device_type(order, c10::DeviceType::CPU, "order");
  check_device_type(flags, c10::DeviceType::CPU, "flags");
  check_device_type(sigma, c10::DeviceType::CPU, "sigma");
  TORCH_CHECK(kernel_size >= 1 && kernel_size % 2 == 1 && kernel_size <= kMaxTaps,
              "kernel_size must be odd, in [1, ", kMaxTaps, "], got ", kernel_size);

  // The parameters are checked here, once, before any crop is touched.
  const at::Tensor f = factors.contiguous(), o = order.contiguous(), fl = flags.contiguous(),
                   sg = sigma.contiguous();
  std::vector<CropParams> params(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    CropParams& p = params[i];
    bool seen[4] = {false, false, false, false};
    for (int k = 0; k < 4; ++k) {
      p.factor[k] = f.data_ptr<float>()[i * 4 + k];
      const int64_t op = o.data_ptr<int64_t>()[i * 4 + k];
      TORCH_CHECK(op >= 0 && op < 4 && !seen[op], "order[", i, "] must be a permutation of 0..3, got ",
                  o[i]);
      seen[op] = true;
      p.order[k] = op;
    }
    p.jitter = fl.data_ptr<bool>()[i * 3];
    p.gray = fl.data_ptr<bool>()[i * 3 + 1];
    p.invert = fl.data_ptr<bool>()[i * 3 + 2];
    p.sigma = sg.data_ptr<float>()[i];
    TORCH_CHECK(!(p.sigma > 0) || std::min(h, w) > kernel_size / 2, "a ", kernel_size,
                "-tap blur needs crops over ", kernel_size / 2, " px a side (reflect padding), got ",
                h, "x", w);
  }
  at::Tensor out = crops.scalar_type() == at::kFloat ? crops.contiguous().clone()
                                                      : crops.contiguous().to(at::kFloat).div_(255.0);
  if (out.numel() == 0) return out;
  const AugmentCropFn augment_crop = pick_augment_crop();
  float* data = out.data_ptr<float>();
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch;
    for (int64_t i = begin; i < end; ++i) augment_crop(data + i * 3 * h * w, h, w, params[i], kernel_size, scratch);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lusscore, CPU, m) { m.impl("photometric_augment", &photometric_augment_cpu); }

}  // namespace lusscore
