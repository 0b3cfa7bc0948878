#include "tests/test_main.h"

namespace {

using Fwd = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, bool);
using Bwd = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, bool);

std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& x, const at::Tensor& a,
                                       const at::Tensor& t, bool mean) {
  return lusscore_test::op("lusscore::attention_pool").typed<Fwd>().call(x, a, t, mean);
}

}  // namespace

LUSS_TEST(attention_pool_matches_formula) {
  auto x = torch::randn({2, 3, 4, 5}, torch::kDouble);
  auto a = torch::randn({2, 3, 4, 5}, torch::kDouble);
  auto theta = torch::randn({3}, torch::kDouble);
  auto [pooled, mean] = fwd(x, a, theta, true);
  auto c = torch::sigmoid(a + theta.view({1, 3, 1, 1}));
  LUSS_EXPECT(torch::allclose(pooled, (c * x).mean({2, 3}), 1e-12, 1e-12));
  LUSS_EXPECT(torch::allclose(mean, c.mean({1}), 1e-12, 1e-12));
  auto [only, empty] = fwd(x, a, theta, false);
  LUSS_EXPECT(empty.numel() == 0);
  LUSS_EXPECT(torch::equal(only, pooled));
}

LUSS_TEST(attention_pool_backward_matches_formula) {
  auto x = torch::randn({2, 3, 4, 5}, torch::kDouble);
  auto a = torch::randn({2, 3, 4, 5}, torch::kDouble);
  auto theta = torch::randn({3}, torch::kDouble);
  auto gp = torch::randn({2, 3}, torch::kDouble);
  auto [gx, ga, gt] = lusscore_test::op("lusscore::attention_pool_backward")
                          .typed<Bwd>()
                          .call(gp, std::nullopt, x, a, theta, true);
  auto c = torch::sigmoid(a + theta.view({1, 3, 1, 1}));
  auto gh = gp.view({2, 3, 1, 1}) / 20.0;
  LUSS_EXPECT(torch::allclose(gx, gh * c, 1e-12, 1e-12));
  auto want_ga = gh * x * c * (1 - c);
  LUSS_EXPECT(torch::allclose(ga, want_ga, 1e-12, 1e-12));
  LUSS_EXPECT(torch::allclose(gt, want_ga.sum({0, 2, 3}), 1e-12, 1e-12));
}

LUSS_TEST(attention_pool_rejects_bad_theta) {
  bool threw = false;
  try {
    fwd(torch::zeros({1, 3, 2, 2}), torch::zeros({1, 3, 2, 2}), torch::zeros({4}), false);
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("theta must have L = 3") != std::string::npos;
  }
  LUSS_EXPECT(threw);
}

int main() { return lusscore_test::run_all(); }
