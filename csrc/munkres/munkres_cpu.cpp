// munkres_assign: the Munkres (Hungarian) algorithm exactly as the `munkres` 1.1.4 Python
// package runs it (same steps, scan orders and float comparisons), so that ties resolve to
// the same assignment as the official ImageNet-S matching. Arithmetic is done in the cost
// tensor's dtype. CPU only: the matrices are at most a few thousand wide.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <limits>
#include <tuple>
#include <vector>

#include "common/checks.h"

namespace lusscore {
namespace {

template <typename T>
class Munkres {
 public:
  explicit Munkres(std::vector<T> cost, int64_t n)
      : n_(n), c_(std::move(cost)), marked_(n * n, 0), row_cov_(n, 0), col_cov_(n, 0) {}

  // Starred column of each row (the package's `compute` result, as a row -> column table).
  std::vector<int64_t> solve() {
    int step = 1;
    while (step != 7) {
      switch (step) {
        case 1: step = step1(); break;
        case 2: step = step2(); break;
        case 3: step = step3(); break;
        case 4: step = step4(); break;
        case 5: step = step5(); break;
        case 6: step = step6(); break;
      }
    }
    std::vector<int64_t> cols(n_, -1);
    for (int64_t i = 0; i < n_; ++i)
      for (int64_t j = 0; j < n_; ++j)
        if (mark(i, j) == 1) { cols[i] = j; break; }
    return cols;
  }

 private:
  T& at(int64_t i, int64_t j) { return c_[i * n_ + j]; }
  int8_t& mark(int64_t i, int64_t j) { return marked_[i * n_ + j]; }
  void clear_covers() {
    std::fill(row_cov_.begin(), row_cov_.end(), 0);
    std::fill(col_cov_.begin(), col_cov_.end(), 0);
  }

  // The zero columns of each row, ascending: the matrix only changes in steps 1 and 6.
  void index_zeros(int64_t i) {
    zeros_[i].clear();
    for (int64_t j = 0; j < n_; ++j)
      if (at(i, j) == 0) zeros_[i].push_back(j);
  }

  int step1() {  // subtract each row's minimum
    zeros_.assign(n_, {});
    for (int64_t i = 0; i < n_; ++i) {
      T minval = at(i, 0);
      for (int64_t j = 1; j < n_; ++j) minval = at(i, j) < minval ? at(i, j) : minval;
      for (int64_t j = 0; j < n_; ++j) at(i, j) -= minval;
      index_zeros(i);
    }
    return 2;
  }

  int step2() {  // star the first free zero of each row
    for (int64_t i = 0; i < n_; ++i) {
      for (int64_t j = 0; j < n_; ++j) {
        if (at(i, j) == 0 && !col_cov_[j] && !row_cov_[i]) {
          mark(i, j) = 1;
          col_cov_[j] = 1;
          row_cov_[i] = 1;
          break;
        }
      }
    }
    clear_covers();
    return 3;
  }

  int step3() {  // cover starred columns; done when all are covered
    int64_t count = 0;
    for (int64_t i = 0; i < n_; ++i)
      for (int64_t j = 0; j < n_; ++j)
        if (mark(i, j) == 1 && !col_cov_[j]) {
          col_cov_[j] = 1;
          ++count;
        }
    return count >= n_ ? 7 : 4;
  }

  // First uncovered zero scanning rows from i0 and, in each row, columns from j0 (wrapping).
  // The package keeps scanning after a hit, so the LAST hit of that order wins.
  std::pair<int64_t, int64_t> find_a_zero(int64_t i0, int64_t j0) {
    int64_t row = -1, col = -1;
    int64_t i = i0;
    do {
      if (!row_cov_[i]) {
        int64_t best = -1;  // position in the scan order j0, j0+1, ..., j0-1 (mod n)
        for (const int64_t j : zeros_[i]) {
          if (col_cov_[j]) continue;
          const int64_t pos = (j - j0 + n_) % n_;
          if (pos > best) {
            best = pos;
            col = j;
          }
        }
        if (best >= 0) return {i, col};
      }
      i = (i + 1) % n_;
    } while (i != i0);
    return {row, col};
  }

  int64_t find_star_in_row(int64_t row) {
    for (int64_t j = 0; j < n_; ++j)
      if (mark(row, j) == 1) return j;
    return -1;
  }
  int64_t find_star_in_col(int64_t col) {
    for (int64_t i = 0; i < n_; ++i)
      if (mark(i, col) == 1) return i;
    return -1;
  }
  int64_t find_prime_in_row(int64_t row) {
    for (int64_t j = 0; j < n_; ++j)
      if (mark(row, j) == 2) return j;
    return -1;
  }

  int step4() {
    int64_t row = 0, col = 0;
    while (true) {
      std::tie(row, col) = find_a_zero(row, col);
      if (row < 0) return 6;
      mark(row, col) = 2;
      const int64_t star_col = find_star_in_row(row);
      if (star_col >= 0) {
        col = star_col;
        row_cov_[row] = 1;
        col_cov_[col] = 0;
      } else {
        z0_r_ = row;
        z0_c_ = col;
        return 5;
      }
    }
  }

  int step5() {  // augment along the alternating path of primes and stars
    std::vector<std::pair<int64_t, int64_t>> path{{z0_r_, z0_c_}};
    while (true) {
      const int64_t row = find_star_in_col(path.back().second);
      if (row < 0) break;
      path.emplace_back(row, path.back().second);
      const int64_t col = find_prime_in_row(path.back().first);
      path.emplace_back(path.back().first, col);
    }
    for (const auto& [r, c] : path) mark(r, c) = mark(r, c) == 1 ? 0 : 1;
    clear_covers();
    for (auto& m : marked_)
      if (m == 2) m = 0;
    return 3;
  }

  int step6() {
    bool found = false;
    T minval = 0;
    for (int64_t i = 0; i < n_; ++i) {
      if (row_cov_[i]) continue;
      for (int64_t j = 0; j < n_; ++j)
        if (!col_cov_[j] && (!found || minval > at(i, j))) {
          minval = at(i, j);
          found = true;
        }
    }
    TORCH_CHECK(found, "munkres_assign: the matrix cannot be solved");
    bool changed = false;
    for (int64_t i = 0; i < n_; ++i) {
      for (int64_t j = 0; j < n_; ++j) {
        if (row_cov_[i]) at(i, j) += minval;
        if (!col_cov_[j]) at(i, j) -= minval;
        changed = changed || (row_cov_[i] != 0) != (!col_cov_[j]);
      }
      index_zeros(i);
    }
    TORCH_CHECK(changed, "munkres_assign: the matrix cannot be solved");
    return 4;
  }

  int64_t n_;
  std::vector<T> c_;
  std::vector<int8_t> marked_;
  std::vector<uint8_t> row_cov_, col_cov_;
  std::vector<std::vector<int64_t>> zeros_;
  int64_t z0_r_ = 0, z0_c_ = 0;
};

at::Tensor munkres_assign_cpu(const at::Tensor& cost) {
  check_dim(cost, 2, "cost");
  check_dtype(cost, {at::kFloat, at::kDouble}, "cost");
  const int64_t rows = cost.size(0), cols = cost.size(1);
  at::Tensor out = at::full({rows}, -1, cost.options().dtype(at::kLong));
  if (rows == 0 || cols == 0) return out;
  const at::Tensor c = cost.contiguous();
  TORCH_CHECK(at::isfinite(c).all().item<bool>(), "cost must hold finite values");
  const int64_t n = std::max(rows, cols);  // padded with zeros to a square, as the package does
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "munkres_assign_cpu", [&] {
    std::vector<scalar_t> square(n * n, scalar_t(0));
    const scalar_t* src = c.data_ptr<scalar_t>();
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) square[i * n + j] = src[i * cols + j];
    const std::vector<int64_t> assigned = Munkres<scalar_t>(std::move(square), n).solve();
    int64_t* dst = out.data_ptr<int64_t>();
    for (int64_t i = 0; i < rows; ++i) dst[i] = assigned[i] < cols ? assigned[i] : -1;
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lusscore, CPU, m) { m.impl("munkres_assign", &munkres_assign_cpu); }

}  // namespace lusscore
