// Launch helpers shared by the CUDA kernels: a grid-stride loop with 64-bit indices and a 1-D
// launch over n elements on the current stream, checked.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>

namespace mapopt::cuda {

constexpr int kThreads = 256;

#define MAPOPT_GRID_STRIDE(i, n)                                                          \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)

// Blocks for n threads' worth of grid-stride work: enough to fill the GPU, no more.
inline int64_t grid_blocks(int64_t n) {
  const int64_t max_blocks =
      static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 16;
  return std::min<int64_t>((n + kThreads - 1) / kThreads, max_blocks);
}

// kernel<<<...>>>(n, args...) over n elements, on the current stream.
template <class Kernel, class... Args>
void launch(int64_t n, Kernel kernel, Args... args) {
  if (n == 0) return;
  kernel<<<grid_blocks(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(n, args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace mapopt::cuda
