// Argument checks shared by every op: each failure says which argument and what is wrong.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <string>

namespace lusscore {

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions, got shape ", t.sizes());
}

inline void check_dtype(const at::Tensor& t, std::initializer_list<at::ScalarType> allowed,
                        const char* name) {
  for (auto s : allowed) {
    if (t.scalar_type() == s) return;
  }
  std::string list;
  for (auto s : allowed) list += std::string(list.empty() ? "" : ", ") + c10::toString(s);
  TORCH_CHECK(false, name, " must have dtype in {", list, "}, got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* name_a,
                              const char* name_b) {
  TORCH_CHECK(a.device() == b.device(), name_a, " and ", name_b,
              " must be on the same device, got ", a.device(), " and ", b.device());
}

inline void check_device_type(const at::Tensor& t, c10::DeviceType type, const char* name) {
  TORCH_CHECK(t.device().type() == type, name, " must be a ", c10::DeviceTypeName(type),
              " tensor, got ", t.device());
}

}  // namespace lusscore
