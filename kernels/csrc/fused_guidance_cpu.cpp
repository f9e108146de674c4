#include "fused_guidance_cpu.h"

#include <algorithm>
#include <cmath>

namespace memscan {
namespace {

// x86-64 with GCC: one clone per ISA level, picked when the library loads. The fp32 path is
// memory-bound either way; fp16 converts 4x faster with F16C/AVX2 than with SSE2 bit tricks.
// MEMSCAN_BASELINE_ISA builds the baseline alone (so that ctest covers it too).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(MEMSCAN_BASELINE_ISA)
#define MEMSCAN_ISA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MEMSCAN_ISA_CLONES
#endif

// Independent accumulators, one per lane: the compiler vectorizes the lane loop without
// -ffast-math (a single accumulator would be a serial dependency it may not reorder).
constexpr int kLanes = 16;

template <typename T, bool kWriteGuided>
MEMSCAN_ISA_CLONES float chunk_sum_of_squares(const T* cond, const T* uncond, T* guided, float guidance_scale,
                                              int64_t n) {
  float lane_acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int lane = 0; lane < kLanes; ++lane) {
      const float u = to_float(uncond[i + lane]);
      const float d = to_float(cond[i + lane]) - u;
      lane_acc[lane] += d * d;
      if (kWriteGuided) guided[i + lane] = from_float<T>(u + guidance_scale * d);
    }
  }
  for (int lane = 0; i < n; ++i, ++lane) {
    const float u = to_float(uncond[i]);
    const float d = to_float(cond[i]) - u;
    lane_acc[lane] += d * d;
    if (kWriteGuided) guided[i] = from_float<T>(u + guidance_scale * d);
  }
  float total = 0.0f;
  for (float lane_sum : lane_acc) total += lane_sum;
  return total;
}

}  // namespace

template <typename T>
void fused_guidance_items(const T* cond, const T* uncond, T* guided, float guidance_scale,
                          const RowLayout& layout, int64_t item_begin, int64_t item_end, float* partials) {
  const int64_t chunks = chunks_per_row(layout);
  for (int64_t item = item_begin; item < item_end; ++item) {
    const int64_t row = item / chunks;
    const int64_t col_begin = (item % chunks) * layout.chunk;
    const int64_t n = std::max<int64_t>(0, std::min(layout.chunk, layout.cols - col_begin));
    const int64_t offset = row * layout.cols + col_begin;
    const T* uncond_chunk = uncond + row * layout.uncond_row_stride + col_begin;
    partials[item] =
        guided == nullptr
            ? chunk_sum_of_squares<T, false>(cond + offset, uncond_chunk, nullptr, 0.0f, n)
            : chunk_sum_of_squares<T, true>(cond + offset, uncond_chunk, guided + offset, guidance_scale, n);
  }
}

void partials_to_norms(const float* partials, const RowLayout& layout, float* norms) {
  const int64_t chunks = chunks_per_row(layout);
  for (int64_t row = 0; row < layout.rows; ++row) {
    float total = 0.0f;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) total += partials[row * chunks + chunk];
    norms[row] = std::sqrt(total);
  }
}

template void fused_guidance_items<float>(const float*, const float*, float*, float, const RowLayout&, int64_t,
                                          int64_t, float*);
template void fused_guidance_items<Half>(const Half*, const Half*, Half*, float, const RowLayout&, int64_t, int64_t,
                                         float*);
template void fused_guidance_items<BFloat16>(const BFloat16*, const BFloat16*, BFloat16*, float, const RowLayout&,
                                             int64_t, int64_t, float*);

}  // namespace memscan
