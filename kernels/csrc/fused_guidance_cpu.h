// Fused conditional-minus-unconditional L2 norm on the CPU, without torch.
//
// Same semantics as kernels/fused_guidance.py: for rows of `cols` contiguous elements,
//   norm[b]   = || cond[b] - uncond[b or 0] ||_2            (fp32 accumulation)
//   guided[b] = uncond[b or 0] + w * (cond[b] - uncond[b or 0])   (input type, optional)
// in one pass and without a temporary. Raw pointers only, so the kernels are tested
// without torch (test_fused_guidance.cpp) and bound to torch separately (ops.cpp).
#pragma once

#include <cstdint>

#include "fused_guidance_types.h"

namespace memscan {

// Work items [item_begin, item_end): partials[item] = sum of squared differences over the
// item's columns; writes guided[] over them too when `guided` is not null.
template <typename T>
void fused_guidance_items(const T* cond, const T* uncond, T* guided, float guidance_scale,
                          const RowLayout& layout, int64_t item_begin, int64_t item_end, float* partials);

// norms[row] = sqrt(sum of the row's partials).
void partials_to_norms(const float* partials, const RowLayout& layout, float* norms);

}  // namespace memscan
