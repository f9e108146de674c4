#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "fused_guidance_cuda.h"

namespace memscan {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpSize = 32;

__device__ __forceinline__ float load_float(float x) { return x; }
__device__ __forceinline__ float load_float(Half h) { return __half2float(__ushort_as_half(h.bits)); }
__device__ __forceinline__ float load_float(BFloat16 b) { return __bfloat162float(__ushort_as_bfloat16(b.bits)); }

template <typename T>
__device__ __forceinline__ T store_float(float x);
template <>
__device__ __forceinline__ float store_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ Half store_float<Half>(float x) {
  return Half{__half_as_ushort(__float2half_rn(x))};
}
template <>
__device__ __forceinline__ BFloat16 store_float<BFloat16>(float x) {
  return BFloat16{__bfloat16_as_ushort(__float2bfloat16_rn(x))};
}

// Sum over the block; the result is valid in thread 0.
__device__ float block_sum(float value) {
  __shared__ float warp_sums[kThreads / kWarpSize];
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) value += __shfl_down_sync(0xFFFFFFFFu, value, offset);
  const int warp = threadIdx.x / kWarpSize;
  if (threadIdx.x % kWarpSize == 0) warp_sums[warp] = value;
  __syncthreads();
  value = threadIdx.x < kThreads / kWarpSize ? warp_sums[threadIdx.x] : 0.0f;
  if (warp == 0) {
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) value += __shfl_down_sync(0xFFFFFFFFu, value, offset);
  }
  return value;
}

template <typename T, bool kWriteGuided>
__global__ void __launch_bounds__(kThreads)
    fused_guidance_kernel(const T* __restrict__ cond, const T* __restrict__ uncond, T* __restrict__ guided,
                          float guidance_scale, RowLayout layout, int64_t chunks, float* __restrict__ partials) {
  const int64_t item = blockIdx.x;
  const int64_t row = item / chunks;
  const int64_t col_begin = (item % chunks) * layout.chunk;
  const int64_t col_end = min(layout.cols, col_begin + layout.chunk);
  const T* cond_row = cond + row * layout.cols;
  const T* uncond_row = uncond + row * layout.uncond_row_stride;
  float acc = 0.0f;
  for (int64_t col = col_begin + threadIdx.x; col < col_end; col += kThreads) {
    const float u = load_float(uncond_row[col]);
    const float d = load_float(cond_row[col]) - u;
    acc += d * d;
    if (kWriteGuided) guided[row * layout.cols + col] = store_float<T>(u + guidance_scale * d);
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) partials[item] = acc;
}

// Adds each row's partials in order (as the CPU does), then takes the root.
__global__ void partials_to_norms_kernel(const float* __restrict__ partials, int64_t rows, int64_t chunks,
                                         float* __restrict__ norms) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (row >= rows) return;
  float total = 0.0f;
  for (int64_t chunk = 0; chunk < chunks; ++chunk) total += partials[row * chunks + chunk];
  norms[row] = sqrtf(total);
}

}  // namespace

template <typename T>
cudaError_t launch_fused_guidance(const T* cond, const T* uncond, T* guided, float guidance_scale,
                                  const RowLayout& layout, float* partials, float* norms, cudaStream_t stream) {
  const int64_t items = num_items(layout);
  if (items == 0) return cudaSuccess;
  const int64_t chunks = chunks_per_row(layout);
  if (guided == nullptr) {
    fused_guidance_kernel<T, false>
        <<<items, kThreads, 0, stream>>>(cond, uncond, nullptr, 0.0f, layout, chunks, partials);
  } else {
    fused_guidance_kernel<T, true>
        <<<items, kThreads, 0, stream>>>(cond, uncond, guided, guidance_scale, layout, chunks, partials);
  }
  const int64_t row_blocks = (layout.rows + kThreads - 1) / kThreads;
  partials_to_norms_kernel<<<row_blocks, kThreads, 0, stream>>>(partials, layout.rows, chunks, norms);
  return cudaGetLastError();
}

template cudaError_t launch_fused_guidance<float>(const float*, const float*, float*, float, const RowLayout&, float*,
                                                  float*, cudaStream_t);
template cudaError_t launch_fused_guidance<Half>(const Half*, const Half*, Half*, float, const RowLayout&, float*,
                                                 float*, cudaStream_t);
template cudaError_t launch_fused_guidance<BFloat16>(const BFloat16*, const BFloat16*, BFloat16*, float,
                                                     const RowLayout&, float*, float*, cudaStream_t);

}  // namespace memscan
