// The gated cell ops, written once for every device. A step is: the matrix products through ATen
// (MKL/oneDNN on CPU, cuBLAS on CUDA), then ONE fused pointwise kernel. The pointwise kernels come
// from a backend struct K (cpu/gated_cells.cpp, cuda/gated_cells.cu), each of which registers these
// templates for its dispatch key.
//
// K provides, for 2-D tensors with unit column stride (rows may be strided):
//   gru_pointwise_fwd(gi, gh, hx, hy, ws, gate)             gi, gh (B,3H) -> hy (B,H), ws (B,4H)
//   gru_pointwise_bwd(dhy, hx, ws, d_gi, d_gh, dh, gate)    -> d_gi, d_gh (B,3H), dh (B,H)
//   lstm_pointwise_fwd(gates, cx, hy, cy, gate)             gates (B,4H) -> hy, cy (B,H)
//   lstm_pointwise_bwd(dhy, dcy, gates, cx, cy, d_gates, dcx, gate)   dhy / dcy may be undefined
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

// x Wᵀ (+ b)
inline at::Tensor project(const at::Tensor& x, const at::Tensor& w,
                          const std::optional<at::Tensor>& b) {
  return b ? at::addmm(*b, x, w.t()) : at::mm(x, w.t());
}

// Placeholder for a gradient the caller did not ask for (output_mask false).
inline at::Tensor not_requested(const at::Tensor& like) { return at::empty({0}, like.options()); }

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
  const at::Tensor gi = detail::project(input, w_ih, b_ih);
  const at::Tensor gh = detail::project(h, w_hh, b_hh);
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

  at::Tensor grad_input = output_mask[0] ? at::mm(d_gi, w_ih) : detail::not_requested(input);
  at::Tensor grad_hx = output_mask[1] ? dh.addmm_(d_gh, w_hh) : detail::not_requested(input);
  at::Tensor gw_ih, gw_hh, gb_ih, gb_hh;
  const bool params = output_mask[2];
  gw_ih = params ? at::mm(d_gi.t(), input) : detail::not_requested(input);
  gw_hh = params ? at::mm(d_gh.t(), h) : detail::not_requested(input);
  gb_ih = params && has_bias ? d_gi.sum(0) : detail::not_requested(input);
  gb_hh = params && has_bias ? d_gh.sum(0) : detail::not_requested(input);
  return {grad_input, grad_hx, gw_ih, gw_hh, gb_ih, gb_hh};
}

template <class K>
std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_lstm_cell_fwd(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, std::string_view gate) {
  const Gate g = parse_gate(gate);
  check_cell_inputs(4, input, hx, &cx, w_ih, w_hh, b_ih, b_hh);
  c10::OptionalDeviceGuard guard(input.device());
  // Both biases fold into one (4H) vector, so the gates are two accumulating products.
  std::optional<at::Tensor> bias;
  if (b_ih) bias = *b_ih + *b_hh;
  at::Tensor gates = detail::project(input, w_ih, bias);
  gates.addmm_(hx, w_hh.t());
  const at::Tensor c = cx.contiguous();
  at::Tensor hy = at::empty_like(c);
  at::Tensor cy = at::empty_like(c);
  K::lstm_pointwise_fwd(gates, c, hy, cy, g);
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

  at::Tensor grad_input = output_mask[0] ? at::mm(d_gates, w_ih) : detail::not_requested(input);
  at::Tensor grad_hx = output_mask[1] ? at::mm(d_gates, w_hh) : detail::not_requested(input);
  at::Tensor grad_cx = output_mask[2] ? dcx : detail::not_requested(input);
  const bool params = output_mask[3];
  at::Tensor gw_ih = params ? at::mm(d_gates.t(), input) : detail::not_requested(input);
  at::Tensor gw_hh = params ? at::mm(d_gates.t(), hx) : detail::not_requested(input);
  // d b_ih = d b_hh: both biases enter the same sum (MATH.md §1).
  at::Tensor gb = params && has_bias ? d_gates.sum(0) : detail::not_requested(input);
  return {grad_input, grad_hx, grad_cx, gw_ih, gw_hh, gb, gb.clone()};
}

}  // namespace mapopt
