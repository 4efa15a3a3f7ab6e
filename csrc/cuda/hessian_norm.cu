// CUDA pass of the Hessian-norm ops and their registration; the ops are written once in
// csrc/hessian_norm.h. A thread owns one column (unit) and sums its rows of one row block in a
// register: reads of a warp are coalesced along the columns, there are no atomics, and the row
// blocks are summed after in a fixed order. half / bfloat16 are computed in float.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ceil_div.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "../common/activations.h"
#include "../common/scalar_math.h"
#include "../hessian_norm.h"
#include "launch.cuh"

namespace mapopt::cuda {
namespace {

// Row blocks stop splitting below this many rows each: the register sum is the cheap part.
constexpr int64_t kMinRowsPerBlock = 16;

template <class F>
void dispatch(const at::Tensor& t, Activation a, const F& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(),
                                  "mapopt_native hessian norm", [&] {
    dispatch_activation(a, [&](auto act) { fn(act, scalar_t{}); });
  });
}

// partial[blockIdx.y, j] += Σ over the rows of row block blockIdx.y of hessian_term(z[., j], s[j]).
template <Activation A, bool kValue, class scalar_t>
__global__ void hessian_term_kernel(int64_t B, int64_t M, int64_t R, const scalar_t* z,
                                    const at::opmath_type<scalar_t>* s, scalar_t* value,
                                    at::opmath_type<scalar_t>* partial,
                                    ActivationParams<at::opmath_type<scalar_t>> p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t r = blockIdx.y;
  const int64_t b0 = B * r / R, b1 = B * (r + 1) / R;
  MAPOPT_GRID_STRIDE(j, M) {
    const acc_t sj = s[j];
    acc_t sum = 0;
    for (int64_t b = b0; b < b1; ++b) {
      const acc_t zz = z[b * M + j];
      sum += hessian_term<A, acc_t, ScalarMath>(zz, sj, p);
      if constexpr (kValue) {
        value[b * M + j] = ActivationFn<A>::template value<acc_t, ScalarMath>(zz, p);
      }
    }
    partial[r * M + j] += sum;
  }
}

template <Activation A, class scalar_t>
__global__ void activation_bwd_kernel(int64_t n, const scalar_t* grad, const scalar_t* z,
                                      scalar_t* grad_z,
                                      ActivationParams<at::opmath_type<scalar_t>> p) {
  using acc_t = at::opmath_type<scalar_t>;
  MAPOPT_GRID_STRIDE(i, n) {
    const acc_t g = grad[i];
    grad_z[i] = g * ActivationFn<A>::template derivative<acc_t, ScalarMath>(z[i], p);
  }
}

struct CudaHessianKernels {
  // Enough row blocks (grid.y) to fill the GPU when the columns alone don't.
  static int64_t row_blocks(int64_t B, int64_t M) {
    if (M == 0) return 1;
    const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    const int64_t wanted = at::ceil_div<int64_t>(sms * 8, grid_blocks(M));
    return std::clamp<int64_t>(std::min(wanted, at::ceil_div<int64_t>(B, kMinRowsPerBlock)), 1,
                               65535);
  }

  static void hessian_term_partials(const at::Tensor& z, const at::Tensor& s,
                                    const at::Tensor& value, const at::Tensor& partial,
                                    const ActivationSpec& spec) {
    const int64_t B = z.size(0), M = z.size(1), R = partial.size(0);
    if (M == 0) return;
    const dim3 grid(static_cast<unsigned>(grid_blocks(M)), static_cast<unsigned>(R));
    const auto stream = at::cuda::getCurrentCUDAStream();
    dispatch(z, spec.kind, [&](auto act, auto sc) {
      using scalar_t = decltype(sc);
      using acc_t = at::opmath_type<scalar_t>;
      constexpr Activation A = decltype(act)::value;
      const auto p = activation_params<acc_t>(spec);
      const scalar_t* zp = z.const_data_ptr<scalar_t>();
      const acc_t* sp = s.const_data_ptr<acc_t>();
      acc_t* pp = partial.data_ptr<acc_t>();
      if (value.defined()) {
        hessian_term_kernel<A, true, scalar_t><<<grid, kThreads, 0, stream>>>(
            B, M, R, zp, sp, value.data_ptr<scalar_t>(), pp, p);
      } else {
        hessian_term_kernel<A, false, scalar_t><<<grid, kThreads, 0, stream>>>(
            B, M, R, zp, sp, nullptr, pp, p);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void activation_bwd(const at::Tensor& grad, const at::Tensor& z, const at::Tensor& grad_z,
                             const ActivationSpec& spec) {
    dispatch(z, spec.kind, [&](auto act, auto sc) {
      using scalar_t = decltype(sc);
      launch(z.numel(), activation_bwd_kernel<decltype(act)::value, scalar_t>,
             grad.const_data_ptr<scalar_t>(), z.const_data_ptr<scalar_t>(),
             grad_z.data_ptr<scalar_t>(), activation_params<at::opmath_type<scalar_t>>(spec));
    });
  }
};

}  // namespace
}  // namespace mapopt::cuda

TORCH_LIBRARY_IMPL(mapopt_native, CUDA, m) {
  mapopt::register_hessian_norm_ops<mapopt::cuda::CudaHessianKernels>(m);
}
