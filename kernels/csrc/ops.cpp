// The memscan torch ops (schemas) and their CPU kernels.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "fused_guidance_cpu.h"
#include "op_binding.h"

namespace memscan {
namespace {

// The Runner of op_binding.h on the CPU.
at::Tensor run_cpu(const FlatInputs& in, const at::Tensor& guided, double guidance_scale) {
  const RowLayout& layout = in.layout;
  const int64_t items = num_items(layout);
  at::Tensor partials = at::empty({items}, in.cond.options().dtype(at::kFloat));
  at::Tensor norms = at::empty({layout.rows}, in.cond.options().dtype(at::kFloat));
  // Small problems stay on one thread: a task should cover at least GRAIN_SIZE elements.
  const int64_t item_elements = std::max<int64_t>(1, std::min(layout.cols, layout.chunk));
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / item_elements);
  dispatch_element_type(in.cond.scalar_type(), [&](auto element) {
    using T = decltype(element);
    const T* cond = data_as<T>(in.cond);
    const T* uncond = data_as<T>(in.uncond);
    T* guided_data = guided.defined() ? mutable_data_as<T>(guided) : nullptr;
    float* partial_data = partials.mutable_data_ptr<float>();
    at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
      fused_guidance_items(cond, uncond, guided_data, static_cast<float>(guidance_scale), layout, begin, end,
                           partial_data);
    });
  });
  partials_to_norms(partials.const_data_ptr<float>(), layout, norms.mutable_data_ptr<float>());
  return norms;
}

}  // namespace

TORCH_LIBRARY(memscan, m) {
  m.def("guidance_norm(Tensor cond, Tensor uncond) -> Tensor");
  m.def("guided_prediction(Tensor cond, Tensor uncond, float guidance_scale) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(memscan, CPU, m) {
  m.impl("guidance_norm", &guidance_norm_op<run_cpu, kChunk>);
  m.impl("guided_prediction", &guided_prediction_op<run_cpu, kChunk>);
}

}  // namespace memscan
