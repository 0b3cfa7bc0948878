// CUDA kernels of attention_pool. The B*L maps of H*W pixels are rows of one flat array; a
// warp owns a segment of kRowsPerWarp consecutive rows, reads it as one contiguous span with
// 16-byte vector loads (whatever H*W is), and keeps a lane-private partial sum per row in
// shared memory; lane r then adds row r's 32 partials in a fixed order. So the reductions
// are deterministic, no atomics are used, and sigmoid(a + theta) is never stored.
#include <ATen/OpMathType.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <tuple>

#include "attention_pool/attention_pool_common.h"
#include "attention_pool/attention_pool_kernel.h"
#include "common/cuda_utils.cuh"

namespace lusscore {
namespace {

// The CUDA kernels take float32, float16 and bfloat16 x and a (float64 is CPU-only); theta
// may also be float64, as on the CPU: it is read as float and its gradient is written in its
// own dtype.
#define LUSSCORE_AP_CASES(...)                       \
  AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)          \
  AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)           \
  AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)
#define LUSSCORE_AP_THETA_CASES(...)                 \
  LUSSCORE_AP_CASES(__VA_ARGS__)                     \
  AT_DISPATCH_CASE(at::kDouble, __VA_ARGS__)

constexpr int kRowsPerWarp = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int kSegThreads = kWarpsPerBlock * 32;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Per-warp shared state of one segment: row partials [row][lane] (padded against bank
// conflicts) and per-row constants.
struct SegmentSmem {
  float part[kWarpsPerBlock][kRowsPerWarp][33];
  float theta[kWarpsPerBlock][kRowsPerWarp];
  float grad_scale[kWarpsPerBlock][kRowsPerWarp];  // grad_pooled / HW (backward)
  int64_t image_offset[kWarpsPerBlock][kRowsPerWarp];  // b * HW (backward, mean-attention grad)
};

// Walks the segment of nrows rows of length hw starting at flat element `base`; for every
// element calls op(row_in_segment, col, x, a, out0, out1) -> the value added to that row's
// sum, where out0/out1 are written to out0_ptr/out1_ptr (when non-null, NOUT of them) at the
// element's position. Each lane handles VEC-element packs lane, lane + 32, ... with 16-byte
// loads and stores (VEC = 1 when the data is not 16-byte aligned); the tail that is not a
// whole pack goes element by element.
template <typename scalar_t, int VEC, int NOUT, typename Op>
__device__ __forceinline__ void segment_walk(const scalar_t* __restrict__ x,
                                             const scalar_t* __restrict__ a,
                                             scalar_t* __restrict__ out0_ptr,
                                             scalar_t* __restrict__ out1_ptr, int64_t base, int n,
                                             int hw, float (*part)[33], int lane, Op op) {
  using P = Pack<scalar_t, VEC>;
  const int npack = n / VEC;
  // Software pipelining: the next pack's loads are in flight while this one is computed.
  P x_next, a_next;
  if (lane < npack) {
    x_next = *reinterpret_cast<const P*>(x + base + lane * VEC);
    a_next = *reinterpret_cast<const P*>(a + base + lane * VEC);
  }
  for (int p = lane; p < npack; p += 32) {
    const int e = p * VEC;
    const P xv = x_next;
    const P av = a_next;
    if (p + 32 < npack) {
      x_next = *reinterpret_cast<const P*>(x + base + e + 32 * VEC);
      a_next = *reinterpret_cast<const P*>(a + base + e + 32 * VEC);
    }
    P o0, o1;
    int row = e / hw;
    int col = e - row * hw;
    float acc = 0.f;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      if (col == hw) {  // the pack crosses into the next row
        part[row][lane] += acc;
        acc = 0.f;
        col = 0;
        ++row;
      }
      float r0 = 0.f, r1 = 0.f;
      acc += op(row, col, static_cast<float>(xv.v[j]), static_cast<float>(av.v[j]), r0, r1);
      o0.v[j] = static_cast<scalar_t>(r0);
      o1.v[j] = static_cast<scalar_t>(r1);
      ++col;
    }
    part[row][lane] += acc;
    if constexpr (NOUT >= 1) *reinterpret_cast<P*>(out0_ptr + base + e) = o0;
    if constexpr (NOUT >= 2) *reinterpret_cast<P*>(out1_ptr + base + e) = o1;
  }
  for (int e = npack * VEC + lane; e < n; e += 32) {
    const int row = e / hw;
    const int col = e - row * hw;
    float r0 = 0.f, r1 = 0.f;
    part[row][lane] += op(row, col, static_cast<float>(x[base + e]), static_cast<float>(a[base + e]),
                          r0, r1);
    if constexpr (NOUT >= 1) out0_ptr[base + e] = static_cast<scalar_t>(r0);
    if constexpr (NOUT >= 2) out1_ptr[base + e] = static_cast<scalar_t>(r1);
  }
}

// Forward: pooled[r] = mean over the row of sigmoid(a + theta[r % L]) * x.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kSegThreads)
attention_pool_fwd_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ a,
                          const float* __restrict__ theta, scalar_t* __restrict__ pooled,
                          int64_t rows, int64_t L, int hw) {
  __shared__ SegmentSmem sm;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float(*part)[33] = sm.part[warp];
  float* th = sm.theta[warp];
  const float inv_hw = 1.f / static_cast<float>(hw);
  const int64_t nseg = (rows + kRowsPerWarp - 1) / kRowsPerWarp;
  for (int64_t seg = int64_t(blockIdx.x) * kWarpsPerBlock + warp; seg < nseg;
       seg += int64_t(gridDim.x) * kWarpsPerBlock) {
    const int64_t r0 = seg * kRowsPerWarp;
    const int nrows = static_cast<int>(rows - r0 < kRowsPerWarp ? rows - r0 : int64_t(kRowsPerWarp));
    for (int r = 0; r < nrows; ++r) part[r][lane] = 0.f;
    if (lane < nrows) th[lane] = theta[(r0 + lane) % L];
    __syncwarp();
    segment_walk<scalar_t, VEC, 0>(x, a, nullptr, nullptr, r0 * hw, nrows * hw, hw, part, lane,
                                   [&](int row, int, float xv, float av, float&, float&) {
                                     return attention_sigmoid<float>(av + th[row]) * xv;
                                   });
    __syncwarp();
    if (lane < nrows) {
      float s = 0.f;
#pragma unroll 8
      for (int k = 0; k < 32; ++k) s += part[lane][k];
      pooled[r0 + lane] = static_cast<scalar_t>(s * inv_hw);
    }
    __syncwarp();
  }
}

// Backward: grad_x, grad_a element-wise, and the per-row sums of grad_a (fp32) for grad_theta.
template <typename scalar_t, int VEC, bool HAS_GM, bool GRAD_X>
__global__ void __launch_bounds__(kSegThreads)
attention_pool_bwd_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ a,
                          const float* __restrict__ theta, const float* __restrict__ grad_pooled,
                          const scalar_t* __restrict__ grad_mean, scalar_t* __restrict__ grad_x,
                          scalar_t* __restrict__ grad_a, float* __restrict__ row_sums,
                          int64_t rows, int64_t L, int hw) {
  __shared__ SegmentSmem sm;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float(*part)[33] = sm.part[warp];
  float* th = sm.theta[warp];
  float* gscale = sm.grad_scale[warp];
  int64_t* img = sm.image_offset[warp];
  const float inv_hw = 1.f / static_cast<float>(hw);
  const float inv_l = 1.f / static_cast<float>(L);
  const int64_t nseg = (rows + kRowsPerWarp - 1) / kRowsPerWarp;
  for (int64_t seg = int64_t(blockIdx.x) * kWarpsPerBlock + warp; seg < nseg;
       seg += int64_t(gridDim.x) * kWarpsPerBlock) {
    const int64_t r0 = seg * kRowsPerWarp;
    const int nrows = static_cast<int>(rows - r0 < kRowsPerWarp ? rows - r0 : int64_t(kRowsPerWarp));
    for (int r = 0; r < nrows; ++r) part[r][lane] = 0.f;
    if (lane < nrows) {
      th[lane] = theta[(r0 + lane) % L];
      gscale[lane] = grad_pooled[r0 + lane] * inv_hw;
      img[lane] = ((r0 + lane) / L) * hw;
    }
    __syncwarp();
    segment_walk<scalar_t, VEC, GRAD_X ? 2 : 1>(
        x, a, grad_a, grad_x, r0 * hw, nrows * hw, hw, part, lane,
        [&](int row, int col, float xv, float av, float& ga_out, float& gx_out) {
          const float s = attention_sigmoid<float>(av + th[row]);
          const float gh = gscale[row];
          float gmh = 0.f;
          if constexpr (HAS_GM) gmh = static_cast<float>(grad_mean[img[row] + col]) * inv_l;
          const float ga = attention_grad_a<float>(s, xv, gh, gmh);
          ga_out = ga;
          gx_out = gh * s;
          return ga;
        });
    __syncwarp();
    if (lane < nrows) {
      float s = 0.f;
#pragma unroll 8
      for (int k = 0; k < 32; ++k) s += part[lane][k];
      row_sums[r0 + lane] = s;
    }
    __syncwarp();
  }
}

// grad_theta[l] = sum over b of row_sums[b, l]. A block covers 32 channels; thread (tx, ty)
// adds images ty, ty + 16, ... in order, then row ty == 0 adds the 16 partials in order, so
// the result is deterministic.
constexpr int kThetaCols = 32;
constexpr int kThetaGroups = 16;

template <typename theta_t>
__global__ void __launch_bounds__(kThetaCols * kThetaGroups)
attention_pool_theta_grad_kernel(const float* __restrict__ row_sums, theta_t* __restrict__ grad_theta,
                                 int64_t B, int64_t L) {
  __shared__ float part[kThetaGroups][kThetaCols + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  for (int64_t l0 = int64_t(blockIdx.x) * kThetaCols; l0 < L; l0 += int64_t(gridDim.x) * kThetaCols) {
    const int64_t l = l0 + tx;
    float s = 0.f;
    if (l < L) {
#pragma unroll 4
      for (int64_t b = ty; b < B; b += kThetaGroups) s += row_sums[b * L + l];
    }
    part[ty][tx] = s;
    __syncthreads();
    if (ty == 0 && l < L) {
      float total = 0.f;
#pragma unroll
      for (int g = 0; g < kThetaGroups; ++g) total += part[g][tx];
      grad_theta[l] = static_cast<theta_t>(total);
    }
    __syncthreads();
  }
}

// mean_attention[b, p] = mean over l of sigmoid(a[b, l, p] + theta[l]): a thread per pixel,
// consecutive threads on consecutive pixels (coalesced), channels added in order.
template <typename scalar_t>
__global__ void attention_pool_mean_kernel(const scalar_t* __restrict__ a,
                                           const float* __restrict__ theta,
                                           scalar_t* __restrict__ mean, int64_t B, int64_t L,
                                           int64_t hw) {
  const float inv_l = 1.f / static_cast<float>(L);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < B * hw;
       i += int64_t(blockDim.x) * gridDim.x) {
    const int64_t b = i / hw, p = i - b * hw;
    const scalar_t* ap = a + b * L * hw + p;
    float s = 0.f;
#pragma unroll 8
    for (int64_t l = 0; l < L; ++l) s += attention_sigmoid<float>(static_cast<float>(ap[l * hw]) + theta[l]);
    mean[i] = static_cast<scalar_t>(s * inv_l);
  }
}

int segment_blocks(int64_t rows) {
  const int64_t nseg = (rows + kRowsPerWarp - 1) / kRowsPerWarp;
  const int64_t want = (nseg + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, sms * 16)));
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

std::tuple<at::Tensor, at::Tensor> attention_pool_cuda(const at::Tensor& x_in, const at::Tensor& a_in,
                                                       const at::Tensor& theta_in,
                                                       bool return_mean_attention) {
  attention_pool_check(x_in, a_in, theta_in, /*allow_double_x=*/false);
  check_device_type(x_in, at::kCUDA, "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
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
  const at::Tensor theta = theta_in.to(at::kFloat).contiguous();
  const int64_t rows = B * L;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_SWITCH(x.scalar_type(), "attention_pool_cuda", LUSSCORE_AP_CASES([&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* ap = a.data_ptr<scalar_t>();
    const int blocks = segment_blocks(rows);
    if (aligned16(xp) && aligned16(ap)) {
      attention_pool_fwd_kernel<scalar_t, kVec><<<blocks, kSegThreads, 0, stream>>>(
          xp, ap, theta.data_ptr<float>(), pooled.data_ptr<scalar_t>(), rows, L, static_cast<int>(hw));
    } else {
      attention_pool_fwd_kernel<scalar_t, 1><<<blocks, kSegThreads, 0, stream>>>(
          xp, ap, theta.data_ptr<float>(), pooled.data_ptr<scalar_t>(), rows, L, static_cast<int>(hw));
    }
    LUSSCORE_CUDA_CHECK_LAUNCH();
    if (return_mean_attention) {
      attention_pool_mean_kernel<scalar_t><<<capped_blocks(B * hw), kThreads, 0, stream>>>(
          ap, theta.data_ptr<float>(), mean_att.data_ptr<scalar_t>(), B, L, hw);
      LUSSCORE_CUDA_CHECK_LAUNCH();
    }
  }));
  return {pooled, mean_att};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_pool_backward_cuda(
    const at::Tensor& grad_pooled_in, const c10::optional<at::Tensor>& grad_mean_in,
    const at::Tensor& x_in, const at::Tensor& a_in, const at::Tensor& theta_in, bool compute_grad_x) {
  attention_pool_check(x_in, a_in, theta_in, /*allow_double_x=*/false);
  check_device_type(x_in, at::kCUDA, "x");
  attention_pool_backward_check(grad_pooled_in, grad_mean_in, x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t B = x_in.size(0), L = x_in.size(1), hw = x_in.size(2) * x_in.size(3);
  at::Tensor grad_x = compute_grad_x ? at::empty(x_in.sizes(), x_in.options())
                                     : at::empty({0}, x_in.options());
  at::Tensor grad_a = at::empty(a_in.sizes(), a_in.options());
  at::Tensor grad_theta = at::empty({L}, theta_in.options());
  if (B * L * hw == 0) return {grad_x, grad_a, grad_theta.zero_()};
  const at::Tensor x = x_in.contiguous(), a = a_in.contiguous();
  const at::Tensor gm = attention_pool_grad_mean(grad_mean_in, x);
  const at::Tensor theta = theta_in.to(at::kFloat).contiguous();
  const at::Tensor gp = grad_pooled_in.to(at::kFloat).contiguous();
  at::Tensor row_sums = at::empty({B, L}, x.options().dtype(at::kFloat));
  const int64_t rows = B * L;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_SWITCH(x.scalar_type(), "attention_pool_backward_cuda", LUSSCORE_AP_CASES([&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* ap = a.data_ptr<scalar_t>();
    const scalar_t* gmp = gm.defined() ? gm.data_ptr<scalar_t>() : nullptr;
    scalar_t* gxp = compute_grad_x ? grad_x.data_ptr<scalar_t>() : nullptr;
    scalar_t* gap = grad_a.data_ptr<scalar_t>();
    const bool vec = aligned16(xp) && aligned16(ap) && aligned16(gap) && (!gxp || aligned16(gxp));
    const int blocks = segment_blocks(rows);
    auto launch = [&](auto vec_tag, auto gm_tag, auto gx_tag) {
      attention_pool_bwd_kernel<scalar_t, decltype(vec_tag)::value, decltype(gm_tag)::value,
                                decltype(gx_tag)::value><<<blocks, kSegThreads, 0, stream>>>(
          xp, ap, theta.data_ptr<float>(), gp.data_ptr<float>(), gmp, gxp, gap,
          row_sums.data_ptr<float>(), rows, L, static_cast<int>(hw));
    };
    using V = std::integral_constant<int, kVec>;
    using S = std::integral_constant<int, 1>;
    using T = std::true_type;
    using F = std::false_type;
    if (vec) {
      if (gmp) { compute_grad_x ? launch(V{}, T{}, T{}) : launch(V{}, T{}, F{}); }
      else     { compute_grad_x ? launch(V{}, F{}, T{}) : launch(V{}, F{}, F{}); }
    } else {
      if (gmp) { compute_grad_x ? launch(S{}, T{}, T{}) : launch(S{}, T{}, F{}); }
      else     { compute_grad_x ? launch(S{}, F{}, T{}) : launch(S{}, F{}, F{}); }
    }
    LUSSCORE_CUDA_CHECK_LAUNCH();
  }));
  AT_DISPATCH_SWITCH(grad_theta.scalar_type(), "attention_pool_theta_grad", LUSSCORE_AP_THETA_CASES([&] {
    const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    const int blocks = static_cast<int>(std::min<int64_t>((L + kThetaCols - 1) / kThetaCols, sms * 8));
    attention_pool_theta_grad_kernel<scalar_t>
        <<<blocks, dim3(kThetaCols, kThetaGroups), 0, stream>>>(
            row_sums.data_ptr<float>(), grad_theta.data_ptr<scalar_t>(), B, L);
    LUSSCORE_CUDA_CHECK_LAUNCH();
  }));
  return {grad_x, grad_a, grad_theta};
}

}  // namespace

TORCH_LIBRARY_IMPL(lusscore, CUDA, m) {
  m.impl("attention_pool", &attention_pool_cuda);
  m.impl("attention_pool_backward", &attention_pool_backward_cuda);
}

}  // namespace lusscore
