// The Python module lusscore._C. Ops register themselves through TORCH_LIBRARY blocks in
// this library; the module only says how the library was built.
#include <torch/extension.h>

#include "attention_pool/attention_pool_common.h"
#include "kmeans/kmeans_common.h"

#define LUSSCORE_STR_(x) #x
#define LUSSCORE_STR(x) LUSSCORE_STR_(x)

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("with_cuda") = static_cast<bool>(LUSSCORE_WITH_CUDA);
  // "8.0_9.0" style: the archs the CUDA kernels were compiled for ("none" without CUDA).
  m.attr("cuda_archs") = LUSSCORE_STR(LUSSCORE_CUDA_ARCHS);
  m.def("kmeans_cpu_kernel", &lusscore::kmeans_cpu_kernel,
        "The CPU micro-kernel kmeans_assign runs now: avx512, avx2 or generic "
        "(LUSSCORE_KMEANS_CPU_KERNEL forces one).");
  m.def("attention_pool_cpu_kernel", &lusscore::attention_pool_cpu_kernel,
        "The ISA level of attention_pool's CPU kernel now: avx512, avx2 or generic "
        "(LUSSCORE_ATTENTION_POOL_CPU_KERNEL forces one).");
}
