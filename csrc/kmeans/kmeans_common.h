// Argument checks and tiling choices of kmeans_assign / kmeans_update, shared by both devices.
#pragma once

#include <string>
#include <tuple>

#include "common/checks.h"
#include "kmeans/kmeans_kernel.h"

namespace lusscore {
namespace kmeans {

inline Metric parse_metric(c10::string_view metric) {
  if (metric == "l2") return Metric::L2;
  if (metric == "ip") return Metric::IP;
  TORCH_CHECK(false, "metric must be \"l2\" (squared Euclidean) or \"ip\" (inner product), got \"",
              std::string(metric), "\"");
}

// allow_double = false: the CUDA kernels, which take fp32/bf16/fp16 rows only.
inline void check_features(const at::Tensor& t, const char* name, bool allow_double) {
  check_dim(t, 2, name);
  if (allow_double) {
    check_dtype(t, {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf}, name);
  } else {
    TORCH_CHECK(t.scalar_type() != at::kDouble, name, " must have dtype in {Float, BFloat16, Half} "
                "on CUDA, got Double (float64 rows run on the CPU only)");
    check_dtype(t, {at::kFloat, at::kBFloat16, at::kHalf}, name);
  }
}

// Checks and output allocation of kmeans_assign: labels int64 (N) and values (N), float32
// (float64 when x is float64). Centroids may be float64 on both devices: they are rounded to
// the compute type (float32 unless x is float64). allow_double_x: x may be float64 (CPU only).
inline std::tuple<at::Tensor, at::Tensor> assign_prepare(const at::Tensor& x,
                                                         const at::Tensor& centroids,
                                                         bool allow_double_x) {
  check_features(x, "x", allow_double_x);
  check_features(centroids, "centroids", /*allow_double=*/true);
  check_same_device(x, centroids, "x", "centroids");
  TORCH_CHECK(x.size(1) == centroids.size(1), "x and centroids must have the same number of "
              "columns (D), got x ", x.sizes(), " and centroids ", centroids.sizes());
  TORCH_CHECK(centroids.size(0) > 0, "centroids must have at least one row (K >= 1), got shape ",
              centroids.sizes());
  const auto value_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return {at::empty({x.size(0)}, x.options().dtype(at::kLong)),
          at::empty({x.size(0)}, x.options().dtype(value_type))};
}

inline void update_check(const at::Tensor& x, const at::Tensor& labels, int64_t k,
                         bool allow_double) {
  check_features(x, "x", allow_double);
  check_dim(labels, 1, "labels");
  check_dtype(labels, {at::kLong}, "labels");
  check_same_device(x, labels, "x", "labels");
  TORCH_CHECK(labels.size(0) == x.size(0), "labels must have one entry per row of x, got ",
              labels.size(0), " labels for ", x.size(0), " rows");
  TORCH_CHECK(k >= 1, "k (the number of clusters) must be >= 1, got ", k);
  TORCH_CHECK(k < (int64_t(1) << 31), "k (the number of clusters) must be < 2^31, got ", k);
}

}  // namespace kmeans

// The CPU micro-kernel kmeans_assign would run now (kmeans_cpu.cpp): avx512, avx2 or generic.
std::string kmeans_cpu_kernel();

}  // namespace lusscore
