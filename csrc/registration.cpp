// Every op schema of mapopt_native, in one place. Kernels are registered per dispatch key in
// cpu/*.cpp and cuda/*.cu; autograd formulas in mapopt_native/ops/ (Python) or csrc/autograd/ (C++,
// where the per-call cost of a Python formula mattered), fake (shape) kernels in mapopt_native/ops/.
// Forward ops return what their backward needs as extra outputs (DESIGN.md, "Op shape").
#include <torch/library.h>

TORCH_LIBRARY(mapopt_native, m) {
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};

  // Gated recurrent cells, MATH.md §1. gate: one of mapopt_native.GATES.
  m.def(
      "gated_gru_cell_fwd(Tensor input, Tensor hx, Tensor weight_ih, Tensor weight_hh, "
      "Tensor? bias_ih, Tensor? bias_hh, str gate) -> (Tensor hy, Tensor workspace)",
      tags);
  m.def(
      "gated_gru_cell_bwd(Tensor grad_hy, Tensor input, Tensor hx, Tensor weight_ih, "
      "Tensor weight_hh, Tensor workspace, str gate, bool has_bias, bool[3] output_mask) -> "
      "(Tensor grad_input, Tensor grad_hx, Tensor grad_weight_ih, Tensor grad_weight_hh, "
      "Tensor grad_bias_ih, Tensor grad_bias_hh)",
      tags);
  m.def(
      "gated_lstm_cell_fwd(Tensor input, Tensor hx, Tensor cx, Tensor weight_ih, "
      "Tensor weight_hh, Tensor? bias_ih, Tensor? bias_hh, str gate) -> "
      "(Tensor hy, Tensor cy, Tensor workspace)",
      tags);
  m.def(
      "gated_lstm_cell_bwd(Tensor? grad_hy, Tensor? grad_cy, Tensor input, Tensor hx, Tensor cx, "
      "Tensor weight_ih, Tensor weight_hh, Tensor cy, Tensor workspace, str gate, bool has_bias, "
      "bool[4] output_mask) -> (Tensor grad_input, Tensor grad_hx, Tensor grad_cx, "
      "Tensor grad_weight_ih, Tensor grad_weight_hh, Tensor grad_bias_ih, Tensor grad_bias_hh)",
      tags);

  // Gated recurrent layers: one layer, one direction, the whole sequence per call. input is
  // padded (T, B, I) with batch_sizes None, or packed rows (N, I) with PackedSequence's
  // batch_sizes. need_workspace: keep what the backward needs (training) or nothing (inference).
  m.def(
      "gated_gru_seq_fwd(Tensor input, Tensor hx, Tensor weight_ih, Tensor weight_hh, "
      "Tensor? bias_ih, Tensor? bias_hh, Tensor? batch_sizes, bool reverse, str gate, "
      "bool need_workspace) -> (Tensor output, Tensor hy, Tensor workspace)",
      tags);
  m.def(
      "gated_gru_seq_bwd(Tensor? grad_output, Tensor? grad_hy, Tensor input, Tensor hx, "
      "Tensor weight_ih, Tensor weight_hh, Tensor output, Tensor workspace, Tensor? batch_sizes, "
      "bool reverse, str gate, bool has_bias, bool[3] output_mask) -> (Tensor grad_input, "
      "Tensor grad_hx, Tensor grad_weight_ih, Tensor grad_weight_hh, Tensor grad_bias_ih, "
      "Tensor grad_bias_hh)",
      tags);
  m.def(
      "gated_lstm_seq_fwd(Tensor input, Tensor hx, Tensor cx, Tensor weight_ih, Tensor weight_hh, "
      "Tensor? bias_ih, Tensor? bias_hh, Tensor? batch_sizes, bool reverse, str gate, "
      "bool need_workspace) -> (Tensor output, Tensor hy, Tensor cy, Tensor workspace, "
      "Tensor cell_states)",
      tags);
  m.def(
      "gated_lstm_seq_bwd(Tensor? grad_output, Tensor? grad_hy, Tensor? grad_cy, Tensor input, "
      "Tensor hx, Tensor cx, Tensor weight_ih, Tensor weight_hh, Tensor output, Tensor workspace, "
      "Tensor cell_states, Tensor? batch_sizes, bool reverse, str gate, bool has_bias, "
      "bool[4] output_mask) -> (Tensor grad_input, Tensor grad_hx, Tensor grad_cx, "
      "Tensor grad_weight_ih, Tensor grad_weight_hh, Tensor grad_bias_ih, Tensor grad_bias_hh)",
      tags);

  // Hessian-norm importance, MATH.md §2.1-2.2. activation: one of mapopt_native.ACTIVATIONS;
  // sigma (> 0) smooths the piecewise-linear ones and is required for them; reduction: "mean" or
  // "sum" over the batch. Scores are (out_features,) / (out_channels,); no autograd.
  m.def(
      "hessian_norm_linear(Tensor input, Tensor weight, Tensor? bias, str activation, "
      "float? sigma, float negative_slope, float alpha, str reduction) -> Tensor",
      tags);
  m.def(
      "hessian_norm_conv(Tensor input, Tensor weight, Tensor? bias, int[] stride, int[] padding, "
      "int[] dilation, int groups, str activation, float? sigma, float negative_slope, "
      "float alpha, str reduction) -> Tensor",
      tags);
  // φ(z) and, in the same pass, the batch sum (over dim 0) of the per-element term, shape
  // z.shape[1:] in z's opmath dtype; the wrapper adds it to the caller's accumulator. Functional
  // (no Tensor(a!)) because register_autograd refuses mutating ops.
  m.def(
      "activation_with_hessian_norm_fwd(Tensor z, Tensor s, str activation, float? sigma, "
      "float negative_slope, float alpha) -> (Tensor output, Tensor hessian_term_sum)",
      tags);
  m.def(
      "activation_with_hessian_norm_bwd(Tensor grad_output, Tensor z, str activation, "
      "float negative_slope, float alpha) -> Tensor",
      tags);

  // Distillation, MATH.md §3. kd_loss_fwd: per-row losses (N,) of (N, C) logits, and per-row
  // log-normalisers (N, 3) from which kd_loss_bwd writes grad_loss[b] · ∂L_b/∂s_b in one pass.
  // target None: the distance term alone. distance: 'l2' or 'kl'. The teacher gets no gradient.
  m.def(
      "kd_loss_fwd(Tensor student, Tensor teacher, Tensor? target, float alpha, str distance, "
      "float temperature, int ignore_index) -> (Tensor loss, Tensor row_stats)",
      tags);
  m.def(
      "kd_loss_bwd(Tensor grad_loss, Tensor student, Tensor teacher, Tensor? target, "
      "Tensor row_stats, float alpha, str distance, float temperature, int ignore_index) -> "
      "Tensor",
      tags);
  // kd_loss_total: coefficient · Σ_b L_b (a 0-dim tensor; coefficient 0-dim: 1 for "sum",
  // 1/count for "mean"). On the CPU in float32 / float64 its autograd kernel writes the gradient
  // in the forward call, with kd_loss_fwd_grad (CPU only; it also returns the row statistics, for
  // a second backward).
  m.def(
      "kd_loss_total(Tensor student, Tensor teacher, Tensor? target, float alpha, str distance, "
      "float temperature, int ignore_index, Tensor coefficient) -> Tensor",
      tags);
  m.def(
      "kd_loss_fwd_grad(Tensor student, Tensor teacher, Tensor? target, float alpha, "
      "str distance, float temperature, int ignore_index, Tensor coefficient) -> "
      "(Tensor total, Tensor row_stats, Tensor grad)",
      tags);
  // D_j = (1/B_j) Σ_b ‖s_b - t_b‖² for every pair (students[j], teachers[j]), in one pass.
  m.def("mapping_distance_fwd(Tensor[] students, Tensor[] teachers) -> Tensor", tags);
  m.def(
      "mapping_distance_bwd(Tensor grad_distances, Tensor[] students, Tensor[] teachers) -> "
      "Tensor[]",
      tags);
  // Σ_j c_j D_j (a 0-dim tensor), the weighted sum / mean of mapping_distance; on the CPU in
  // float32 / float64 its autograd kernel computes c_j ∂D_j/∂s_j in the forward pass, with
  // mapping_distance_fwd_grad (CPU only).
  m.def(
      "mapping_distance_total(Tensor[] students, Tensor[] teachers, Tensor coefficients) -> "
      "Tensor",
      tags);
  m.def(
      "mapping_distance_fwd_grad(Tensor[] students, Tensor[] teachers, Tensor coefficients) -> "
      "(Tensor distances, Tensor[] grads)",
      tags);
}
