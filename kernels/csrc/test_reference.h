// Scalar double-precision reference and random cases for the kernel tests (no torch).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "fused_guidance_types.h"

namespace memscan::testing {

// Failures so far; main() returns non-zero when any.
inline int& failures() {
  static int count = 0;
  return count;
}

inline void expect(bool ok, const char* what, double got, double want) {
  if (ok) return;
  ++failures();
  std::fprintf(stderr, "FAIL %s: got %.9g, want %.9g\n", what, got, want);
}

inline bool close(double got, double want, double rtol, double atol) {
  return std::fabs(got - want) <= atol + rtol * std::fabs(want);
}

// A problem in the input type T: rows x cols cond, and 1 or rows uncond rows.
template <typename T>
struct Case {
  RowLayout layout;
  std::vector<T> cond;
  std::vector<T> uncond;
};

template <typename T>
Case<T> random_case(int64_t rows, int64_t cols, bool broadcast, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Case<T> c{RowLayout{rows, cols, broadcast ? 0 : cols}, {}, {}};
  for (int64_t i = 0; i < rows * cols; ++i) c.cond.push_back(from_float<T>(normal(rng)));
  for (int64_t i = 0; i < (broadcast ? 1 : rows) * cols; ++i) c.uncond.push_back(from_float<T>(normal(rng)));
  return c;
}

template <typename T>
double uncond_at(const Case<T>& c, int64_t row, int64_t col) {
  return to_float(c.uncond[row * c.layout.uncond_row_stride + col]);
}

// ||cond[row] - uncond[row or 0]||_2, summed in double.
template <typename T>
double reference_norm(const Case<T>& c, int64_t row) {
  double total = 0.0;
  for (int64_t col = 0; col < c.layout.cols; ++col) {
    const double d = to_float(c.cond[row * c.layout.cols + col]) - uncond_at(c, row, col);
    total += d * d;
  }
  return std::sqrt(total);
}

// uncond + w * (cond - uncond) at one element, in double.
template <typename T>
double reference_guided(const Case<T>& c, int64_t row, int64_t col, double guidance_scale) {
  const double u = uncond_at(c, row, col);
  return u + guidance_scale * (to_float(c.cond[row * c.layout.cols + col]) - u);
}

// Rows x cols to test: not powers of two, shorter than a lane block, several chunks,
// one long row, more rows than threads.
struct Shape {
  int64_t rows;
  int64_t cols;
};
inline const std::vector<Shape>& test_shapes() {
  static const std::vector<Shape> shapes{{1, 105}, {3, 1000}, {5, 4 * 33 * 31}, {2, kChunk + 17}, {70, 13},
                                         {1, 3 * kChunk + 5}, {4, 16}, {2, 1}};
  return shapes;
}

// Relative spacing of the input type: the tolerance for a guided value rounded to it.
template <typename T>
double type_epsilon();
template <>
inline double type_epsilon<float>() {
  return 1.2e-7;
}
template <>
inline double type_epsilon<Half>() {
  return 9.8e-4;
}
template <>
inline double type_epsilon<BFloat16>() {
  return 7.9e-3;
}

// Checks a kernel's norms and guided values (guided may be null) against the reference.
template <typename T>
void check_outputs(const Case<T>& c, const float* norms, const T* guided, float guidance_scale) {
  const RowLayout& layout = c.layout;
  for (int64_t row = 0; row < layout.rows; ++row) {
    const double want = reference_norm(c, row);
    expect(close(norms[row], want, 1e-5, 1e-5), "norm", norms[row], want);
    for (int64_t col = 0; guided != nullptr && col < layout.cols; ++col) {
      const double got = to_float(guided[row * layout.cols + col]);
      const double want_guided = reference_guided(c, row, col, guidance_scale);
      // Rounding to T, after fp32 rounding of both terms of u + w * d.
      const double u = uncond_at(c, row, col);
      const double scaled_diff = guidance_scale * (to_float(c.cond[row * layout.cols + col]) - u);
      const double tol = 2 * type_epsilon<T>() * (std::fabs(u) + std::fabs(scaled_diff));
      expect(close(got, want_guided, 0, tol), "guided", got, want_guided);
    }
  }
}

}  // namespace memscan::testing
