// ctest: the CPU kernels of fused_guidance_cpu.h against a scalar double reference.
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "fused_guidance_cpu.h"
#include "test_reference.h"

namespace memscan::testing {
namespace {

constexpr float kGuidanceScale = 7.5f;

// binary16 decoded from its fields with ldexp: independent of the bit tricks under test.
double decode_half(uint16_t bits) {
  const int exponent = (bits >> 10) & 0x1F;
  const int mantissa = bits & 0x3FF;
  const double sign = (bits & 0x8000) ? -1.0 : 1.0;
  if (exponent == 0x1F) return mantissa ? std::nan("") : sign * HUGE_VAL;
  if (exponent == 0) return sign * std::ldexp(mantissa, -24);
  return sign * std::ldexp(1024 + mantissa, exponent - 25);
}

void test_half_conversions() {
  for (uint32_t bits = 0; bits <= 0xFFFF; ++bits) {
    const Half h{static_cast<uint16_t>(bits)};
    const double want = decode_half(h.bits);
    const float got = to_float(h);
    if (std::isnan(want)) {
      expect(std::isnan(got) && std::isnan(to_float(from_float<Half>(got))), "half NaN", got, want);
      continue;
    }
    expect(got == want, "half to float", got, want);
    expect(from_float<Half>(got).bits == h.bits, "half round trip", from_float<Half>(got).bits, h.bits);
    // Halfway to the next half up (same sign) rounds to the one with an even mantissa.
    const bool is_max_finite = (bits & 0x7FFF) == 0x7BFF;
    if ((bits & 0x7FFF) < 0x7C00 && !is_max_finite) {
      const Half next{static_cast<uint16_t>(bits + 1)};
      const float midpoint = static_cast<float>((want + decode_half(next.bits)) / 2);
      const uint16_t even = (h.bits & 1) ? next.bits : h.bits;
      expect(from_float<Half>(midpoint).bits == even, "half ties to even", from_float<Half>(midpoint).bits, even);
    }
  }
  expect(std::isinf(to_float(from_float<Half>(70000.0f))), "half overflow to inf", 0, 0);
}

void test_bfloat16_conversions() {
  for (uint32_t bits = 0; bits <= 0xFFFF; ++bits) {
    const BFloat16 b{static_cast<uint16_t>(bits)};
    const float value = to_float(b);
    if (std::isnan(value)) {
      expect(std::isnan(to_float(from_float<BFloat16>(value))), "bfloat16 NaN", value, value);
      continue;
    }
    expect(from_float<BFloat16>(value).bits == b.bits, "bfloat16 round trip", from_float<BFloat16>(value).bits, bits);
    if ((bits & 0x7FFF) < 0x7F7F) {
      const float next = to_float(BFloat16{static_cast<uint16_t>(bits + 1)});
      const float midpoint = static_cast<float>((static_cast<double>(value) + next) / 2);
      const uint16_t even = (bits & 1) ? bits + 1 : bits;
      expect(from_float<BFloat16>(midpoint).bits == even, "bfloat16 ties to even", from_float<BFloat16>(midpoint).bits,
             even);
    }
  }
}

// Norms and guided values of one case, with outputs poisoned by NaN beforehand.
template <typename T>
void test_case(const Case<T>& c) {
  const RowLayout& layout = c.layout;
  std::vector<float> partials(num_items(layout), std::numeric_limits<float>::quiet_NaN());
  std::vector<T> guided(c.cond.size(), from_float<T>(std::numeric_limits<float>::quiet_NaN()));
  std::vector<float> norms(layout.rows, std::numeric_limits<float>::quiet_NaN());
  fused_guidance_items(c.cond.data(), c.uncond.data(), guided.data(), kGuidanceScale, layout, 0, num_items(layout),
                       partials.data());
  partials_to_norms(partials.data(), layout, norms.data());

  // The norm-only pass gives the same partials, bit for bit.
  std::vector<float> norm_only(num_items(layout), std::numeric_limits<float>::quiet_NaN());
  fused_guidance_items<T>(c.cond.data(), c.uncond.data(), nullptr, 0.0f, layout, 0, num_items(layout),
                          norm_only.data());
  for (size_t i = 0; i < partials.size(); ++i) {
    expect(norm_only[i] == partials[i], "norm-only partial", norm_only[i], partials[i]);
  }

  check_outputs(c, norms.data(), guided.data(), kGuidanceScale);
}

// Any split of the work items over threads gives the same partials, bit for bit.
template <typename T>
void test_split_invariance(const Case<T>& c) {
  const int64_t items = num_items(c.layout);
  std::vector<float> whole(items), split(items);
  fused_guidance_items<T>(c.cond.data(), c.uncond.data(), nullptr, 0.0f, c.layout, 0, items, whole.data());
  for (int64_t cut = 0; cut <= items; ++cut) {
    fused_guidance_items<T>(c.cond.data(), c.uncond.data(), nullptr, 0.0f, c.layout, 0, cut, split.data());
    fused_guidance_items<T>(c.cond.data(), c.uncond.data(), nullptr, 0.0f, c.layout, cut, items, split.data());
    for (int64_t i = 0; i < items; ++i) expect(split[i] == whole[i], "split partial", split[i], whole[i]);
  }
}

template <typename T>
void test_type(std::mt19937& rng) {
  for (const Shape& shape : test_shapes()) {
    for (bool broadcast : {false, true}) {
      const Case<T> c = random_case<T>(shape.rows, shape.cols, broadcast, rng);
      test_case(c);
      test_split_invariance(c);
    }
  }
}

void test_empty_rows() {
  const RowLayout layout{3, 0, 0};
  std::vector<float> partials(num_items(layout), 1.0f), norms(3, 1.0f);
  fused_guidance_items<float>(nullptr, nullptr, nullptr, 0.0f, layout, 0, num_items(layout), partials.data());
  partials_to_norms(partials.data(), layout, norms.data());
  for (float norm : norms) expect(norm == 0.0f, "empty row norm", norm, 0.0);
}

}  // namespace
}  // namespace memscan::testing

int main() {
  using namespace memscan;
  using namespace memscan::testing;
  std::mt19937 rng(20240611);
  test_half_conversions();
  test_bfloat16_conversions();
  test_type<float>(rng);
  test_type<Half>(rng);
  test_type<BFloat16>(rng);
  test_empty_rows();
  std::printf("%s: %d failure(s)\n", failures() ? "FAILED" : "passed", failures());
  return failures() ? 1 : 0;
}
