// Number types, conversions and row layout shared by the CPU and CUDA kernels (no torch).
//
// Inputs are rows of `cols` contiguous elements. Rows are cut into fixed-size chunks
// ("work items") so that a few long rows still spread over threads (CPU) or blocks
// (CUDA); each item writes one fp32 partial sum of squares, and the partials of a row
// are added afterwards. Results do not depend on how items are split over threads.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace memscan {

// IEEE binary16 and bfloat16, as their bits (layout-compatible with c10::Half/BFloat16).
struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

inline float float_from_bits(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint32_t bits_from_float(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
}

// All ones when `condition` holds, else zero: selects by masks, which GCC vectorizes where
// it leaves a ?: as control flow.
inline uint32_t select_mask(bool condition) { return 0u - static_cast<uint32_t>(condition); }

// Branch-free conversions (so that the inner loops stay vectorizable), after the FP16
// library of M. Dukhan (MIT), which c10::Half also uses; rounding is to nearest even.
inline float to_float(float x) { return x; }

inline float to_float(Half h) {
  const uint32_t w = static_cast<uint32_t>(h.bits) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  // Normal numbers: move the exponent into place, then rescale by 2^-112.
  const float normal = float_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  // Subnormals: the mantissa as the low bits of 0.5f's significand, minus 0.5.
  const float subnormal = float_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t subnormal_mask = select_mask(two_w < (1u << 27));
  const uint32_t magnitude =
      (bits_from_float(subnormal) & subnormal_mask) | (bits_from_float(normal) & ~subnormal_mask);
  return float_from_bits(sign | magnitude);
}

inline float to_float(BFloat16 b) { return float_from_bits(static_cast<uint32_t>(b.bits) << 16); }

template <typename T>
T from_float(float x);

template <>
inline float from_float<float>(float x) {
  return x;
}

template <>
inline Half from_float<Half>(float x) {
  const uint32_t w = bits_from_float(x);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  // Scaling by 2^112 then 2^-110 makes the FPU round the mantissa to 10 bits (and
  // overflow to infinity) for us; the bias keeps small values on the subnormal grid.
  float base = (std::fabs(x) * 0x1.0p+112f) * 0x1.0p-110f;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = float_from_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = bits_from_float(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  const uint32_t nan_mask = select_mask(shl1_w > 0xFF000000u);
  return Half{static_cast<uint16_t>((sign >> 16) | (0x7E00u & nan_mask) | (nonsign & ~nan_mask))};
}

template <>
inline BFloat16 from_float<BFloat16>(float x) {
  const uint32_t bits = bits_from_float(x);
  const uint32_t rounding_bias = 0x7FFFu + ((bits >> 16) & 1u);
  const uint32_t rounded = (bits + rounding_bias) >> 16;
  const uint32_t nan_mask = select_mask(x != x);  // NaN: a quiet NaN, as c10
  return BFloat16{static_cast<uint16_t>((0x7FC0u & nan_mask) | (rounded & ~nan_mask))};
}

// Elements per CPU work item: long enough to amortise a task, short enough that B = 1
// rows of 4 x 128 x 128 latents still split over a few threads.
constexpr int64_t kChunk = 16384;

// Where the rows are: `cols` contiguous elements per row; uncond rows `uncond_row_stride`
// elements apart (0 broadcasts one uncond row over the batch).
struct RowLayout {
  int64_t rows;
  int64_t cols;
  int64_t uncond_row_stride;
  int64_t chunk = kChunk;
};

// Work items per row (at least 1, so that empty rows still get a zero partial).
inline int64_t chunks_per_row(const RowLayout& layout) {
  return layout.cols <= 0 ? 1 : (layout.cols + layout.chunk - 1) / layout.chunk;
}

inline int64_t num_items(const RowLayout& layout) { return layout.rows * chunks_per_row(layout); }

}  // namespace memscan
