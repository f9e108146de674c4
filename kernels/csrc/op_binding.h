// What the CPU and CUDA bindings of the memscan ops share: input checks, flattening,
// dtype dispatch, and the two op entry points over a backend's runner.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/accumulate.h>

#include <tuple>

#include "fused_guidance_types.h"

namespace memscan {

// cond and uncond as contiguous [rows, cols] (uncond [1 or rows, cols]), and their layout.
struct FlatInputs {
  at::Tensor cond;
  at::Tensor uncond;
  RowLayout layout;
};

// Raises TypeError / ValueError (as the Triton launcher) on a dtype or shape mismatch.
inline FlatInputs flatten_inputs(const at::Tensor& cond, const at::Tensor& uncond, int64_t chunk) {
  TORCH_CHECK_TYPE(cond.scalar_type() == uncond.scalar_type(), "cond and uncond must share a dtype, got ",
                   cond.scalar_type(), " and ", uncond.scalar_type());
  TORCH_CHECK(cond.device() == uncond.device(), "cond and uncond must be on one device, got ", cond.device(),
              " and ", uncond.device());
  TORCH_CHECK_VALUE(cond.dim() >= 1 && uncond.dim() == cond.dim() && uncond.sizes().slice(1) == cond.sizes().slice(1) &&
                        (uncond.size(0) == 1 || uncond.size(0) == cond.size(0)),
                    "uncond ", uncond.sizes(), " does not match cond ", cond.sizes(), " or broadcast [1, ...]");
  const int64_t rows = cond.size(0);
  const int64_t cols = c10::multiply_integers(cond.sizes().slice(1));
  const bool broadcast = uncond.size(0) == 1;
  return FlatInputs{cond.reshape({rows, cols}).contiguous(), uncond.reshape({uncond.size(0), cols}).contiguous(),
                    RowLayout{rows, cols, broadcast ? 0 : cols, chunk}};
}

// Calls f with a value of the kernel's element type for the tensor's dtype.
template <typename F>
void dispatch_element_type(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat:
      return f(float{});
    case at::kHalf:
      return f(Half{});
    case at::kBFloat16:
      return f(BFloat16{});
    default:
      TORCH_CHECK_TYPE(false, "memscan ops take float32, float16 or bfloat16, got ", dtype);
  }
}

template <typename T>
const T* data_as(const at::Tensor& t) {
  static_assert(sizeof(T) == 2 || sizeof(T) == 4, "element types are 16 or 32 bits");
  return reinterpret_cast<const T*>(t.const_data_ptr());
}

template <typename T>
T* mutable_data_as(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.mutable_data_ptr());
}

// A backend's runner: norms [rows] fp32 of the flat inputs; also writes `guided` (shaped
// as the flat cond) unless it is undefined.
using Runner = at::Tensor (*)(const FlatInputs& in, const at::Tensor& guided, double guidance_scale);

template <Runner run, int64_t chunk>
at::Tensor guidance_norm_op(const at::Tensor& cond, const at::Tensor& uncond) {
  return run(flatten_inputs(cond, uncond, chunk), at::Tensor(), 0.0);
}

template <Runner run, int64_t chunk>
std::tuple<at::Tensor, at::Tensor> guided_prediction_op(const at::Tensor& cond, const at::Tensor& uncond,
                                                        double guidance_scale) {
  const FlatInputs in = flatten_inputs(cond, uncond, chunk);
  const at::Tensor guided = at::empty_like(in.cond);
  at::Tensor norms = run(in, guided, guidance_scale);
  return {norms, guided.view(cond.sizes())};
}

}  // namespace memscan
