// The Python module lusscore._C. Ops register themselves through TORCH_LIBRARY blocks in
// this library; the module only says how the library was built.
#include <torch/extension.h>

#define LUSSCORE_STR_(x) #x
#define LUSSCORE_STR(x) LUSSCORE_STR_(x)

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("with_cuda") = static_cast<bool>(LUSSCORE_WITH_CUDA);
  // "8.0_9.0" style: the archs the CUDA kernels were compiled for ("none" without CUDA).
  m.attr("cuda_archs") = LUSSCORE_STR(LUSSCORE_CUDA_ARCHS);
}
