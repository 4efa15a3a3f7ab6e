// The distillation ops (MATH.md §3), written once for every device on top of a kernel backend K
// (csrc/cpu/distill.cpp, csrc/cuda/distill.cu), with their input checks. K provides:
//   kd_loss_fwd_rows(student, teacher, target, distance, alpha, T, ignore_index, loss, stats):
//     per-row losses (N,) and row statistics (N, kKdRowStats);
//   kd_loss_bwd_rows(grad_loss, student, teacher, target, stats, distance, alpha, T,
//     ignore_index, grad): the (N, C) gradient w.r.t. the student, grad_loss[b] · ∂L_b/∂s_b;
//   kd_loss_fwd_grad_rows(..., coefficient, loss, stats, grad) (CPU only): the forward rows
//     and, in the same call, the gradient of every row scaled by the 0-dim `coefficient`;
//   mapping_distance_fwd(students, teachers, out) and mapping_distance_bwd(grad, students,
//     teachers, grads): every pair in one pass / launch;
//   mapping_distance_fwd_grad(students, teachers, coefficients, out, grads) (CPU only): both
//     in one pass, the gradient scaled by coefficients.
// Inputs reach K contiguous; `target` may be undefined (no CE term). Loss and distance values
// (and their incoming gradients) are in the accumulation dtype, float32 for 16-bit inputs: a sum
// of squares over a feature map leaves float16's range (65504) easily, which is why autocast runs
// torch's own losses in float32. Gradients w.r.t. the inputs keep the inputs' dtype.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/distill.h"
#include "large_buffer.h"

namespace mapopt {

inline Distance parse_distance(std::string_view name) {
  for (int i = 0; i < kNumDistances; ++i) {
    if (name == kDistanceNames[i]) return static_cast<Distance>(i);
  }
  TORCH_CHECK_VALUE(false, "distance must be 'l2' or 'kl', got '", std::string(name), "'");
}

// A loss value's incoming gradient: the accumulation dtype of `like`, on its device.
inline void check_accumulation(const at::Tensor& grad, const char* name, const at::Tensor& like,
                               const char* like_name) {
  const at::ScalarType acc = at::toOpMathType(like.scalar_type());
  TORCH_CHECK_TYPE(grad.scalar_type() == acc, name, " must have dtype ", acc, " (the loss's: ",
                   like_name, " has dtype ", like.scalar_type(), "), got ", grad.scalar_type());
  TORCH_CHECK(grad.device() == like.device(), name, " is on ", grad.device(), " but ", like_name,
              " is on ", like.device());
}

inline Distance check_kd_inputs(const at::Tensor& student, const at::Tensor& teacher,
                                const std::optional<at::Tensor>& target, double alpha,
                                std::string_view distance, double temperature) {
  const Distance d = parse_distance(distance);
  TORCH_CHECK_VALUE(alpha >= 0.0 && alpha <= 1.0, "alpha must be in [0, 1], got ", alpha);
  TORCH_CHECK_VALUE(temperature > 0.0 && std::isfinite(temperature),
                    "temperature must be positive and finite, got ", temperature);
  check_floating(student, "student logits");
  TORCH_CHECK_VALUE(student.dim() == 2 && student.size(1) > 0,
                    "student logits must be 2-D (N, C) with C >= 1, got shape ", student.sizes());
  TORCH_CHECK_VALUE(teacher.sizes() == student.sizes(), "teacher logits must have the student's ",
                    "shape (N, C) = ", student.sizes(), ", got ", teacher.sizes());
  check_like(teacher, "teacher logits", student, "student logits");
  if (target) {
    TORCH_CHECK_TYPE(target->scalar_type() == at::kLong,
                     "target must hold int64 class indices, got dtype ", target->scalar_type());
    TORCH_CHECK_VALUE(target->dim() == 1 && target->size(0) == student.size(0),
                      "target must have shape (N,) = (", student.size(0),
                      ",) to match student logits ", student.sizes(), ", got ", target->sizes());
    TORCH_CHECK(target->device() == student.device(), "target is on ", target->device(),
                " but student logits are on ", student.device());
  }
  return d;
}

template <class K>
std::tuple<at::Tensor, at::Tensor> kd_loss_fwd(const at::Tensor& student,
                                               const at::Tensor& teacher,
                                               const std::optional<at::Tensor>& target,
                                               double alpha, std::string_view distance,
                                               double temperature, int64_t ignore_index) {
  const Distance d = check_kd_inputs(student, teacher, target, alpha, distance, temperature);
  const c10::DeviceGuard guard(student.device());
  const at::Tensor s = student.contiguous(), t = teacher.contiguous();
  const at::Tensor y = target ? target->contiguous() : at::Tensor();
  const auto acc = s.options().dtype(at::toOpMathType(s.scalar_type()));
  at::Tensor loss = at::empty({s.size(0)}, acc);
  at::Tensor stats = at::empty({s.size(0), kKdRowStats}, acc);
  K::kd_loss_fwd_rows(s, t, y, d, alpha, temperature, ignore_index, loss, stats);
  return {loss, stats};
}

template <class K>
at::Tensor kd_loss_bwd(const at::Tensor& grad_loss, const at::Tensor& student,
                       const at::Tensor& teacher, const std::optional<at::Tensor>& target,
                       const at::Tensor& row_stats, double alpha, std::string_view distance,
                       double temperature, int64_t ignore_index) {
  const Distance d = check_kd_inputs(student, teacher, target, alpha, distance, temperature);
  const int64_t N = student.size(0);
  TORCH_CHECK_VALUE(grad_loss.dim() == 1 && grad_loss.size(0) == N,
                    "grad_loss must have shape (N,) = (", N, ",), got ", grad_loss.sizes());
  check_accumulation(grad_loss, "grad_loss", student, "student logits");
  TORCH_CHECK_VALUE(row_stats.dim() == 2 && row_stats.size(0) == N &&
                        row_stats.size(1) == kKdRowStats,
                    "row_stats must have shape (N, ", kKdRowStats, ") = (", N, ", ", kKdRowStats,
                    "), got ", row_stats.sizes());
  TORCH_CHECK_TYPE(row_stats.scalar_type() == at::toOpMathType(student.scalar_type()),
                   "row_stats must have dtype ", at::toOpMathType(student.scalar_type()),
                   " (kd_loss_fwd's), got ", row_stats.scalar_type());
  const c10::DeviceGuard guard(student.device());
  const at::Tensor s = student.contiguous();
  at::Tensor grad = empty_large(s.sizes(), s.options());
  K::kd_loss_bwd_rows(grad_loss.contiguous(), s, teacher.contiguous(),
                      target ? target->contiguous() : at::Tensor(), row_stats.contiguous(), d,
                      alpha, temperature, ignore_index, grad);
  return grad;
}

// Σ c·x: a reduced loss from its per-row (kd_loss) or per-pair (mapping_distance) values and
// their coefficients (a 0-dim coefficient applies to every value).
inline at::Tensor weighted_total(const at::Tensor& values, const at::Tensor& coefficients) {
  return (values * coefficients).sum();
}

// The 0-dim coefficient of a reduced loss: ∂total/∂L_b, the same for every row (1 for "sum",
// 1/count for "mean").
inline void check_coefficient(const at::Tensor& coefficient, const at::Tensor& student) {
  TORCH_CHECK_VALUE(coefficient.dim() == 0, "coefficient must be 0-dim, got shape ",
                    coefficient.sizes());
  check_accumulation(coefficient, "coefficient", student, "student logits");
}

template <class K>
std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_loss_fwd_grad(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& target,
    double alpha, std::string_view distance, double temperature, int64_t ignore_index,
    const at::Tensor& coefficient) {
  const Distance d = check_kd_inputs(student, teacher, target, alpha, distance, temperature);
  check_coefficient(coefficient, student);
  const c10::DeviceGuard guard(student.device());
  const at::Tensor s = student.contiguous(), t = teacher.contiguous();
  const at::Tensor y = target ? target->contiguous() : at::Tensor();
  const at::Tensor c = coefficient.contiguous();
  const auto acc = s.options().dtype(at::toOpMathType(s.scalar_type()));
  at::Tensor loss = at::empty({s.size(0)}, acc);
  at::Tensor stats = at::empty({s.size(0), kKdRowStats}, acc);
  at::Tensor grad = empty_large(s.sizes(), s.options());
  K::kd_loss_fwd_grad_rows(s, t, y, d, alpha, temperature, ignore_index, c, loss, stats, grad);
  return {weighted_total(loss, c), stats, grad};
}

// The backend kernel of kd_loss_total: the path without gradients.
template <class K>
at::Tensor kd_loss_total(const at::Tensor& student, const at::Tensor& teacher,
                         const std::optional<at::Tensor>& target, double alpha,
                         std::string_view distance, double temperature, int64_t ignore_index,
                         const at::Tensor& coefficient) {
  check_kd_inputs(student, teacher, target, alpha, distance, temperature);
  check_coefficient(coefficient, student);
  auto [loss, stats] =
      kd_loss_fwd<K>(student, teacher, target, alpha, distance, temperature, ignore_index);
  return weighted_total(loss, coefficient);
}

// Both lists non-empty and of one length; pair j: same shape, a batch dimension; every tensor of
// one floating dtype and device.
inline void check_pairs(at::TensorList students, at::TensorList teachers) {
  TORCH_CHECK_VALUE(!students.empty(), "students must hold at least one tensor");
  TORCH_CHECK_VALUE(students.size() == teachers.size(), "students and teachers must have one ",
                    "length, got ", students.size(), " and ", teachers.size());
  const at::Tensor& ref = students[0];
  check_floating(ref, "students[0]");
  // Messages are built only on failure: this runs on every call.
  for (size_t j = 0; j < students.size(); ++j) {
    const at::Tensor& s = students[j];
    TORCH_CHECK_VALUE(s.dim() >= 1, "students[", j, "] must have a batch dimension, got a scalar");
    TORCH_CHECK_VALUE(teachers[j].sizes() == s.sizes(), "teachers[", j, "] must have the shape ",
                      "of students[", j, "] = ", s.sizes(), ", got ", teachers[j].sizes());
    for (const at::Tensor* x : {&s, &teachers[j]}) {
      const char* list = x == &s ? "students" : "teachers";
      TORCH_CHECK_TYPE(x->scalar_type() == ref.scalar_type(), list, "[", j, "] has dtype ",
                       x->scalar_type(), " but students[0] has dtype ", ref.scalar_type(),
                       ": all tensors must share one dtype");
      TORCH_CHECK(x->device() == ref.device(), list, "[", j, "] is on ", x->device(),
                  " but students[0] is on ", ref.device(), ": all tensors must be on one device");
    }
  }
}

inline std::vector<at::Tensor> contiguous_all(at::TensorList ts) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(t.contiguous());
  return out;
}

template <class K>
at::Tensor mapping_distance_fwd(at::TensorList students, at::TensorList teachers) {
  check_pairs(students, teachers);
  const c10::DeviceGuard guard(students[0].device());
  at::Tensor out = at::empty({static_cast<int64_t>(students.size())},
                             students[0].options().dtype(at::toOpMathType(
                                 students[0].scalar_type())));
  K::mapping_distance_fwd(contiguous_all(students), contiguous_all(teachers), out);
  return out;
}

inline void check_coefficients(const at::Tensor& coefficients, at::TensorList students) {
  const int64_t P = static_cast<int64_t>(students.size());
  TORCH_CHECK_VALUE(coefficients.dim() == 1 && coefficients.size(0) == P,
                    "coefficients must have shape (", P, ",) (one per pair), got ",
                    coefficients.sizes());
  check_accumulation(coefficients, "coefficients", students[0], "students[0]");
}

template <class K>
std::tuple<at::Tensor, std::vector<at::Tensor>> mapping_distance_fwd_grad(
    at::TensorList students, at::TensorList teachers, const at::Tensor& coefficients) {
  check_pairs(students, teachers);
  check_coefficients(coefficients, students);
  const c10::DeviceGuard guard(students[0].device());
  at::Tensor out = at::empty({static_cast<int64_t>(students.size())}, coefficients.options());
  std::vector<at::Tensor> grads;
  grads.reserve(students.size());
  for (const auto& s : students) grads.push_back(empty_large(s.sizes(), s.options()));
  K::mapping_distance_fwd_grad(contiguous_all(students), contiguous_all(teachers),
                               coefficients.contiguous(), out, grads);
  return {out, grads};
}

// The backend kernel of mapping_distance_total: the path without gradients.
template <class K>
at::Tensor mapping_distance_total(at::TensorList students, at::TensorList teachers,
                                  const at::Tensor& coefficients) {
  check_pairs(students, teachers);
  check_coefficients(coefficients, students);
  return weighted_total(mapping_distance_fwd<K>(students, teachers), coefficients);
}

template <class K>
std::vector<at::Tensor> mapping_distance_bwd(const at::Tensor& grad_distances,
                                             at::TensorList students, at::TensorList teachers) {
  check_pairs(students, teachers);
  const int64_t P = static_cast<int64_t>(students.size());
  TORCH_CHECK_VALUE(grad_distances.dim() == 1 && grad_distances.size(0) == P,
                    "grad_distances must have shape (", P, ",), got ", grad_distances.sizes());
  check_accumulation(grad_distances, "grad_distances", students[0], "students[0]");
  const c10::DeviceGuard guard(students[0].device());
  std::vector<at::Tensor> grads;
  grads.reserve(P);
  for (const auto& s : students) grads.push_back(at::empty(s.sizes(), s.options()));
  K::mapping_distance_bwd(grad_distances.contiguous(), contiguous_all(students),
                          contiguous_all(teachers), grads);
  return grads;
}

// The ops every backend implements (the CPU adds the *_fwd_grad ops of its fused path).
template <class K>
void register_distill_ops(torch::Library& m) {
  m.impl("kd_loss_fwd", &kd_loss_fwd<K>);
  m.impl("kd_loss_bwd", &kd_loss_bwd<K>);
  m.impl("kd_loss_total", &kd_loss_total<K>);
  m.impl("mapping_distance_fwd", &mapping_distance_fwd<K>);
  m.impl("mapping_distance_bwd", &mapping_distance_bwd<K>);
  m.impl("mapping_distance_total", &mapping_distance_total<K>);
}

}  // namespace mapopt
