// x Wᵀ (+ b) and a b on the CPU through oneDNN, as ATen's own mkldnn ops do them.
//
// Why: on the CPUs this project is measured on (AMD EPYC), the BLAS behind at::addmm runs the
// recurrent products' shapes (a few rows times a hidden-size square weight) 1.2-2x slower than
// oneDNN, and over 2x slower when oneDNN may keep the weight pre-packed for a whole sequence
// (bench: bench_cells.py, bench_rnn.py); the layers' backward products over all steps about 1.2x
// slower (a weight gradient dᵀ x, d 6400 x 2048, x 6400 x 512: 85-89 against 69-75 ms; the input
// gradient d W, W 2048 x 512: 104 against 69 ms). float32 only (oneDNN has no float64); anything
// else, or a torch without oneDNN, falls back to ATen. The linear ops are reached by name through
// the dispatcher; the matmul is ATen's exported at::native::mkldnn_matmul, whose header torch does
// not ship (declared below, as in the torch this project pins).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <optional>
#include <string>

#include "../linear.h"

namespace at::native {
// result = beta result + alpha mat1 mat2 (ATen/native/mkldnn/Matmul.h).
TORCH_API void mkldnn_matmul(const at::Tensor& mat1, const at::Tensor& mat2,
                             const at::Tensor& result, float beta, float alpha);
}  // namespace at::native

namespace mapopt::cpu {

inline const std::optional<c10::OperatorHandle>& onednn_linear_op() {
  static const auto op = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  return op;
}

inline const std::optional<c10::OperatorHandle>& onednn_reorder_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_reorder_linear_weight", ""});
  return op;
}

// float32, and an inner dimension (in) of at least 1: oneDNN refuses an empty one (an input size
// of 0), which ATen's product takes.
inline bool onednn_applies(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat && t.size(1) > 0 && onednn_linear_op() &&
         onednn_reorder_op();
}

// The weight (out, in) in oneDNN's packed layout for inputs of about `batch` rows; only
// onednn_linear may read the result. Worth it when one weight serves many products.
inline at::Tensor onednn_pack(const at::Tensor& w, int64_t batch) {
  if (!onednn_applies(w)) return w;
  torch::jit::Stack stack{w.contiguous(), c10::IValue(std::max<int64_t>(batch, 1))};
  onednn_reorder_op()->callBoxed(&stack);
  return stack[0].toTensor();
}

// x wᵀ + b, w plain (out, in) or from onednn_pack.
inline at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& w,
                                const std::optional<at::Tensor>& b) {
  if (!onednn_applies(x)) return aten_linear(x, w, b);
  if (x.size(0) == 0) return at::zeros({0, w.size(0)}, x.options());
  torch::jit::Stack stack{x.contiguous(),
                          w,
                          b ? c10::IValue(*b) : c10::IValue(),
                          c10::IValue(std::string("none")),
                          c10::IValue(c10::List<std::optional<at::Scalar>>()),
                          c10::IValue(std::string(""))};
  onednn_linear_op()->callBoxed(&stack);
  return stack[0].toTensor();
}

// out = x wᵀ, or out += x wᵀ when accumulate. oneDNN's linear has no out= form, so its result
// takes one more pass into out; still faster than the BLAS product written in place.
inline void onednn_linear_into(at::Tensor& out, const at::Tensor& x, const at::Tensor& w,
                               bool accumulate) {
  if (!onednn_applies(x)) return aten_linear_into(out, x, w, accumulate);
  const at::Tensor r = onednn_linear(x, w, std::nullopt);
  if (accumulate) {
    out.add_(r);
  } else {
    out.copy_(r);
  }
}

// Whether oneDNN reads t in place: row-major or transposed row-major (ATen's matmul copies any
// other layout first, which for a transposed view costs more than the product saves).
inline bool onednn_reads_in_place(const at::Tensor& t) {
  return t.is_contiguous() || t.t().is_contiguous();
}

// Whether this torch runs float32 through at::native::mkldnn_matmul: it refuses CPUs without
// AVX-512 (or AVX-NE-CONVERT), so one small product, once, decides.
inline bool onednn_matmul_works() {
  static const bool works = [] {
    if (!at::hasMKLDNN()) return false;
    try {
      const at::Tensor a = at::ones({2, 2});
      at::native::mkldnn_matmul(a, a, at::empty({2, 2}), 0.f, 1.f);
      return true;
    } catch (...) {
      return false;
    }
  }();
  return works;
}

// out = a b, or out += a b when accumulate: by oneDNN's matmul where it reads a and b in place;
// where that refuses float32, a row-major a (the input gradient) by oneDNN's linear; else by ATen.
inline void onednn_matmul_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                               bool accumulate) {
  const bool onednn = a.scalar_type() == at::kFloat && a.numel() > 0 && b.numel() > 0 &&
                      at::globalContext().userEnabledMkldnn();
  if (onednn && onednn_matmul_works()) {
    if (onednn_reads_in_place(a) && onednn_reads_in_place(b) && out.is_contiguous()) {
      return at::native::mkldnn_matmul(a, b, out, accumulate ? 1.f : 0.f, 1.f);
    }
  } else if (onednn && a.is_contiguous()) {
    return onednn_linear_into(out, a, b.t().contiguous(), accumulate);
  }
  aten_matmul_into(out, a, b, accumulate);
}

}  // namespace mapopt::cpu
