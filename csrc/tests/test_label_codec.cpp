#include "tests/test_main.h"

LUSS_TEST(rgb_to_label_decodes_ids) {
  auto rgb = torch::zeros({2, 3, 3}, torch::kUInt8);
  rgb.index_put_({1, 2, 0}, 232);  // ignore: (232, 3, 0) -> 1000
  rgb.index_put_({1, 2, 1}, 3);
  rgb.index_put_({0, 1, 0}, 7);
  auto out = lusscore_test::op("lusscore::rgb_to_label").typed<at::Tensor(const at::Tensor&)>()
                 .call(rgb);
  LUSS_EXPECT(out.scalar_type() == torch::kLong);
  LUSS_EXPECT(out.sizes() == torch::IntArrayRef({2, 3}));
  LUSS_EXPECT(out[1][2].item<int64_t>() == 1000);
  LUSS_EXPECT(out[0][1].item<int64_t>() == 7);
  LUSS_EXPECT(out.sum().item<int64_t>() == 1007);
}

LUSS_TEST(rgb_to_label_rejects_wrong_dtype) {
  bool threw = false;
  try {
    lusscore_test::op("lusscore::rgb_to_label").typed<at::Tensor(const at::Tensor&)>()
        .call(torch::zeros({2, 2, 3}, torch::kFloat));
  } catch (const c10::Error&) {
    threw = true;
  }
  LUSS_EXPECT(threw);
}

int main() { return lusscore_test::run_all(); }
