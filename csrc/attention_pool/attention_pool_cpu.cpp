#include <ATen/OpMathType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "attention_pool/attention_pool_common.h"
#include "common/cpu_isa.h"
#include "attention_pool/attention_pool_kernel.h"

namespace lusscore {
namespace {

// Row kernels on acc_t (float or double) arrays. The loops are written for the compiler's
// SIMD vectoriser (omp simd, with a polynomial exp for float that vectorises where libm's
// does not); each row is summed in a fixed order whatever the thread count, so results are
// deterministic on a given CPU. The float rows are also compiled for AVX2 + FMA and AVX-512
// (FloatRows below): the widest the CPU has runs.

#if defined(__GNUC__)
#define LUSSCORE_ROW_INLINE inline __attribute__((always_inline))
#else
#define LUSSCORE_ROW_INLINE inline
#endif

// exp(v) for float: v = n ln2 + r, |r| <= ln2/2, a degree-6 polynomial for exp(r) (relative
// error ~2e-7), times 2^n built from its bits. Saturates outside [-87, 88].
LUSSCORE_ROW_INLINE float exp_poly(float v) {
  v = std::min(std::max(v, -87.0f), 88.0f);
  const float n = (v * 1.44269504f + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = (v - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

LUSSCORE_ROW_INLINE float sigmoid_cpu(float v) { return 1.0f / (1.0f + exp_poly(-v)); }
inline double sigmoid_cpu(double v) { return attention_sigmoid<double>(v); }

// sum_i sigmoid(a[i] + th) * x[i]
template <typename acc_t>
LUSSCORE_ROW_INLINE acc_t pooled_row(const acc_t* x, const acc_t* a, acc_t th, int64_t n) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += sigmoid_cpu(a[i] + th) * x[i];
  return sum;
}

// acc[i] += sigmoid(a[i] + th); returns sum_i sigmoid(a[i] + th) * x[i]
template <typename acc_t>
LUSSCORE_ROW_INLINE acc_t pooled_accumulate_row(const acc_t* x, const acc_t* a, acc_t th, acc_t* acc, int64_t n) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    const acc_t s = sigmoid_cpu(a[i] + th);
    acc[i] += s;
    sum += s * x[i];
  }
  return sum;
}

// ga[i] = (gh * x[i] + gmh[i]) * s * (1 - s), gx[i] = gh * s (when gx), s = sigmoid(a[i] + th);
// gmh may be null (no mean-attention gradient). Returns sum_i ga[i].
template <typename acc_t>
LUSSCORE_ROW_INLINE acc_t backward_row(const acc_t* x, const acc_t* a, const acc_t* gmh, acc_t th, acc_t gh, acc_t* ga,
                   acc_t* gx, int64_t n) {
  acc_t sum = 0;
  if (gmh) {
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) {
      const acc_t s = sigmoid_cpu(a[i] + th);
      ga[i] = attention_grad_a<acc_t>(s, x[i], gh, gmh[i]);
      sum += ga[i];
    }
  } else {
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) {
      const acc_t s = sigmoid_cpu(a[i] + th);
      ga[i] = attention_grad_a<acc_t>(s, x[i], gh, acc_t(0));
      sum += ga[i];
    }
  }
  if (gx) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) gx[i] = gh * sigmoid_cpu(a[i] + th);
  }
  return sum;
}

// The float row kernels of one ISA level.
struct FloatRows {
  float (*pooled)(const float* x, const float* a, float th, int64_t n);
  float (*pooled_accumulate)(const float* x, const float* a, float th, float* acc, int64_t n);
  float (*backward)(const float* x, const float* a, const float* gmh, float th, float gh, float* ga,
                    float* gx, int64_t n);
};

// The three float rows compiled with function attributes ATTR, as functions NAME_*.
#define LUSSCORE_FLOAT_ROWS(NAME, ATTR)                                                          \
  ATTR float NAME##_pooled(const float* x, const float* a, float th, int64_t n) {                \
    return pooled_row<float>(x, a, th, n);                                                        \
  }                                                                                               \
  ATTR float NAME##_pooled_accumulate(const float* x, const float* a, float th, float* acc,      \
                                      int64_t n) {                                                \
    return pooled_accumulate_row<float>(x, a, th, acc, n);                                        \
  }                                                                                               \
  ATTR float NAME##_backward(const float* x, const float* a, const float* gmh, float th,         \
                             float gh, float* ga, float* gx, int64_t n) {                         \
    return backward_row<float>(x, a, gmh, th, gh, ga, gx, n);                                     \
  }

LUSSCORE_FLOAT_ROWS(generic, )
#if LUSSCORE_X86_TARGETS
LUSSCORE_FLOAT_ROWS(avx2, __attribute__((target("arch=x86-64-v3"))))
LUSSCORE_FLOAT_ROWS(avx512, __attribute__((target("arch=x86-64-v4"))))
#endif

// The widest level this CPU has, or the one LUSSCORE_ATTENTION_POOL_CPU_KERNEL names.
FloatRows pick_float_rows() {
  switch (cpu_isa("LUSSCORE_ATTENTION_POOL_CPU_KERNEL")) {
#if LUSSCORE_X86_TARGETS
    case CpuIsa::avx512: return {&avx512_pooled, &avx512_pooled_accumulate, &avx512_backward};
    case CpuIsa::avx2: return {&avx2_pooled, &avx2_pooled_accumulate, &avx2_backward};
#endif
    default: return {&generic_pooled, &generic_pooled_accumulate, &generic_backward};
  }
}

// Row kernels by accumulation type: float through the picked level, double generic.
struct Rows {
  FloatRows f = pick_float_rows();
  float pooled(const float* x, const float* a, float th, int64_t n) const { return f.pooled(x, a, th, n); }
  double pooled(const double* x, const double* a, double th, int64_t n) const {
    return pooled_row<double>(x, a, th, n);
  }
  float pooled_accumulate(const float* x, const float* a, float th, float* acc, int64_t n) const {
    return f.pooled_accumulate(x, a, th, acc, n);
  }
  double pooled_accumulate(const double* x, const double* a, double th, double* acc, int64_t n) const {
    return pooled_accumulate_row<double>(x, a, th, acc, n);
  }
  float backward(const float* x, const float* a, const float* gmh, float th, float gh, float* ga,
                 float* gx, int64_t n) const {
    return f.backward(x, a, gmh, th, gh, ga, gx, n);
  }
  double backward(const double* x, const double* a, const double* gmh, double th, double gh,
                  double* ga, double* gx, int64_t n) const {
    return backward_row<double>(x, a, gmh, th, gh, ga, gx, n);
  }
};

// Rows of reduced-precision types are processed in chunks converted to float.
constexpr int64_t kChunk = 1024;

template <typename scalar_t, typename acc_t>
struct RowBuffers {
  std::vector<acc_t> x, a, ga, gx;
  RowBuffers() {
    if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      x.resize(kChunk), a.resize(kChunk), ga.resize(kChunk), gx.resize(kChunk);
    }
  }
};

template <typename scalar_t, typename acc_t>
acc_t pooled_row_any(const Rows& rows, const scalar_t* x, const scalar_t* a, acc_t th, int64_t n,
                     RowBuffers<scalar_t, acc_t>& buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return rows.pooled(x, a, th, n);
  } else {
    acc_t sum = 0;
    for (int64_t off = 0; off < n; off += kChunk) {
      const int64_t m = std::min(kChunk, n - off);
      at::vec::convert(x + off, buf.x.data(), m);
      at::vec::convert(a + off, buf.a.data(), m);
      sum += rows.pooled(buf.x.data(), buf.a.data(), th, m);
    }
    return sum;
  }
}

template <typename scalar_t, typename acc_t>
acc_t pooled_accumulate_any(const Rows& rows, const scalar_t* x, const scalar_t* a, acc_t th,
                            acc_t* acc, int64_t n, RowBuffers<scalar_t, acc_t>& buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return rows.pooled_accumulate(x, a, th, acc, n);
  } else {
    acc_t sum = 0;
    for (int64_t off = 0; off < n; off += kChunk) {
      const int64_t m = std::min(kChunk, n - off);
      at::vec::convert(x + off, buf.x.data(), m);
      at::vec::convert(a + off, buf.a.data(), m);
      sum += rows.pooled_accumulate(buf.x.data(), buf.a.data(), th, acc + off, m);
    }
    return sum;
  }
}

template <typename scalar_t, typename acc_t>
acc_t backward_row_any(const Rows& rows, const scalar_t* x, const scalar_t* a, const acc_t* gmh,
                       acc_t th, acc_t gh, scalar_t* ga, scalar_t* gx, int64_t n,
                       RowBuffers<scalar_t, acc_t>& buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return rows.backward(x, a, gmh, th, gh, ga, gx, n);
  } else {
    acc_t sum = 0;
    for (int64_t off = 0; off < n; off += kChunk) {
      const int64_t m = std::min(kChunk, n - off);
      at::vec::convert(x + off, buf.x.data(), m);
      at::vec::convert(a + off, buf.a.data(), m);
      sum += rows.backward(buf.x.data(), buf.a.data(), gmh ? gmh + off : nullptr, th, gh,
                           buf.ga.data(), gx ? buf.gx.data() : nullptr, m);
      at::vec::convert(buf.ga.data(), ga + off, m);
      if (gx) at::vec::convert(buf.gx.data(), gx + off, m);
    }
    return sum;
  }
}

// Rows are the B*L (b, l) maps of H*W pixels; channels-last inputs are made contiguous first.
std::tuple<at::Tensor, at::Tensor> attention_pool_cpu(const at::Tensor& x_in, const at::Tensor& a_in,
                                                      const at::Tensor& theta_in,
                                                      bool return_mean_attention) {
  attention_pool_check(x_in, a_in, theta_in, /*allow_double_x=*/true);
  check_device_type(x_in, at::kCPU, "x");
  const int64_t B = x_in.size(0), L = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  const int64_t hw = H * W;
  at::Tensor pooled = at::empty({B, L}, x_in.options());
  at::Tensor mean_att = return_mean_attention ? at::empty({B, H, W}, x_in.options())
                                              : at::empty({0}, x_in.options());
  // Means over nothing are NaN, as torch.mean gives them.
  if (L == 0 && mean_att.numel() > 0) mean_att.fill_(std::numeric_limits<double>::quiet_NaN());
  if (hw == 0 && pooled.numel() > 0) pooled.fill_(std::numeric_limits<double>::quiet_NaN());
  if (B * L * hw == 0) return {pooled, mean_att};
  const at::Tensor x = x_in.contiguous(), a = a_in.contiguous();
  const Rows rows;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "attention_pool_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor theta = theta_in.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* ap = a.data_ptr<scalar_t>();
    const acc_t* tp = theta.data_ptr<acc_t>();
    scalar_t* out = pooled.data_ptr<scalar_t>();
    const acc_t inv_hw = acc_t(1) / acc_t(hw);
    if (!return_mean_attention) {
      at::parallel_for(0, B * L, std::max<int64_t>(1, (1 << 14) / hw), [&](int64_t begin, int64_t end) {
        RowBuffers<scalar_t, acc_t> buf;
        for (int64_t r = begin; r < end; ++r) {
          out[r] = static_cast<scalar_t>(
              pooled_row_any<scalar_t, acc_t>(rows, xp + r * hw, ap + r * hw, tp[r % L], hw, buf) * inv_hw);
        }
      });
    } else {
      scalar_t* mp = mean_att.data_ptr<scalar_t>();
      const acc_t inv_l = acc_t(1) / acc_t(L);
      // One image per task: each sigmoid feeds both the pooled sum of its row and the
      // per-pixel attention sum, to which channels are added in order.
      at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
        RowBuffers<scalar_t, acc_t> buf;
        std::vector<acc_t> acc(hw);
        for (int64_t b = begin; b < end; ++b) {
          std::fill(acc.begin(), acc.end(), acc_t(0));
          for (int64_t l = 0; l < L; ++l) {
            const int64_t r = b * L + l;
            out[r] = static_cast<scalar_t>(pooled_accumulate_any<scalar_t, acc_t>(
                                               rows, xp + r * hw, ap + r * hw, tp[l], acc.data(), hw, buf) *
                                           inv_hw);
          }
          for (int64_t i = 0; i < hw; ++i) mp[b * hw + i] = static_cast<scalar_t>(acc[i] * inv_l);
        }
      });
    }
  });
  return {pooled, mean_att};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_pool_backward_cpu(
    const at::Tensor& grad_pooled_in, const c10::optional<at::Tensor>& grad_mean_in,
    const at::Tensor& x_in, const at::Tensor& a_in, const at::Tensor& theta_in, bool compute_grad_x) {
  attention_pool_check(x_in, a_in, theta_in, /*allow_double_x=*/true);
  check_device_type(x_in, at::kCPU, "x");
  attention_pool_backward_check(grad_pooled_in, grad_mean_in, x_in);
  const int64_t B = x_in.size(0), L = x_in.size(1), hw = x_in.size(2) * x_in.size(3);
  at::Tensor grad_x = compute_grad_x ? at::empty(x_in.sizes(), x_in.options())
                                     : at::empty({0}, x_in.options());
  at::Tensor grad_a = at::empty(a_in.sizes(), a_in.options());
  at::Tensor grad_theta = at::zeros({L}, theta_in.options());
  if (B * L * hw == 0) return {grad_x, grad_a, grad_theta};
  const at::Tensor x = x_in.contiguous(), a = a_in.contiguous();
  const at::Tensor gm = attention_pool_grad_mean(grad_mean_in, x);
  const Rows rows;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "attention_pool_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor theta = theta_in.to(acc_type).contiguous();
    const at::Tensor gp = grad_pooled_in.to(acc_type).contiguous();
    // The mean-attention gradient over L, per pixel, in acc_t: (B, H*W).
    const at::Tensor gmh = gm.defined() ? (gm.to(acc_type) / static_cast<double>(L)).contiguous()
                                        : at::Tensor();
    at::Tensor row_sums = at::empty({B, L}, x.options().dtype(acc_type));
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* ap = a.data_ptr<scalar_t>();
    const acc_t* tp = theta.data_ptr<acc_t>();
    const acc_t* gpp = gp.data_ptr<acc_t>();
    const acc_t* gmp = gmh.defined() ? gmh.data_ptr<acc_t>() : nullptr;
    scalar_t* gxp = compute_grad_x ? grad_x.data_ptr<scalar_t>() : nullptr;
    scalar_t* gap = grad_a.data_ptr<scalar_t>();
    acc_t* rs = row_sums.data_ptr<acc_t>();
    const acc_t inv_hw = acc_t(1) / acc_t(hw);
    at::parallel_for(0, B * L, std::max<int64_t>(1, (1 << 14) / hw), [&](int64_t begin, int64_t end) {
      RowBuffers<scalar_t, acc_t> buf;
      for (int64_t r = begin; r < end; ++r) {
        const int64_t off = r * hw;
        rs[r] = backward_row_any<scalar_t, acc_t>(rows, xp + off, ap + off, gmp ? gmp + (r / L) * hw : nullptr,
                                                  tp[r % L], gpp[r] * inv_hw, gap + off,
                                                  gxp ? gxp + off : nullptr, hw, buf);
      }
    });
    // grad_theta: images added in order, so the result does not depend on the thread count.
    std::vector<acc_t> gt(L, acc_t(0));
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t l = 0; l < L; ++l) gt[l] += rs[b * L + l];
    }
    grad_theta.copy_(at::from_blob(gt.data(), {L}, x.options().dtype(acc_type)));
  });
  return {grad_x, grad_a, grad_theta};
}

}  // namespace

std::string attention_pool_cpu_kernel() { return cpu_isa_name(cpu_isa("LUSSCORE_ATTENTION_POOL_CPU_KERNEL")); }

TORCH_LIBRARY_IMPL(lusscore, CPU, m) {
  m.impl("attention_pool", &attention_pool_cpu);
  m.impl("attention_pool_backward", &attention_pool_backward_cpu);
}

}  // namespace lusscore
