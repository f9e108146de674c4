// ctest: the CUDA kernels of fused_guidance.cu against a scalar double reference.
// Exits 77 (ctest's "skipped") where no GPU is visible, so it builds everywhere nvcc does.
#include <cuda_runtime_api.h>

#include <cstdio>
#include <random>
#include <vector>

#include "fused_guidance_cuda.h"
#include "test_reference.h"

namespace memscan::testing {
namespace {

constexpr int kSkipped = 77;
constexpr float kGuidanceScale = 7.5f;

void check_cuda(cudaError_t error, const char* what) {
  if (error == cudaSuccess) return;
  std::fprintf(stderr, "CUDA error in %s: %s\n", what, cudaGetErrorString(error));
  ++failures();
}

template <typename T>
T* to_device(const std::vector<T>& host) {
  T* device = nullptr;
  check_cuda(cudaMalloc(&device, host.size() * sizeof(T)), "cudaMalloc");
  check_cuda(cudaMemcpy(device, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice), "copy to device");
  return device;
}

template <typename T>
std::vector<T> to_host(const T* device, size_t count) {
  std::vector<T> host(count);
  check_cuda(cudaMemcpy(host.data(), device, count * sizeof(T), cudaMemcpyDeviceToHost), "copy to host");
  return host;
}

// Runs one case with every output poisoned with NaN bytes first.
template <typename T>
void test_case(Case<T> c) {
  c.layout.chunk = kCudaChunk;
  T* cond = to_device(c.cond);
  T* uncond = to_device(c.uncond);
  T* guided = to_device(std::vector<T>(c.cond.size(), from_float<T>(NAN)));
  float* partials = to_device(std::vector<float>(num_items(c.layout), NAN));
  float* norms = to_device(std::vector<float>(c.layout.rows, NAN));
  check_cuda(launch_fused_guidance(cond, uncond, guided, kGuidanceScale, c.layout, partials, norms, nullptr), "launch");
  check_cuda(cudaDeviceSynchronize(), "guided kernel");
  check_outputs(c, to_host(norms, c.layout.rows).data(), to_host(guided, c.cond.size()).data(), kGuidanceScale);
  check_cuda(launch_fused_guidance<T>(cond, uncond, nullptr, 0.0f, c.layout, partials, norms, nullptr), "launch");
  check_cuda(cudaDeviceSynchronize(), "norm kernel");
  check_outputs<T>(c, to_host(norms, c.layout.rows).data(), nullptr, kGuidanceScale);
  for (void* p : {static_cast<void*>(cond), static_cast<void*>(uncond), static_cast<void*>(guided),
                  static_cast<void*>(partials), static_cast<void*>(norms)}) {
    check_cuda(cudaFree(p), "cudaFree");
  }
}

template <typename T>
void test_type(std::mt19937& rng) {
  for (const Shape& shape : test_shapes()) {
    for (bool broadcast : {false, true}) test_case(random_case<T>(shape.rows, shape.cols, broadcast, rng));
  }
}

}  // namespace
}  // namespace memscan::testing

int main() {
  using namespace memscan;
  using namespace memscan::testing;
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("skipped: no CUDA device\n");
    return kSkipped;
  }
  std::mt19937 rng(20240611);
  test_type<float>(rng);
  test_type<Half>(rng);
  test_type<BFloat16>(rng);
  std::printf("%s: %d failure(s)\n", failures() ? "FAILED" : "passed", failures());
  return failures() ? 1 : 0;
}
