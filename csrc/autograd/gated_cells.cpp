// The autograd kernels of the gated cell ops, in C++ (one registration for every device).
//
// Why not torch.library.register_autograd like the layer ops: a cell runs once per time step of a
// user's Python loop, and the Python side of a registered autograd formula cost about 50 us per
// forward and as much again per backward (bench_cells.py at small sizes, and on a GPU, where a
// step's kernels take a few microseconds). The formulas are the backward ops
// (gated_gru_cell_bwd, gated_lstm_cell_bwd); the workspace output is not differentiable.
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include "dispatch.h"

namespace mapopt {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

// The C++ signatures of the ops called below (schemas in csrc/registration.cpp).
using GruFwd = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                  const at::Tensor&, const at::Tensor&,
                                                  const OptTensor&, const OptTensor&,
                                                  std::string_view);
using GruBwd = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, std::string_view, bool, std::array<bool, 3>);
using LstmFwd = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const OptTensor&, const OptTensor&, std::string_view);
using LstmBwd =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
        const OptTensor&, const OptTensor&, const at::Tensor&, const at::Tensor&,
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
        const at::Tensor&, std::string_view, bool, std::array<bool, 4>);

// The gradient slots of a backward op's result: the requested ones, undefined elsewhere (the op
// returns empty placeholders for what output_mask left out).
variable_list keep_needed(const std::vector<at::Tensor>& grads, const std::vector<bool>& needed) {
  variable_list out(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    if (needed[i]) out[i] = grads[i];
  }
  return out;
}

// Which of the forward's parameters need a gradient: weight_ih, weight_hh at edges first, first+1,
// the biases (when given) at the next two. Edges count only tensor arguments.
std::vector<bool> params_needed(AutogradContext* ctx, size_t first, bool has_bias) {
  std::vector<bool> need{ctx->needs_input_grad(first), ctx->needs_input_grad(first + 1), false,
                         false};
  if (has_bias) {
    need[2] = ctx->needs_input_grad(first + 2);
    need[3] = ctx->needs_input_grad(first + 3);
  }
  return need;
}

class GruCell : public torch::autograd::Function<GruCell> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& hx,
                               const at::Tensor& w_ih, const at::Tensor& w_hh,
                               const OptTensor& b_ih,
                               const OptTensor& b_hh, std::string_view gate) {
    at::AutoDispatchBelowADInplaceOrView below;
    static const auto fwd = typed_op<GruFwd>("mapopt_native::gated_gru_cell_fwd");
    auto [hy, ws] = fwd.call(input, hx, w_ih, w_hh, b_ih, b_hh, gate);
    ctx->save_for_backward({input, hx, w_ih, w_hh, ws});
    ctx->saved_data["gate"] = std::string(gate);
    ctx->saved_data["has_bias"] = b_ih.has_value() && b_ih->defined();
    ctx->mark_non_differentiable({ws});
    return {hy, ws};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    static const auto bwd = typed_op<GruBwd>("mapopt_native::gated_gru_cell_bwd");
    const variable_list saved = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const std::vector<bool> params = params_needed(ctx, 2, has_bias);
    const bool any_param = params[0] || params[1] || params[2] || params[3];
    const std::vector<bool> needed{ctx->needs_input_grad(0), ctx->needs_input_grad(1), params[0],
                                   params[1], params[2], params[3]};
    const std::string gate = ctx->saved_data["gate"].toStringRef();
    auto [d_in, d_hx, d_wih, d_whh, d_bih, d_bhh] =
        bwd.call(grad_outputs[0], saved[0], saved[1], saved[2], saved[3], saved[4], gate,
                 has_bias, {needed[0], needed[1], any_param});
    variable_list grads = keep_needed({d_in, d_hx, d_wih, d_whh, d_bih, d_bhh}, needed);
    grads.emplace_back();  // gate
    return grads;
  }
};

class LstmCell : public torch::autograd::Function<LstmCell> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& hx,
                               const at::Tensor& cx, const at::Tensor& w_ih, const at::Tensor& w_hh,
                               const OptTensor& b_ih, const OptTensor& b_hh,
                               std::string_view gate) {
    at::AutoDispatchBelowADInplaceOrView below;
    static const auto fwd = typed_op<LstmFwd>("mapopt_native::gated_lstm_cell_fwd");
    auto [hy, cy, ws] = fwd.call(input, hx, cx, w_ih, w_hh, b_ih, b_hh, gate);
    ctx->save_for_backward({input, hx, cx, w_ih, w_hh, cy, ws});
    ctx->saved_data["gate"] = std::string(gate);
    ctx->saved_data["has_bias"] = b_ih.has_value() && b_ih->defined();
    ctx->mark_non_differentiable({ws});
    // An unused output (often c') then arrives undefined, and the kernel reads it as zero
    // without a zero-filled buffer.
    ctx->set_materialize_grads(false);
    return {hy, cy, ws};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    static const auto bwd = typed_op<LstmBwd>("mapopt_native::gated_lstm_cell_bwd");
    const variable_list saved = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const std::vector<bool> params = params_needed(ctx, 3, has_bias);
    const bool any_param = params[0] || params[1] || params[2] || params[3];
    const std::vector<bool> needed{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                   ctx->needs_input_grad(2), params[0], params[1], params[2],
                                   params[3]};
    auto defined_or_none = [](const at::Tensor& g) {
      return g.defined() ? OptTensor(g) : OptTensor();
    };
    const std::string gate = ctx->saved_data["gate"].toStringRef();
    auto [d_in, d_hx, d_cx, d_wih, d_whh, d_bih, d_bhh] = bwd.call(
        defined_or_none(grad_outputs[0]), defined_or_none(grad_outputs[1]), saved[0], saved[1],
        saved[2], saved[3], saved[4], saved[5], saved[6], gate, has_bias,
        {needed[0], needed[1], needed[2], any_param});
    variable_list grads = keep_needed({d_in, d_hx, d_cx, d_wih, d_whh, d_bih, d_bhh}, needed);
    grads.emplace_back();  // gate
    return grads;
  }
};

std::tuple<at::Tensor, at::Tensor> gru_cell_autograd(const at::Tensor& input, const at::Tensor& hx,
                                                     const at::Tensor& w_ih, const at::Tensor& w_hh,
                                                     const OptTensor& b_ih, const OptTensor& b_hh,
                                                     std::string_view gate) {
  const variable_list out = GruCell::apply(input, hx, w_ih, w_hh, b_ih, b_hh, gate);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_autograd(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh, std::string_view gate) {
  const variable_list out = LstmCell::apply(input, hx, cx, w_ih, w_hh, b_ih, b_hh, gate);
  return {out[0], out[1], out[2]};
}

}  // namespace
}  // namespace mapopt

TORCH_LIBRARY_IMPL(mapopt_native, Autograd, m) {
  m.impl("gated_gru_cell_fwd", &mapopt::gru_cell_autograd);
  m.impl("gated_lstm_cell_fwd", &mapopt::lstm_cell_autograd);
}
