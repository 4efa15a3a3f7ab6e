// x Wᵀ (+ b) on the CPU through oneDNN, as ATen's own mkldnn linear ops do it.
//
// Why: on the CPUs this project is measured on (AMD EPYC), the BLAS behind at::addmm runs the
// recurrent products' shapes (a few rows times a hidden-size square weight) 1.2-2x slower than
// oneDNN, and over 2x slower when oneDNN may keep the weight pre-packed for a whole sequence
// (bench: bench_cells.py, bench_rnn.py). float32 only (oneDNN has no float64); anything else, or
// a torch without the mkldnn ops, falls back to ATen (aten_linear). The ops are reached by name
// through the dispatcher: ATen exports no C++ header for them.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <optional>
#include <string>

#include "../linear.h"

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

inline bool onednn_applies(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat && onednn_linear_op() && onednn_reorder_op();
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

}  // namespace mapopt::cpu
