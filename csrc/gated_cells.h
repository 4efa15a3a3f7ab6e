// The gated cell ops, written once for every device. A step is: the matrix products (the
// backend's projections; the backward's through ATen), then ONE fused pointwise kernel. Projections
// and pointwise kernels come from a backend struct K (cpu/gated_cells.cpp, cuda/gated_cells.cu),
// each of which registers these templates for its dispatch key (gated_registration.h).
//
// K provides the projections
//   linear(x, w, b) = x wᵀ + b, w plain (out, in) or from pack_weight
//   linear_into(out, x, w, accumulate): out = x wᵀ, or out += x wᵀ
//   matmul_into(out, a, b, accumulate): out = a b, or out += a b (a, b: any strides; the layers'
//   backward products over all steps)
//   pack_weight(w, batch): w in the backend's preferred layout, for one weight used many times
//   kProjectionBytes: the block size of a layer's input projection (csrc/gated_layers.h)
//   Input, input_weight(w_ih, b, chunks, rows), project(in, x, keep) = x W_ihᵀ + b: a layer's
//   input projection (keep: the caller holds on to the result beyond the next projection)
// and, for 2-D tensors with unit column stride (rows may be strided), the pointwise kernels:
//   gru_pointwise_fwd(gi, gh, hx, hy, ws, gate)             gi, gh (B,3H) -> hy (B,H), ws (B,4H)
//   gru_pointwise_bwd(dhy, hx, ws, d_gi, d_gh, dh, gate)    -> d_gi, d_gh (B,3H), dh (B,H)
//   lstm_pointwise_fwd(gi, gh, cx, hy, cy, ws, gate)        gi, gh (B,4H) -> hy, cy (B,H) and
//                                                           ws = gi + gh (B,4H) unless undefined;
//                                                           ws may alias gi
//   lstm_pointwise_bwd(dhy, dcy, gates, cx, cy, d_gates, dcx, gate)   dhy / dcy may be undefined
// and the layers' forward step (csrc/gated_layers.h; StepByProduct there gives the plain one):
//   Recurrent, recurrent_weight(w_hh, b_hh, chunks, batch): the recurrent weight for the steps
//   gru_step_fwd(rec, gi, hx, hy, ws, gate):        gru_pointwise_fwd(gi, hx W_hhᵀ + b_hh, ...)
//   lstm_step_fwd(rec, gi, hx, cx, hy, cy, ws, gate): lstm_pointwise_fwd(gi, hx W_hhᵀ, ...)
//   optionally lstm_input_step_fwd(in, x, rec, hx, cx, hy, cy, gate): an inference step with the
//   input projection x W_ihᵀ + b (in: K::Input) made in the same pass (the CPU's)
//   RecurrentT, recurrent_weight_t(w_hh, batch), recurrent_product_t(rt, d, out, accumulate):
//   the layers' backward step product, out = d W_hh, or out += d W_hh
//   step_grads(numel, options): the layers' backward buffer (1-D) of every step's gate gradients,
//   valid until the backend's next step_grads on this thread
// Workspace layouts: csrc/common/cells.h.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>

#include <array>
#include <optional>
#include <string_view>
#include <tuple>

#include "common/checks.h"

namespace mapopt {

namespace detail {

// Placeholder for a gradient the caller did not ask for (output_mask false).
inline at::Tensor not_requested(const at::Tensor& like) { return at::empty({0}, like.options()); }

// The LSTM's two biases enter the same sum, so they fold into one (4H) vector.
inline std::optional<at::Tensor> summed_bias(const std::optional<at::Tensor>& b_ih,
                                             const std::optional<at::Tensor>& b_hh) {
  if (!b_ih) return std::nullopt;
  return *b_ih + *b_hh;
}

}  // namespace detail

template <class K>
std::tuple<at::Tensor, at::Tensor> gated_gru_cell_fwd(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    std::string_view gate) {
  const Gate g = parse_gate(gate);
  const int64_t H = check_cell_inputs(3, input, hx, nullptr, w_ih, w_hh, b_ih, b_hh);
  c10::OptionalDeviceGuard guard(input.device());
  const at::Tensor h = hx.contiguous();
  const at::Tensor gi = K::linear(input, w_ih, b_ih);
  const at::Tensor gh = K::linear(h, w_hh, b_hh);
  at::Tensor hy = at::empty_like(h);
  at::Tensor ws = at::empty({input.size(0), 4 * H}, input.options());
  K::gru_pointwise_fwd(gi, gh, h, hy, ws, g);
  return {hy, ws};
}

// output_mask: gradients wanted for (input, hx, parameters). Biases get gradients when has_bias.
template <class K>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gated_gru_cell_bwd(const at::Tensor& grad_hy, const at::Tensor& input, const at::Tensor& hx,
                   const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& workspace,
                   std::string_view gate, bool has_bias, std::array<bool, 3> output_mask) {
  const Gate g = parse_gate(gate);
  const int64_t H = check_cell_inputs(3, input, hx, nullptr, w_ih, w_hh, {}, {});
  const int64_t B = input.size(0);
  check_shape(grad_hy, "grad_hy", {B, H}, "(batch, hidden_size)");
  check_shape(workspace, "workspace", {B, 4 * H}, "(batch, 4*hidden_size)");
  c10::OptionalDeviceGuard guard(input.device());
  const at::Tensor h = hx.contiguous();
  at::Tensor d_gi = at::empty({B, 3 * H}, input.options());
  at::Tensor d_gh = at::empty({B, 3 * H}, input.options());
  at::Tensor dh = at::empty({B, H}, input.options());
  K::gru_pointwise_bwd(grad_hy.contiguous(), h, workspace.contiguous(), d_gi, d_gh, dh, g);

  auto none = [&] { return detail::not_requested(input); };
  const bool params = output_mask[2];
  return {output_mask[0] ? at::mm(d_gi, w_ih) : none(),
          output_mask[1] ? dh.addmm_(d_gh, w_hh) : none(),
          params ? at::mm(d_gi.t(), input) : none(),
          params ? at::mm(d_gh.t(), h) : none(),
          params && has_bias ? d_gi.sum(0) : none(),
          params && has_bias ? d_gh.sum(0) : none()};
}

template <class K>
std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_lstm_cell_fwd(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, std::string_view gate) {
  const Gate g = parse_gate(gate);
  check_cell_inputs(4, input, hx, &cx, w_ih, w_hh, b_ih, b_hh);
  c10::OptionalDeviceGuard guard(input.device());
  // The summed pre-activations (the workspace) overwrite the input projection in place.
  at::Tensor gates = K::linear(input, w_ih, detail::summed_bias(b_ih, b_hh));
  const at::Tensor gh = K::linear(hx.contiguous(), w_hh, std::nullopt);
  const at::Tensor c = cx.contiguous();
  at::Tensor hy = at::empty_like(c);
  at::Tensor cy = at::empty_like(c);
  K::lstm_pointwise_fwd(gates, gh, c, hy, cy, gates, g);
  return {hy, cy, gates};
}

// output_mask: gradients wanted for (input, hx, cx, parameters).
template <class K>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gated_lstm_cell_bwd(const std::optional<at::Tensor>& grad_hy,
                    const std::optional<at::Tensor>& grad_cy, const at::Tensor& input,
                    const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
                    const at::Tensor& w_hh, const at::Tensor& cy, const at::Tensor& workspace,
                    std::string_view gate, bool has_bias, std::array<bool, 4> output_mask) {
  const Gate g = parse_gate(gate);
  const int64_t H = check_cell_inputs(4, input, hx, &cx, w_ih, w_hh, {}, {});
  const int64_t B = input.size(0);
  if (grad_hy) check_shape(*grad_hy, "grad_hy", {B, H}, "(batch, hidden_size)");
  if (grad_cy) check_shape(*grad_cy, "grad_cy", {B, H}, "(batch, hidden_size)");
  check_shape(cy, "cy", {B, H}, "(batch, hidden_size)");
  check_shape(workspace, "workspace", {B, 4 * H}, "(batch, 4*hidden_size)");
  c10::OptionalDeviceGuard guard(input.device());
  const at::Tensor c = cx.contiguous();
  at::Tensor d_gates = at::empty({B, 4 * H}, input.options());
  at::Tensor dcx = at::empty({B, H}, input.options());
  K::lstm_pointwise_bwd(grad_hy ? grad_hy->contiguous() : at::Tensor(),
                        grad_cy ? grad_cy->contiguous() : at::Tensor(), workspace.contiguous(), c,
                        cy.contiguous(), d_gates, dcx, g);

  auto none = [&] { return detail::not_requested(input); };
  const bool params = output_mask[3];
  // d b_ih = d b_hh: both biases enter the same sum (MATH.md §1).
  at::Tensor gb = params && has_bias ? d_gates.sum(0) : none();
  return {output_mask[0] ? at::mm(d_gates, w_ih) : none(),
          output_mask[1] ? at::mm(d_gates, w_hh) : none(),
          output_mask[2] ? dcx : none(),
          params ? at::mm(d_gates.t(), input) : none(),
          params ? at::mm(d_gates.t(), hx) : none(),
          gb,
          gb.clone()};
}

}  // namespace mapopt
