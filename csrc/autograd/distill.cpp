// The autograd kernels of mapping_distance_fwd, mapping_distance_total and kd_loss_total, in C++
// (one registration for every device).
//
// Why not torch.library.register_autograd like the other ops: mapping_distance is meant for many
// small feature pairs, where its kernels take tens of microseconds and the Python side of a
// registered autograd formula took about 250 us a step (bench_distill.py, pooled pairs). The
// formula is MATH.md §3: ∂D_j/∂s_j = 2 (s_j - t_j) / B_j. Teachers get no gradient.
//
// mapping_distance_total (Σ_j c_j D_j, the weighted sum / mean) and kd_loss_total (the reduced KD
// loss) write their gradient in the forward call on the CPU in float / double (see
// fuse_gradient): both are memory-bound there, and reading the inputs once, with the gradient
// written beside the sums, moves 3 tensor-sizes of bytes where a forward and then a backward pass
// move 5. The backward hands the buffers over, scaled in place unless the incoming gradient is
// exactly 1.
#include <ATen/SavedTensorHooks.h>
#include <ATen/TensorSubclassLikeUtils.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include "../distill.h"
#include "dispatch.h"

namespace mapopt {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

// The C++ signatures of the ops called below (schemas in csrc/registration.cpp).
using MdFwd = at::Tensor(at::TensorList, at::TensorList);
using MdBwd = std::vector<at::Tensor>(const at::Tensor&, at::TensorList, at::TensorList);
using MdFwdGrad = std::tuple<at::Tensor, std::vector<at::Tensor>>(at::TensorList, at::TensorList,
                                                                  const at::Tensor&);
using MdTotal = at::Tensor(at::TensorList, at::TensorList, const at::Tensor&);
using KdFwd = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                 const OptTensor&, double, std::string_view,
                                                 double, int64_t);
using KdFwdGrad = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const OptTensor&, double, std::string_view, double,
    int64_t, const at::Tensor&);
using KdTotal = at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, double,
                           std::string_view, double, int64_t, const at::Tensor&);
using KdBwd = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                         const at::Tensor&, double, std::string_view, double, int64_t);

at::Tensor call_fwd(at::TensorList students, at::TensorList teachers) {
  static const auto op = typed_op<MdFwd>("mapopt_native::mapping_distance_fwd");
  return op.call(students, teachers);
}

std::vector<at::Tensor> call_bwd(const at::Tensor& grad, at::TensorList students,
                                 at::TensorList teachers) {
  static const auto op = typed_op<MdBwd>("mapopt_native::mapping_distance_bwd");
  return op.call(grad, students, teachers);
}

class MappingDistance : public torch::autograd::Function<MappingDistance> {
 public:
  static at::Tensor forward(AutogradContext* ctx, at::TensorList students,
                            at::TensorList teachers) {
    at::AutoDispatchBelowADInplaceOrView below;
    std::vector<at::Tensor> saved(students.begin(), students.end());
    saved.insert(saved.end(), teachers.begin(), teachers.end());
    ctx->save_for_backward(saved);
    return call_fwd(students, teachers);
  }

  // One gradient per input tensor: the students', then none for the teachers.
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const size_t pairs = saved.size() / 2;
    const at::TensorList students(saved.data(), pairs);
    const at::TensorList teachers(saved.data() + pairs, pairs);
    variable_list grads = call_bwd(grad_outputs[0].contiguous(), students, teachers);
    grads.resize(2 * pairs);
    return grads;
  }
};

at::Tensor mapping_distance_autograd(at::TensorList students, at::TensorList teachers) {
  return MappingDistance::apply(students, teachers);
}

std::tuple<at::Tensor, std::vector<at::Tensor>> call_fwd_grad(at::TensorList students,
                                                              at::TensorList teachers,
                                                              const at::Tensor& coefficients) {
  static const auto op = typed_op<MdFwdGrad>("mapopt_native::mapping_distance_fwd_grad");
  return op.call(students, teachers, coefficients);
}

at::Tensor call_total(at::TensorList students, at::TensorList teachers,
                      const at::Tensor& coefficients) {
  static const auto op = typed_op<MdTotal>("mapopt_native::mapping_distance_total");
  return op.call(students, teachers, coefficients);
}

// The fused path (the gradient written in the forward call, stashed, handed over by the backward)
// is taken only where that is safe and pays: on the CPU in float / double (the buffer is scaled
// by the incoming gradient in its own precision; a 16-bit buffer would be rounded twice, and
// where the forward's gradient is below float16's normal range, as before AMP's loss scaling,
// it would lose its low bits before the scale could save them; on a GPU a second read is cheap),
// on plain tensors (not traced by torch.compile, not batched by vmap), and outside saved-tensor
// hooks such as activation checkpointing, which a stashed buffer would bypass and outlive.
bool fuse_gradient(const at::Tensor& like) {
  const auto dtype = like.scalar_type();
  return like.device().is_cpu() && (dtype == at::kFloat || dtype == at::kDouble) &&
         !at::isTensorSubclassLike(like) &&
         !at::SavedTensorDefaultHooks::get_hooks().has_value();
}

// An incoming gradient that the stashed buffer may be scaled by in place: a plain CPU number
// outside any graph (create_graph=True needs the product recorded, vmap a batched product).
bool scales_in_place(const at::Tensor& g) {
  return g.device().is_cpu() && !at::isTensorSubclassLike(g) && !g.requires_grad();
}

// The stashed gradient, scaled by g: handed over (erased from ctx, so that autograd can take it
// as .grad without a copy) and scaled in place, or, where g must stay in a graph, a product.
at::Tensor take_scaled(AutogradContext* ctx, const std::string& key, const at::Tensor& g) {
  auto kept = ctx->saved_data.find(key);
  at::Tensor grad = kept->second.toTensor();
  if (!scales_in_place(g)) return at::mul(grad, g);
  ctx->saved_data.erase(kept);
  if (g.item<double>() != 1.0) grad.mul_(g);
  return grad;
}

class MappingDistanceTotal : public torch::autograd::Function<MappingDistanceTotal> {
 public:
  static at::Tensor forward(AutogradContext* ctx, at::TensorList students,
                            at::TensorList teachers, const at::Tensor& coefficients) {
    at::AutoDispatchBelowADInplaceOrView below;
    std::vector<at::Tensor> saved(students.begin(), students.end());
    saved.insert(saved.end(), teachers.begin(), teachers.end());
    saved.push_back(coefficients);
    ctx->save_for_backward(saved);
    at::Tensor distances;
    if (fuse_gradient(students[0])) {
      std::vector<at::Tensor> grads;
      std::tie(distances, grads) = call_fwd_grad(students, teachers, coefficients);
      for (size_t j = 0; j < grads.size(); ++j) {
        ctx->saved_data["grad" + std::to_string(j)] = grads[j];
      }
    } else {
      distances = call_fwd(students, teachers);
    }
    ctx->saved_data["distances"] = distances;  // the coefficients' gradient (learnable weights)
    return weighted_total(distances, coefficients);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const size_t pairs = (saved.size() - 1) / 2;
    const at::Tensor& g = grad_outputs[0];
    variable_list grads;
    if (ctx->saved_data.count("grad0")) {
      for (size_t j = 0; j < pairs; ++j) {
        grads.push_back(take_scaled(ctx, "grad" + std::to_string(j), g));
      }
    } else {  // not fused, or a second backward (retain_graph=True): from the saved pairs
      const at::TensorList students(saved.data(), pairs);
      const at::TensorList teachers(saved.data() + pairs, pairs);
      grads = call_bwd(at::mul(saved.back(), g).contiguous(), students, teachers);
    }
    grads.resize(2 * pairs + 1);  // none for the teachers
    if (ctx->needs_input_grad(2 * pairs)) {
      grads.back() = at::mul(ctx->saved_data["distances"].toTensor(), g);
    }
    return grads;
  }
};

std::tuple<at::Tensor, at::Tensor> call_kd_fwd(const at::Tensor& student, const at::Tensor& teacher,
                                               const OptTensor& target, double alpha,
                                               std::string_view distance, double temperature,
                                               int64_t ignore_index) {
  static const auto op = typed_op<KdFwd>("mapopt_native::kd_loss_fwd");
  return op.call(student, teacher, target, alpha, distance, temperature, ignore_index);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_kd_fwd_grad(
    const at::Tensor& student, const at::Tensor& teacher, const OptTensor& target, double alpha,
    std::string_view distance, double temperature, int64_t ignore_index,
    const at::Tensor& coefficient) {
  static const auto op = typed_op<KdFwdGrad>("mapopt_native::kd_loss_fwd_grad");
  return op.call(student, teacher, target, alpha, distance, temperature, ignore_index,
                 coefficient);
}

at::Tensor call_kd_total(const at::Tensor& student, const at::Tensor& teacher,
                         const OptTensor& target, double alpha, std::string_view distance,
                         double temperature, int64_t ignore_index, const at::Tensor& coefficient) {
  static const auto op = typed_op<KdTotal>("mapopt_native::kd_loss_total");
  return op.call(student, teacher, target, alpha, distance, temperature, ignore_index,
                 coefficient);
}

at::Tensor call_kd_bwd(const at::Tensor& grad_loss, const at::Tensor& student,
                       const at::Tensor& teacher, const OptTensor& target,
                       const at::Tensor& row_stats, double alpha, std::string_view distance,
                       double temperature, int64_t ignore_index) {
  static const auto op = typed_op<KdBwd>("mapopt_native::kd_loss_bwd");
  return op.call(grad_loss, student, teacher, target, row_stats, alpha, distance, temperature,
                 ignore_index);
}

// kd_loss with reduction "sum" / "mean": the same hand-over of a gradient written in the forward
// call as MappingDistanceTotal (on the CPU in the same pass over each row, while it is in cache).
class KdLossTotal : public torch::autograd::Function<KdLossTotal> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& student,
                            const at::Tensor& teacher, const OptTensor& target, double alpha,
                            std::string_view distance, double temperature, int64_t ignore_index,
                            const at::Tensor& coefficient) {
    at::AutoDispatchBelowADInplaceOrView below;
    at::Tensor total, stats;
    if (fuse_gradient(student)) {
      at::Tensor grad;
      std::tie(total, stats, grad) = call_kd_fwd_grad(student, teacher, target, alpha, distance,
                                                      temperature, ignore_index, coefficient);
      ctx->saved_data["grad"] = grad;
    } else {
      at::Tensor rows;
      std::tie(rows, stats) =
          call_kd_fwd(student, teacher, target, alpha, distance, temperature, ignore_index);
      total = weighted_total(rows, coefficient);
    }
    ctx->save_for_backward({student, teacher, target.value_or(at::Tensor()), stats, coefficient});
    ctx->saved_data["alpha"] = alpha;
    ctx->saved_data["distance"] = std::string(distance);
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["ignore_index"] = ignore_index;
    return total;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const at::Tensor& g = grad_outputs[0];
    at::Tensor grad;
    if (ctx->saved_data.count("grad")) {
      grad = take_scaled(ctx, "grad", g);
    } else {  // not fused, or a second backward (retain_graph=True): from the saved statistics
      const variable_list saved = ctx->get_saved_variables();
      const at::Tensor& s = saved[0];
      const OptTensor target = saved[2].defined() ? OptTensor(saved[2]) : OptTensor();
      grad = call_kd_bwd(at::mul(saved[4], g).expand({s.size(0)}).contiguous(), s, saved[1],
                         target, saved[3], ctx->saved_data["alpha"].toDouble(),
                         ctx->saved_data["distance"].toStringRef(),
                         ctx->saved_data["temperature"].toDouble(),
                         ctx->saved_data["ignore_index"].toInt());
    }
    variable_list grads(8);  // the student's; none for the teacher, target, coefficient
    grads[0] = grad;
    return grads;
  }
};

at::Tensor kd_loss_total_autograd(const at::Tensor& student, const at::Tensor& teacher,
                                  const OptTensor& target, double alpha,
                                  std::string_view distance, double temperature,
                                  int64_t ignore_index, const at::Tensor& coefficient) {
  if (!(at::GradMode::is_enabled() && (student.requires_grad() || teacher.requires_grad()))) {
    at::AutoDispatchBelowADInplaceOrView below;
    return call_kd_total(student, teacher, target, alpha, distance, temperature, ignore_index,
                         coefficient);
  }
  return KdLossTotal::apply(student, teacher, target, alpha, distance, temperature, ignore_index,
                            coefficient);
}

// With no gradient to compute, the plain kernel: nothing is written beside the sums.
at::Tensor mapping_distance_total_autograd(at::TensorList students, at::TensorList teachers,
                                           const at::Tensor& coefficients) {
  const auto requires_grad = [](const at::Tensor& t) { return t.requires_grad(); };
  const bool needs_grad = at::GradMode::is_enabled() &&
                          (std::any_of(students.begin(), students.end(), requires_grad) ||
                           std::any_of(teachers.begin(), teachers.end(), requires_grad) ||
                           coefficients.requires_grad());
  if (!needs_grad) {
    at::AutoDispatchBelowADInplaceOrView below;
    return call_total(students, teachers, coefficients);
  }
  return MappingDistanceTotal::apply(students, teachers, coefficients);
}

}  // namespace
}  // namespace mapopt

TORCH_LIBRARY_IMPL(mapopt_native, Autograd, m) {
  m.impl("mapping_distance_fwd", &mapopt::mapping_distance_autograd);
  m.impl("mapping_distance_total", &mapopt::mapping_distance_total_autograd);
  m.impl("kd_loss_total", &mapopt::kd_loss_total_autograd);
}
