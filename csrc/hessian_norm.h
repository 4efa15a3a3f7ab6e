// The Hessian-norm importance ops (MATH.md §2.1, §2.2), written once for every device: the layer's
// product through ATen (at::linear / at::convolution), then ONE fused pass over its output z that
// sums the per-element term φ''(z)² s² (or the smoothed term) over the batch. The pass comes from a
// backend struct K (cpu/hessian_norm.cpp, cuda/hessian_norm.cu), which registers these templates
// for its dispatch key (register_hessian_norm_ops below).
//
// K provides
//   row_blocks(B, M): how many row blocks the pass splits B rows of M columns into
//   hessian_term_partials(z, s, value, partial, spec):
//       z (B, M) contiguous; s (M) contiguous, z's opmath dtype; partial (row_blocks, M) zeros of
//       that dtype. Adds Σ over the rows of block r (rows [B r/R, B (r+1)/R)) of
//       hessian_term(z, s) to partial[r]; writes φ(z) into value (B, M) when it is defined.
//   activation_bwd(grad, z, grad_z, spec): grad_z = grad · φ'(z), all contiguous, one shape.
// The row blocks are summed after the pass in a fixed order: results don't depend on scheduling.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include "common/activations.h"
#include "common/checks.h"
#include "large_buffer.h"

namespace mapopt {

namespace hessian_detail {

inline Activation parse_activation_name(std::string_view name) {
  return parse_name<Activation>(name, kActivationNames, "activation");
}

// The activation and its constants; sigma must be given (> 0) exactly for the piecewise-linear
// activations (MATH.md §2.2).
inline ActivationSpec parse_activation(std::string_view name, std::optional<double> sigma,
                                       double negative_slope, double alpha) {
  const Activation a = parse_activation_name(name);
  if (is_piecewise_linear(a)) {
    TORCH_CHECK_VALUE(sigma.has_value(), "activation='", std::string(name),
                      "' is piecewise linear: its exact Hessian is zero almost everywhere, so the "
                      "criterion cannot rank units. Pass sigma > 0 to score the Gaussian-smoothed "
                      "activation (MATH.md §2.2)");
    TORCH_CHECK_VALUE(*sigma > 0, "sigma must be > 0, got ", *sigma);
  } else {
    TORCH_CHECK_VALUE(!sigma.has_value(), "sigma smooths the piecewise-linear activations "
                      "('relu', 'leaky_relu', 'identity') only; activation='", std::string(name),
                      "' has an exact Hessian: pass sigma=None");
  }
  return {a, negative_slope, alpha, sigma.value_or(0.0)};
}

// True for "mean", false for "sum".
inline bool parse_reduction(std::string_view reduction) {
  TORCH_CHECK_VALUE(reduction == "mean" || reduction == "sum",
                    "reduction must be 'mean' or 'sum', got '", std::string(reduction), "'");
  return reduction == "mean";
}

// Σ over the B rows of z (B, M) of the per-element term, (M) in opmath; φ(z) into value if defined.
template <class K>
at::Tensor sum_hessian_term(const at::Tensor& z, const at::Tensor& s, const at::Tensor& value,
                            const ActivationSpec& spec) {
  const int64_t B = z.size(0), M = z.size(1);
  at::Tensor partial = at::zeros({K::row_blocks(B, M), M}, s.options());
  K::hessian_term_partials(z, s, value, partial, spec);
  return partial.size(0) == 1 ? partial[0] : partial.sum(0);
}

// Per-unit scores from the (units * positions) batch sums: Σ over positions, ÷ rows for "mean"
// (no rows: 0 / 0 = NaN, as torch.mean of nothing).
inline at::Tensor finish_scores(const at::Tensor& term_sum, int64_t units, int64_t positions,
                                int64_t rows, bool mean, at::ScalarType dtype) {
  at::Tensor scores = term_sum.view({units, positions}).sum(1);
  if (mean) scores.div_(static_cast<double>(rows));
  return scores.to(dtype);
}

// A conv parameter (stride, padding, dilation) given for one or every spatial dim.
inline std::vector<int64_t> conv_param(at::IntArrayRef p, int64_t dims, const char* name,
                                       int64_t min_value) {
  TORCH_CHECK_VALUE(p.size() == 1 || static_cast<int64_t>(p.size()) == dims, name,
                    " must have 1 or ", dims, " values (one per spatial dim), got ", p);
  std::vector<int64_t> out(dims, p[0]);
  if (p.size() > 1) out.assign(p.begin(), p.end());
  for (int64_t v : out) {
    TORCH_CHECK_VALUE(v >= min_value, name, " must be >= ", min_value, " in every dim, got ", p);
  }
  return out;
}

inline void check_bias(const std::optional<at::Tensor>& bias, int64_t units, const char* meaning,
                       const at::Tensor& input) {
  if (!bias) return;
  check_shape(*bias, "bias", {units}, meaning);
  check_like(*bias, "bias", input, "input");
}

}  // namespace hessian_detail

// I_k = ‖w_k‖⁴ · Σ_b φ''(z_bk)² (÷ rows for "mean"), input (..., in_features), weight (out, in).
template <class K>
at::Tensor hessian_norm_linear(const at::Tensor& input, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, std::string_view activation,
                               std::optional<double> sigma, double negative_slope, double alpha,
                               std::string_view reduction) {
  using namespace hessian_detail;
  const ActivationSpec spec = parse_activation(activation, sigma, negative_slope, alpha);
  const bool mean = parse_reduction(reduction);
  check_floating(input, "input");
  TORCH_CHECK_VALUE(input.dim() >= 1, "input must have shape (..., in_features), got a scalar");
  TORCH_CHECK_VALUE(weight.dim() == 2, "weight must have shape (out_features, in_features), got ",
                    weight.sizes());
  TORCH_CHECK_VALUE(input.size(-1) == weight.size(1), "input has ", input.size(-1),
                    " features (shape ", input.sizes(), ") but weight ", weight.sizes(),
                    " expects in_features=", weight.size(1));
  check_like(weight, "weight", input, "input");
  check_bias(bias, weight.size(0), "(out_features,)", input);
  c10::OptionalDeviceGuard guard(input.device());
  const int64_t rows = c10::multiply_integers(input.sizes().slice(0, input.dim() - 1));
  const at::Tensor z = at::linear(input.reshape({rows, weight.size(1)}), weight, bias).contiguous();
  // s = ‖w_k‖², so that the term φ''² s² is ‖w_k‖⁴ φ''².
  const at::Tensor s = weight.to(at::toOpMathType(weight.scalar_type())).square().sum(1);
  return finish_scores(sum_hessian_term<K>(z, s, at::Tensor(), spec), weight.size(0), 1, rows,
                       mean, input.scalar_type());
}

// I_c = Σ_b Σ_p φ''(z_bcp)² s_cp² (÷ batch for "mean"), s = conv(ones, w², no bias): 1-d or 2-d.
template <class K>
at::Tensor hessian_norm_conv(const at::Tensor& input, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                             std::string_view activation, std::optional<double> sigma,
                             double negative_slope, double alpha, std::string_view reduction) {
  using namespace hessian_detail;
  const ActivationSpec spec = parse_activation(activation, sigma, negative_slope, alpha);
  const bool mean = parse_reduction(reduction);
  check_floating(input, "input");
  TORCH_CHECK_VALUE(weight.dim() == 3 || weight.dim() == 4,
                    "weight must have shape (out_channels, in_channels/groups, *kernel) with 1 or "
                    "2 spatial dims, got ", weight.sizes());
  const int64_t dims = weight.dim() - 2;
  TORCH_CHECK_VALUE(input.dim() == weight.dim(), "input must have shape (batch, in_channels, ",
                    dims == 1 ? "length" : "height, width", ") for weight ", weight.sizes(),
                    ", got ", input.sizes());
  TORCH_CHECK_VALUE(groups >= 1, "groups must be >= 1, got ", groups);
  const int64_t C = weight.size(0);
  TORCH_CHECK_VALUE(C % groups == 0, "out_channels (weight ", weight.sizes(),
                    ") must be divisible by groups=", groups);
  TORCH_CHECK_VALUE(input.size(1) == weight.size(1) * groups, "input has ", input.size(1),
                    " channels (shape ", input.sizes(), ") but weight ", weight.sizes(),
                    " with groups=", groups, " expects in_channels=", weight.size(1) * groups);
  check_like(weight, "weight", input, "input");
  check_bias(bias, C, "(out_channels,)", input);
  const auto st = conv_param(stride, dims, "stride", 1);
  const auto pad = conv_param(padding, dims, "padding", 0);
  const auto dil = conv_param(dilation, dims, "dilation", 1);
  const std::vector<int64_t> no_output_padding(dims, 0);
  c10::OptionalDeviceGuard guard(input.device());
  const at::Tensor z = at::convolution(input, weight, bias, st, pad, dil, false, no_output_padding,
                                       groups)
                           .contiguous();
  const int64_t B = z.size(0);
  const int64_t P = c10::multiply_integers(z.sizes().slice(2));
  // s_{c,p}: the taps of w_c that land inside the input (padding contributes nothing), §2.1.
  std::vector<int64_t> ones_shape{1, input.size(1)};
  for (int64_t d = 0; d < dims; ++d) ones_shape.push_back(input.size(2 + d));
  const at::Tensor w2 = weight.to(at::toOpMathType(weight.scalar_type())).square();
  const at::Tensor s = at::convolution(at::ones(ones_shape, w2.options()), w2, std::nullopt, st,
                                       pad, dil, false, no_output_padding, groups)
                           .reshape({-1});
  return finish_scores(sum_hessian_term<K>(z.view({B, C * P}), s, at::Tensor(), spec), C, P, B,
                       mean, input.scalar_type());
}

// φ(z) and, in the same pass, Σ over dim 0 of the per-element term, shape z.shape[1:] in the
// opmath dtype; s broadcasts against z.shape[1:].
template <class K>
std::tuple<at::Tensor, at::Tensor> activation_with_hessian_norm_fwd(
    const at::Tensor& z, const at::Tensor& s, std::string_view activation,
    std::optional<double> sigma, double negative_slope, double alpha) {
  using namespace hessian_detail;
  const ActivationSpec spec = parse_activation(activation, sigma, negative_slope, alpha);
  check_floating(z, "z");
  TORCH_CHECK_VALUE(z.dim() >= 1, "z must have a batch dimension (batch, *features), got a scalar");
  check_like(s, "s", z, "z");
  const at::IntArrayRef features = z.sizes().slice(1);
  TORCH_CHECK_VALUE(s.dim() <= static_cast<int64_t>(features.size()) &&
                        at::is_expandable_to(s.sizes(), features),
                    "s ", s.sizes(), " must broadcast against z.shape[1:] = ", features,
                    " (z has shape ", z.sizes(), ")");
  c10::OptionalDeviceGuard guard(z.device());
  const int64_t B = z.size(0);
  const int64_t M = c10::multiply_integers(features);
  const at::Tensor zc = z.contiguous();
  const at::Tensor sc =
      s.to(at::toOpMathType(s.scalar_type())).expand(features).contiguous().view({M});
  at::Tensor out = empty_large(zc.sizes(), zc.options());
  at::Tensor term = sum_hessian_term<K>(zc.view({B, M}), sc, out.view({B, M}), spec);
  return {out, term.view(features)};
}

// grad_output · φ'(z).
template <class K>
at::Tensor activation_with_hessian_norm_bwd(const at::Tensor& grad_output, const at::Tensor& z,
                                            std::string_view activation, double negative_slope,
                                            double alpha) {
  using namespace hessian_detail;
  const ActivationSpec spec{parse_activation_name(activation), negative_slope, alpha, 0.0};
  check_floating(z, "z");
  check_shape(grad_output, "grad_output", z.sizes(), "z.shape");
  check_like(grad_output, "grad_output", z, "z");
  c10::OptionalDeviceGuard guard(z.device());
  const at::Tensor zc = z.contiguous();
  at::Tensor grad_z = empty_large(zc.sizes(), zc.options());
  K::activation_bwd(grad_output.contiguous(), zc, grad_z, spec);
  return grad_z;
}

template <class K>
void register_hessian_norm_ops(torch::Library& m) {
  m.impl("hessian_norm_linear", &hessian_norm_linear<K>);
  m.impl("hessian_norm_conv", &hessian_norm_conv<K>);
  m.impl("activation_with_hessian_norm_fwd", &activation_with_hessian_norm_fwd<K>);
  m.impl("activation_with_hessian_norm_bwd", &activation_with_hessian_norm_bwd<K>);
}

}  // namespace mapopt
