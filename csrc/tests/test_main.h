// A tiny test harness for the C++ tests (ctest runs each executable; non-zero exit = fail).
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <cstdio>
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace lusscore_test {

inline std::vector<std::pair<std::string, std::function<void()>>>& registry() {
  static std::vector<std::pair<std::string, std::function<void()>>> tests;
  return tests;
}

struct Register {
  Register(const char* name, std::function<void()> fn) { registry().emplace_back(name, fn); }
};

#define LUSS_TEST(name)                                              \
  static void name();                                                \
  static lusscore_test::Register name##_reg(#name, name);            \
  static void name()

#define LUSS_EXPECT(cond)                                                                 \
  do {                                                                                    \
    if (!(cond)) throw std::runtime_error(std::string("expectation failed: ") + #cond);   \
  } while (0)

inline c10::OperatorHandle op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

inline int run_all() {
  int failed = 0;
  for (auto& [name, fn] : registry()) {
    try {
      fn();
      std::printf("PASS %s\n", name.c_str());
    } catch (const std::exception& e) {
      ++failed;
      std::printf("FAIL %s: %s\n", name.c_str(), e.what());
    }
  }
  std::printf("%zu passed, %d failed\n", registry().size() - failed, failed);
  return failed == 0 ? 0 : 1;
}

}  // namespace lusscore_test
