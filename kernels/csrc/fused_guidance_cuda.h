// Fused conditional-minus-unconditional L2 norm in CUDA, without torch (see
// fused_guidance_cpu.h for the semantics). One block per work item writes the item's
// partial sum of squares; a second kernel adds each row's partials and takes the root.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "fused_guidance_types.h"

namespace memscan {

// Elements per CUDA work item: a small batch of long rows still fills every SM.
constexpr int64_t kCudaChunk = 4096;

// Launches on `stream`: partials needs num_items(layout) floats, norms layout.rows floats;
// `guided` may be null (norm only). Device pointers; returns the launch error, if any.
template <typename T>
cudaError_t launch_fused_guidance(const T* cond, const T* uncond, T* guided, float guidance_scale,
                                  const RowLayout& layout, float* partials, float* norms, cudaStream_t stream);

}  // namespace memscan
