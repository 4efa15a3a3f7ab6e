// The CPU kernels are written for float32 / float64 (ATen's Vectorized arithmetic on 16-bit types
// would accumulate in 16 bits). Ops that take float16 / bfloat16 run them on float32 copies, as
// CUDA computes 16-bit inputs in float32, and cast what they write back into the caller's dtype.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace mapopt::cpu {

inline bool is_reduced(const at::Tensor& t) {
  return t.defined() && at::isReducedFloatingType(t.scalar_type());
}

inline at::Tensor widened(const at::Tensor& t) { return is_reduced(t) ? t.to(at::kFloat) : t; }

inline std::vector<at::Tensor> widened(const std::vector<at::Tensor>& ts) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const at::Tensor& t : ts) out.push_back(widened(t));
  return out;
}

// Where a kernel writes an output of 16-bit dtype: a float32 buffer (the output itself otherwise,
// or undefined for an undefined output); copy_back moves the buffer into the output.
inline at::Tensor wide_buffer(const at::Tensor& out) {
  return is_reduced(out) ? at::empty(out.sizes(), out.options().dtype(at::kFloat)) : out;
}

inline void copy_back(const at::Tensor& out, const at::Tensor& buffer) {
  if (buffer.defined() && !buffer.is_same(out)) out.copy_(buffer);
}

}  // namespace mapopt::cpu
