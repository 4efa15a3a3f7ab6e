// Input validation shared by the CPU and CUDA ops: every message names the argument, what was
// expected and what came. Unlike the rest of common/, this header needs ATen (it inspects tensors);
// it is host-only.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <string_view>

#include "gates.h"

namespace mapopt {

// An enum value by its name in `names` (what: the argument, for the error, which lists them all).
template <class Enum, std::size_t N>
Enum parse_name(std::string_view name, const char* const (&names)[N], const char* what) {
  std::string valid;
  for (std::size_t i = 0; i < N; ++i) {
    if (name == names[i]) return static_cast<Enum>(i);
    valid += (i ? ", '" : "'") + std::string(names[i]) + "'";
  }
  TORCH_CHECK_VALUE(false, what, " must be one of ", valid, ", got '", std::string(name), "'");
}

inline Gate parse_gate(std::string_view name) { return parse_name<Gate>(name, kGateNames, "gate"); }

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), name, " must have a floating dtype, got ",
                   t.scalar_type());
}

// Same dtype and device as `ref` (named ref_name).
inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref,
                       const char* ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, " has dtype ", t.scalar_type(),
                   " but ", ref_name, " has dtype ", ref.scalar_type(),
                   ": all tensors must share one dtype");
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device(), ": all tensors must be on one device");
}

inline void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected,
                        const char* meaning) {
  TORCH_CHECK_VALUE(t.sizes() == expected, name, " must have shape ", meaning, " = ", expected,
                    ", got ", t.sizes());
}

// The dtypes the gated cells' and layers' kernels take: float32 and float64 on the CPU, also
// float16 and bfloat16 (pointwise math in float32) on CUDA. Under torch.autocast the Python package
// runs them in float32 (mapopt_native/ops/gated_cells.py).
inline void check_cell_dtype(const at::Tensor& input) {
  const at::ScalarType t = input.scalar_type();
  if (input.device().is_cpu()) {
    TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble,
                     "input must be float32 or float64 on the CPU, got ", t,
                     " (the Python package's ops run them in float32 under torch.autocast)");
  } else {
    check_floating(input, "input");
  }
}

// The input rows (batch, input_size) and the weights of a gated cell or layer. `chunks` is 3 (GRU)
// or 4 (LSTM). Returns the hidden size.
inline int64_t check_weights(int64_t chunks, const at::Tensor& input, const at::Tensor& w_ih,
                             const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                             const std::optional<at::Tensor>& b_hh) {
  check_cell_dtype(input);
  TORCH_CHECK_VALUE(input.dim() == 2, "input must be 2-D (batch, input_size), got shape ",
                    input.sizes());
  TORCH_CHECK_VALUE(w_ih.dim() == 2 && w_ih.size(0) % chunks == 0 && w_ih.size(0) > 0,
                    "weight_ih must have shape (", chunks, "*hidden_size, input_size), got ",
                    w_ih.sizes());
  const int64_t H = w_ih.size(0) / chunks;
  TORCH_CHECK_VALUE(input.size(1) == w_ih.size(1), "input has ", input.size(1),
                    " features but weight_ih ", w_ih.sizes(), " expects input_size=", w_ih.size(1));
  check_shape(w_hh, "weight_hh", {chunks * H, H}, "(chunks*hidden_size, hidden_size)");
  check_like(w_ih, "weight_ih", input, "input");
  check_like(w_hh, "weight_hh", input, "input");
  TORCH_CHECK_VALUE(b_ih.has_value() == b_hh.has_value(),
                    "bias_ih and bias_hh must be given together or both omitted");
  if (b_ih) {
    check_shape(*b_ih, "bias_ih", {chunks * H}, "(chunks*hidden_size,)");
    check_shape(*b_hh, "bias_hh", {chunks * H}, "(chunks*hidden_size,)");
    check_like(*b_ih, "bias_ih", input, "input");
    check_like(*b_hh, "bias_hh", input, "input");
  }
  return H;
}

// A recurrent state (hx or cx) of `batch` sequences.
inline void check_state(const at::Tensor& state, const char* name, int64_t batch, int64_t H,
                        const at::Tensor& input) {
  check_shape(state, name, {batch, H}, "(batch, hidden_size)");
  check_like(state, name, input, "input");
}

// One cell step; `cx` only for the LSTM. Returns the hidden size.
inline int64_t check_cell_inputs(int64_t chunks, const at::Tensor& input, const at::Tensor& hx,
                                 const at::Tensor* cx, const at::Tensor& w_ih,
                                 const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                                 const std::optional<at::Tensor>& b_hh) {
  const int64_t H = check_weights(chunks, input, w_ih, w_hh, b_ih, b_hh);
  check_state(hx, "hx", input.size(0), H, input);
  if (cx) check_state(*cx, "cx", input.size(0), H, input);
  return H;
}

}  // namespace mapopt
