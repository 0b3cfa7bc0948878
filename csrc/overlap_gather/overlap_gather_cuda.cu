// CUDA kernels of overlap_gather. One block owns a chunk of one batch item's slice of one
// view: it builds that pair's lattice taps (and, for the backward, each map row/column's
// range of touching lattice points) in shared memory, then its threads walk the chunk in
// memory order (coalesced for contiguous and channels-last maps; 16-byte vectors over
// channels for channels-last). The backward gathers per input element in a fixed order:
// deterministic, no atomics.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/safe_numerics.h>
#include <torch/library.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <utility>

#include "common/cuda_utils.cuh"
#include "overlap_gather/overlap_gather_common.h"
#include "overlap_gather/overlap_gather_kernel.h"

namespace lusscore {
namespace {

constexpr int kOverlapThreads = 256;
constexpr int kVectorsPerThread = 8;  // chunk = threads x this many vectors

using Divider = at::cuda::detail::IntDivider<unsigned int>;

// Divisors of the in-slice index decoding (magic-number division: a few instructions
// instead of a 64-bit division per element). inner: C (channels-last) or the plane size
// S*S / H*W (contiguous); cols: S (forward) or W (backward).
struct SliceDecoder {
  Divider inner, cols;
};

template <typename scalar_t, int V>
struct alignas(sizeof(scalar_t) * V) Pack {
  scalar_t v[V];
};

// First and last lattice point touching map index m (hi < lo: none).
template <typename acc_t>
__device__ inline int2 touch_range(const OverlapTap<acc_t>* taps, int64_t S, int64_t m) {
  int lo = 0, hi = -1;
  for (int64_t k = 0; k < S; ++k) {
    if (overlap_tap_touches(taps[k], m)) {
      if (hi < lo) lo = static_cast<int>(k);
      hi = static_cast<int>(k);
    }
  }
  return make_int2(lo, hi);
}

// Fills the 2 x S taps of pair b / view in shared memory (x taps first, then y taps).
template <typename acc_t>
__device__ inline void load_taps(OverlapTap<acc_t>* taps, const OverlapGeometry& geo, int64_t b,
                                 int view, int64_t H, int64_t W) {
  const int64_t S = geo.size;
  for (int64_t t = threadIdx.x; t < 2 * S; t += blockDim.x) {
    const int axis = t < S ? 0 : 1;
    taps[t] = overlap_geometry_tap<acc_t>(geo, b, view, axis, t - axis * S, axis ? H : W);
  }
}

// g[b, c, i, j] = sum over the 2 x 2 taps of wx * wy * f[b, c, y, x]; V channels per thread
// (V > 1 only channels-last with C % V == 0).
template <typename scalar_t, bool kChannelsLast, int V>
__global__ void __launch_bounds__(kOverlapThreads)
    gather_kernel(const scalar_t* __restrict__ f, scalar_t* __restrict__ g,
                  bool* __restrict__ valid, OverlapGeometry geo, SliceDecoder dec, int view,
                  int64_t B, int64_t C, int64_t H, int64_t W, int64_t chunk_vecs, int64_t chunks) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  auto* taps = reinterpret_cast<OverlapTap<acc_t>*>(smem);
  const int64_t S = geo.size, SS = S * S, HW = H * W;
  const int64_t slice_vecs = C * SS / V;
  for (int64_t blk = blockIdx.x; blk < B * chunks; blk += gridDim.x) {
    const int64_t b = blk / chunks, chunk = blk % chunks;
    __syncthreads();  // the previous item's readers are done with the taps
    load_taps(taps, geo, b, view, H, W);
    if (valid != nullptr && chunk == 0 && threadIdx.x == 0) valid[b] = overlap_geometry_valid(geo, b);
    __syncthreads();
    const scalar_t* fb = f + b * C * HW;
    scalar_t* gb = g + b * C * SS;
    const int64_t end = min(slice_vecs, (chunk + 1) * chunk_vecs);
    for (int64_t vi = chunk * chunk_vecs + threadIdx.x; vi < end; vi += blockDim.x) {
      const int64_t e = vi * V;
      // Channels-last: e = p * C + c; contiguous: e = c * SS + p; p = i * S + j.
      const auto outer = dec.inner.divmod(static_cast<unsigned int>(e));
      const unsigned int c = kChannelsLast ? outer.mod : outer.div;
      const auto ij = dec.cols.divmod(kChannelsLast ? outer.div : outer.mod);
      const unsigned int i = ij.div, j = ij.mod;
      const OverlapTap<acc_t> xt = taps[j], yt = taps[S + i];
      acc_t acc[V];
#pragma unroll
      for (int k = 0; k < V; ++k) acc[k] = acc_t(0);
#pragma unroll
      for (int ty = 0; ty < 2; ++ty) {
        const int y = ty ? yt.i1 : yt.i0;
        if (y < 0) continue;
        const acc_t wy = ty ? yt.w1 : yt.w0;
#pragma unroll
        for (int tx = 0; tx < 2; ++tx) {
          const int x = tx ? xt.i1 : xt.i0;
          if (x < 0) continue;
          const acc_t w = (tx ? xt.w1 : xt.w0) * wy;
          const int64_t off = kChannelsLast ? (int64_t(y) * W + x) * C + c
                                            : int64_t(c) * HW + int64_t(y) * W + x;
          const Pack<scalar_t, V> val = *reinterpret_cast<const Pack<scalar_t, V>*>(fb + off);
#pragma unroll
          for (int k = 0; k < V; ++k) acc[k] += w * static_cast<acc_t>(val.v[k]);
        }
      }
      Pack<scalar_t, V> out;
#pragma unroll
      for (int k = 0; k < V; ++k) out.v[k] = static_cast<scalar_t>(acc[k]);
      *reinterpret_cast<Pack<scalar_t, V>*>(gb + e) = out;
    }
  }
}

// grad_f[b, c, y, x] = sum_i wy_i(y) * sum_j wx_j(x) * grad_g[b, c, i, j], i and j running
// over the lattice points touching row y / column x in increasing order (as on the CPU).
// kSharedRanges: each map row/column's touching range is built once per block in shared
// memory; when W + H ranges do not fit next to the taps (even with the opt-in maximum), each
// thread finds them from the taps instead (the same ranges, so the same sums, only slower).
template <typename scalar_t, bool kChannelsLast, int V, bool kSharedRanges>
__global__ void __launch_bounds__(kOverlapThreads)
    scatter_kernel(const scalar_t* __restrict__ gg, scalar_t* __restrict__ gf,
                   OverlapGeometry geo, SliceDecoder dec, int view, int64_t B, int64_t C,
                   int64_t H, int64_t W, int64_t chunk_vecs, int64_t chunks) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t S = geo.size, SS = S * S, HW = H * W;
  auto* taps = reinterpret_cast<OverlapTap<acc_t>*>(smem);
  auto* ranges = reinterpret_cast<int2*>(smem + 2 * S * sizeof(OverlapTap<acc_t>));  // W x, H y
  const int64_t slice_vecs = C * HW / V;
  for (int64_t blk = blockIdx.x; blk < B * chunks; blk += gridDim.x) {
    const int64_t b = blk / chunks, chunk = blk % chunks;
    __syncthreads();
    load_taps(taps, geo, b, view, H, W);
    __syncthreads();
    if constexpr (kSharedRanges) {
      for (int64_t t = threadIdx.x; t < W + H; t += blockDim.x) {
        ranges[t] = t < W ? touch_range(taps, S, t) : touch_range(taps + S, S, t - W);
      }
      __syncthreads();
    }
    const scalar_t* gb = gg + b * C * SS;
    scalar_t* fb = gf + b * C * HW;
    const int64_t end = min(slice_vecs, (chunk + 1) * chunk_vecs);
    for (int64_t vi = chunk * chunk_vecs + threadIdx.x; vi < end; vi += blockDim.x) {
      const int64_t e = vi * V;
      // Channels-last: e = p * C + c; contiguous: e = c * HW + p; p = y * W + x.
      const auto outer = dec.inner.divmod(static_cast<unsigned int>(e));
      const unsigned int c = kChannelsLast ? outer.mod : outer.div;
      const auto yx = dec.cols.divmod(kChannelsLast ? outer.div : outer.mod);
      const int y = static_cast<int>(yx.div), x = static_cast<int>(yx.mod);
      int2 xr, yr;
      if constexpr (kSharedRanges) {
        xr = ranges[x];
        yr = ranges[W + y];
      } else {
        xr = touch_range(taps, S, x);
        yr = touch_range(taps + S, S, y);
      }
      acc_t acc[V];
#pragma unroll
      for (int k = 0; k < V; ++k) acc[k] = acc_t(0);
      for (int i = yr.x; i <= yr.y; ++i) {
        const OverlapTap<acc_t> yt = taps[S + i];
        if (!overlap_tap_touches(yt, y)) continue;
        const acc_t wy = overlap_tap_weight(yt, y);
        acc_t row[V];
#pragma unroll
        for (int k = 0; k < V; ++k) row[k] = acc_t(0);
        for (int j = xr.x; j <= xr.y; ++j) {
          const OverlapTap<acc_t> xt = taps[j];
          if (!overlap_tap_touches(xt, x)) continue;
          const acc_t wx = overlap_tap_weight(xt, x);
          const int64_t off = kChannelsLast ? (int64_t(i) * S + j) * C + c
                                            : int64_t(c) * SS + int64_t(i) * S + j;
          const Pack<scalar_t, V> val = *reinterpret_cast<const Pack<scalar_t, V>*>(gb + off);
#pragma unroll
          for (int k = 0; k < V; ++k) row[k] += wx * static_cast<acc_t>(val.v[k]);
        }
#pragma unroll
        for (int k = 0; k < V; ++k) acc[k] += wy * row[k];
      }
      Pack<scalar_t, V> out;
#pragma unroll
      for (int k = 0; k < V; ++k) out.v[k] = static_cast<scalar_t>(acc[k]);
      *reinterpret_cast<Pack<scalar_t, V>*>(fb + e) = out;
    }
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// In-slice indices are 32-bit: one batch item of a map (C x plane elements) must hold fewer
// than 2^31 elements. Checked before anything is allocated or copied (the CPU kernels have no
// such limit; CUDA says so instead of computing wrong indices).
void check_slice(int64_t C, int64_t rows, int64_t cols, const char* name) {
  int64_t n = 0;
  const bool overflow = c10::mul_overflows(C, rows, &n) || c10::mul_overflows(n, cols, &n);
  TORCH_CHECK(!overflow && n < (int64_t(1) << 31), "overlap_gather (CUDA): one batch item of ",
              name, " may hold at most 2^31 - 1 elements, got C x H x W = ", C, " x ", rows,
              " x ", cols);
}

SliceDecoder slice_decoder(int64_t C, int64_t plane, int64_t cols, bool channels_last) {
  SliceDecoder dec;
  dec.inner = Divider(static_cast<unsigned int>(std::max<int64_t>(1, channels_last ? C : plane)));
  dec.cols = Divider(static_cast<unsigned int>(std::max<int64_t>(1, cols)));
  return dec;
}

int64_t grid_for(int64_t blocks) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::max<int64_t>(1, std::min<int64_t>(blocks, sms * 32));
}

// Dynamic shared memory a kernel may use without opting in.
constexpr size_t kDefaultSharedBytes = 48 * 1024;

// The most dynamic shared memory one block of the current device may use after opting in
// (the device properties are cached per device by ATen).
size_t max_optin_shared_bytes() {
  return at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
}

// Above 48 KB a kernel must be allowed its dynamic shared memory explicitly, per device. The
// largest amount granted so far is remembered per (kernel, device), so the attribute is set
// once per size increase rather than on every launch.
void opt_in_shared_bytes(const void* kernel, size_t bytes) {
  if (bytes <= kDefaultSharedBytes) return;
  const int device = c10::cuda::current_device();
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, size_t> granted;
  const std::lock_guard<std::mutex> lock(mutex);
  size_t& have = granted[{kernel, device}];
  if (have >= bytes) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
  have = bytes;
}

// Shared memory of one block: 2 x S taps, plus W + H touching ranges (backward). The taps
// alone always fit in 48 KB (S <= 1024, 24-byte taps at most).
size_t tap_bytes(int64_t S, size_t tap_size) {
  const size_t bytes = 2 * S * tap_size;
  TORCH_CHECK(bytes <= kDefaultSharedBytes, "overlap_gather (CUDA): size ", S, " needs ", bytes,
              " bytes of shared memory for its taps, more than ", kDefaultSharedBytes);
  return bytes;
}

// Runs kernel for one view, picking the layout and the vector width.
template <typename scalar_t>
void launch_gather(const at::Tensor& f, const at::Tensor& g, bool channels_last, bool* valid,
                   const OverlapGeometry& geo, int view) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = f.size(0), C = f.size(1), H = f.size(2), W = f.size(3), S = geo.size;
  constexpr int kVec = 16 / sizeof(scalar_t);
  const bool vec = channels_last && C % kVec == 0 && aligned16(f.const_data_ptr()) &&
                   aligned16(g.const_data_ptr());
  const int V = vec ? kVec : 1;
  const int64_t chunk_vecs = int64_t(kOverlapThreads) * kVectorsPerThread;
  const int64_t chunks = std::max<int64_t>(1, (C * S * S / V + chunk_vecs - 1) / chunk_vecs);
  const size_t smem = tap_bytes(S, sizeof(OverlapTap<acc_t>));
  const SliceDecoder dec = slice_decoder(C, S * S, S, channels_last);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(grid_for(B * chunks));
  const scalar_t* src = f.const_data_ptr<scalar_t>();
  scalar_t* dst = g.mutable_data_ptr<scalar_t>();
  if (vec) {
    gather_kernel<scalar_t, true, kVec><<<grid, kOverlapThreads, smem, stream>>>(
        src, dst, valid, geo, dec, view, B, C, H, W, chunk_vecs, chunks);
  } else if (channels_last) {
    gather_kernel<scalar_t, true, 1><<<grid, kOverlapThreads, smem, stream>>>(
        src, dst, valid, geo, dec, view, B, C, H, W, chunk_vecs, chunks);
  } else {
    gather_kernel<scalar_t, false, 1><<<grid, kOverlapThreads, smem, stream>>>(
        src, dst, valid, geo, dec, view, B, C, H, W, chunk_vecs, chunks);
  }
  LUSSCORE_CUDA_CHECK_LAUNCH();
}

template <typename scalar_t>
void launch_scatter(const at::Tensor& gg, const at::Tensor& gf, bool channels_last,
                    const OverlapGeometry& geo, int view) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = gf.size(0), C = gf.size(1), H = gf.size(2), W = gf.size(3), S = geo.size;
  constexpr int kVec = 16 / sizeof(scalar_t);
  const bool vec = channels_last && C % kVec == 0 && aligned16(gg.const_data_ptr()) &&
                   aligned16(gf.const_data_ptr());
  const int V = vec ? kVec : 1;
  const int64_t chunk_vecs = int64_t(kOverlapThreads) * kVectorsPerThread;
  const int64_t chunks = std::max<int64_t>(1, (C * H * W / V + chunk_vecs - 1) / chunk_vecs);
  // The ranges go to shared memory when they fit (opting in above 48 KB), else each thread
  // finds its own.
  const size_t taps = tap_bytes(S, sizeof(OverlapTap<acc_t>));
  const size_t with_ranges = taps + static_cast<size_t>(H + W) * sizeof(int2);
  const bool shared_ranges = with_ranges <= std::max(kDefaultSharedBytes, max_optin_shared_bytes());
  const size_t smem = shared_ranges ? with_ranges : taps;
  const SliceDecoder dec = slice_decoder(C, H * W, W, channels_last);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(grid_for(B * chunks));
  const scalar_t* src = gg.const_data_ptr<scalar_t>();
  scalar_t* dst = gf.mutable_data_ptr<scalar_t>();
  auto launch = [&](auto kernel) {
    opt_in_shared_bytes(reinterpret_cast<const void*>(kernel), smem);
    kernel<<<grid, kOverlapThreads, smem, stream>>>(src, dst, geo, dec, view, B, C, H, W,
                                                    chunk_vecs, chunks);
  };
  if (shared_ranges) {
    if (vec) launch(scatter_kernel<scalar_t, true, kVec, true>);
    else if (channels_last) launch(scatter_kernel<scalar_t, true, 1, true>);
    else launch(scatter_kernel<scalar_t, false, 1, true>);
  } else {
    if (vec) launch(scatter_kernel<scalar_t, true, kVec, false>);
    else if (channels_last) launch(scatter_kernel<scalar_t, true, 1, false>);
    else launch(scatter_kernel<scalar_t, false, 1, false>);
  }
  LUSSCORE_CUDA_CHECK_LAUNCH();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> overlap_gather_cuda(
    const at::Tensor& f1_in, const at::Tensor& f2_in, const at::Tensor& boxes1_in,
    const at::Tensor& boxes2_in, const at::Tensor& flips1_in, const at::Tensor& flips2_in,
    int64_t size, bool cell_centers) {
  overlap_check_features(f1_in, f2_in);
  check_device_type(f1_in, at::kCUDA, "f1");
  overlap_check_pairs(f1_in, f1_in.size(0), boxes1_in, boxes2_in, flips1_in, flips2_in, size);
  check_slice(f1_in.size(1), f1_in.size(2), f1_in.size(3), "f1");
  check_slice(f2_in.size(1), f2_in.size(2), f2_in.size(3), "f2");
  check_slice(f1_in.size(1), size, size, "g1");
  check_slice(f2_in.size(1), size, size, "g2");
  const c10::cuda::CUDAGuard guard(f1_in.device());
  auto [g1, g2, valid] = overlap_gather_outputs(f1_in, f2_in, size);
  if (f1_in.size(0) == 0) return {g1, g2, valid};
  const bool cl1 = overlap_is_channels_last(f1_in), cl2 = overlap_is_channels_last(f2_in);
  const at::Tensor f1 = overlap_dense(f1_in, cl1), f2 = overlap_dense(f2_in, cl2);
  const at::Tensor boxes1 = boxes1_in.contiguous(), boxes2 = boxes2_in.contiguous();
  const at::Tensor flips1 = flips1_in.contiguous(), flips2 = flips2_in.contiguous();
  const OverlapGeometry geo = overlap_geometry(boxes1, boxes2, flips1, flips2, size, cell_centers);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f1.scalar_type(),
                                  "overlap_gather_cuda", [&] {
                                    launch_gather<scalar_t>(f1, g1, cl1,
                                                            valid.mutable_data_ptr<bool>(), geo, 0);
                                    launch_gather<scalar_t>(f2, g2, cl2, nullptr, geo, 1);
                                  });
  return {g1, g2, valid};
}

std::tuple<at::Tensor, at::Tensor> overlap_gather_backward_cuda(
    const at::Tensor& grad_g1_in, const at::Tensor& grad_g2_in, const at::Tensor& boxes1_in,
    const at::Tensor& boxes2_in, const at::Tensor& flips1_in, const at::Tensor& flips2_in,
    int64_t height1, int64_t width1, int64_t height2, int64_t width2, int64_t size,
    bool cell_centers) {
  overlap_check_backward(grad_g1_in, grad_g2_in, size, height1, width1, height2, width2);
  check_device_type(grad_g1_in, at::kCUDA, "grad_g1");
  overlap_check_pairs(grad_g1_in, grad_g1_in.size(0), boxes1_in, boxes2_in, flips1_in,
                      flips2_in, size);
  check_slice(grad_g1_in.size(1), size, size, "grad_g1");
  check_slice(grad_g2_in.size(1), size, size, "grad_g2");
  check_slice(grad_g1_in.size(1), height1, width1, "the gradient of f1");
  check_slice(grad_g2_in.size(1), height2, width2, "the gradient of f2");
  const c10::cuda::CUDAGuard guard(grad_g1_in.device());
  const bool cl1 = overlap_is_channels_last(grad_g1_in);
  const bool cl2 = overlap_is_channels_last(grad_g2_in);
  at::Tensor gf1 = overlap_grad_input(grad_g1_in, height1, width1, cl1);
  at::Tensor gf2 = overlap_grad_input(grad_g2_in, height2, width2, cl2);
  if (grad_g1_in.size(0) == 0) return {gf1, gf2};
  const at::Tensor gg1 = overlap_dense(grad_g1_in, cl1), gg2 = overlap_dense(grad_g2_in, cl2);
  const at::Tensor boxes1 = boxes1_in.contiguous(), boxes2 = boxes2_in.contiguous();
  const at::Tensor flips1 = flips1_in.contiguous(), flips2 = flips2_in.contiguous();
  const OverlapGeometry geo = overlap_geometry(boxes1, boxes2, flips1, flips2, size, cell_centers);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gg1.scalar_type(),
                                  "overlap_gather_backward_cuda", [&] {
                                    launch_scatter<scalar_t>(gg1, gf1, cl1, geo, 0);
                                    launch_scatter<scalar_t>(gg2, gf2, cl2, geo, 1);
                                  });
  return {gf1, gf2};
}

}  // namespace

TORCH_LIBRARY_IMPL(lusscore, CUDA, m) {
  m.impl("overlap_gather", &overlap_gather_cuda);
  m.impl("overlap_gather_backward", &overlap_gather_backward_cuda);
}

}  // namespace lusscore
