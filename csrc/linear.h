// x Wᵀ (+ b) through ATen (cuBLAS on CUDA, the BLAS on CPU): the default projection of the gated
// cells and layers. The CPU kernels route float32 through oneDNN instead (cpu/onednn_linear.h).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace mapopt {

inline at::Tensor aten_linear(const at::Tensor& x, const at::Tensor& w,
                              const std::optional<at::Tensor>& b) {
  return b ? at::addmm(*b, x, w.t()) : at::mm(x, w.t());
}

// out = x Wᵀ, or out += x Wᵀ when accumulate: written in place by the BLAS (beta = 1 / out=),
// no extra pass over out.
inline void aten_linear_into(at::Tensor& out, const at::Tensor& x, const at::Tensor& w,
                             bool accumulate) {
  if (accumulate) {
    out.addmm_(x, w.t());
  } else {
    at::mm_out(out, x, w.t());
  }
}

}  // namespace mapopt
