// CUDA kernels of the memscan torch ops (schemas in ops.cpp); built with a CUDA torch only.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "fused_guidance_cuda.h"
#include "op_binding.h"

namespace memscan {
namespace {

// The Runner of op_binding.h on CUDA: two kernels on the current stream.
at::Tensor run_cuda(const FlatInputs& in, const at::Tensor& guided, double guidance_scale) {
  const c10::cuda::CUDAGuard device_guard(in.cond.device());
  at::Tensor partials = at::empty({num_items(in.layout)}, in.cond.options().dtype(at::kFloat));
  at::Tensor norms = at::empty({in.layout.rows}, in.cond.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_element_type(in.cond.scalar_type(), [&](auto element) {
    using T = decltype(element);
    T* guided_data = guided.defined() ? mutable_data_as<T>(guided) : nullptr;
    C10_CUDA_CHECK(launch_fused_guidance(data_as<T>(in.cond), data_as<T>(in.uncond), guided_data,
                                         static_cast<float>(guidance_scale), in.layout,
                                         partials.mutable_data_ptr<float>(), norms.mutable_data_ptr<float>(),
                                         stream));
  });
  return norms;
}

}  // namespace

TORCH_LIBRARY_IMPL(memscan, CUDA, m) {
  m.impl("guidance_norm", &guidance_norm_op<run_cuda, kCudaChunk>);
  m.impl("guided_prediction", &guided_prediction_op<run_cuda, kCudaChunk>);
}

}  // namespace memscan
