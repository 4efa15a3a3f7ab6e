// x Wᵀ (+ b) and a b through ATen (cuBLAS on CUDA, the BLAS on CPU): the default products of the
// gated cells and layers. The CPU kernels route float32 through oneDNN instead
// (cpu/onednn_linear.h).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace mapopt {

inline at::Tensor aten_linear(const at::Tensor& x, const at::Tensor& w,
                              const std::optional<at::Tensor>& b) {
  return b ? at::addmm(*b, x, w.t()) : at::mm(x, w.t());
}

// out = a b, or out += a b when accumulate: written in place by the BLAS (beta = 1 / out=), no
// extra pass over out.
inline void aten_matmul_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                             bool accumulate) {
  if (accumulate) {
    out.addmm_(a, b);
  } else {
    at::mm_out(out, a, b);
  }
}

// out = x Wᵀ, or out += x Wᵀ when accumulate.
inline void aten_linear_into(at::Tensor& out, const at::Tensor& x, const at::Tensor& w,
                             bool accumulate) {
  aten_matmul_into(out, x, w.t(), accumulate);
}

}  // namespace mapopt
