// Which x86 ISA level a CPU kernel runs: the widest this CPU has, or the one an environment
// variable names (generic | avx2 | avx512), read at each call, so tests and benchmarks run
// every level the CPU has in one process. Kernels compile their wider levels with GCC's target
// attribute (LUSSCORE_X86_TARGETS); other compilers and CPUs get the generic code.
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LUSSCORE_X86_TARGETS 1
#else
#define LUSSCORE_X86_TARGETS 0
#endif

namespace lusscore {

enum class CpuIsa { generic, avx2, avx512 };

inline const char* cpu_isa_name(CpuIsa isa) {
  return isa == CpuIsa::avx512 ? "avx512" : isa == CpuIsa::avx2 ? "avx2" : "generic";
}

inline CpuIsa cpu_isa(const char* env_name) {
  const char* env = std::getenv(env_name);
  const std::string wanted = env == nullptr ? "" : env;
  TORCH_CHECK(wanted.empty() || wanted == "avx512" || wanted == "avx2" || wanted == "generic",
              env_name, " must be avx512, avx2 or generic, got '", wanted, "'");
  if (wanted == "generic") return CpuIsa::generic;
#if LUSSCORE_X86_TARGETS
  __builtin_cpu_init();
  const bool has_avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  TORCH_CHECK(wanted != "avx512" || has_avx512, env_name, "=avx512, but this CPU has no AVX-512");
  TORCH_CHECK(wanted != "avx2" || has_avx2, env_name, "=avx2, but this CPU has no AVX2 with FMA");
  if (has_avx512 && wanted != "avx2") return CpuIsa::avx512;
  if (has_avx2) return CpuIsa::avx2;
#else
  TORCH_CHECK(wanted.empty(), env_name, "=", wanted, ": this build has only the generic kernels");
#endif
  return CpuIsa::generic;
}

}  // namespace lusscore
