// The autograd kernels of mapping_distance_fwd, mapping_distance_total and kd_loss_total, in C++
// (one registration for every device).
//
// Why not torch.library.register_autograd like the other ops: mapping_distance is meant for many
// small feature pairs, where its kernels take tens of microseconds and the Python side of a
// registered autograd formula took about 250 us a step (bench_distill.py, pooled pairs). The
// formula is MATH.md §3: ∂D_j/∂s_j = 2 (s_j - t_j) / B_j. Teachers get no gradient.
//
// mapping_distance_total (Σ_j c_j D_j, the weighted sum / mean) computes c_j ∂D_j/∂s_j in its
// forward pass when a gradient will be needed: on large feature maps the op is memory-bound, and
// reading s and t once (writing the gradient beside the sums) moves 3 tensor-sizes of bytes where
// a forward then a backward pass moves 5. kd_loss_total does the same for the reduced KD loss. The backward hands those buffers over, scaled in place
// by the incoming gradient unless that is exactly 1 (known without a device sync on the CPU only).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

namespace mapopt {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_fwd(at::TensorList students, at::TensorList teachers) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mapopt_native::mapping_distance_fwd", "")
                             .typed<at::Tensor(at::TensorList, at::TensorList)>();
  return op.call(students, teachers);
}

std::vector<at::Tensor> call_bwd(const at::Tensor& grad, at::TensorList students,
                                 at::TensorList teachers) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mapopt_native::mapping_distance_bwd", "")
          .typed<std::vector<at::Tensor>(const at::Tensor&, at::TensorList, at::TensorList)>();
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
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mapopt_native::mapping_distance_fwd_grad", "")
          .typed<std::tuple<at::Tensor, std::vector<at::Tensor>>(at::TensorList, at::TensorList,
                                                                 const at::Tensor&)>();
  return op.call(students, teachers, coefficients);
}

at::Tensor call_total(at::TensorList students, at::TensorList teachers,
                      const at::Tensor& coefficients) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mapopt_native::mapping_distance_total", "")
          .typed<at::Tensor(at::TensorList, at::TensorList, const at::Tensor&)>();
  return op.call(students, teachers, coefficients);
}

// The incoming gradient is exactly 1 (loss.backward() on this term, or on a plain sum of terms):
// read only where that costs no device sync and the tensor holds data (not a fake one traced by
// torch.compile).
bool is_exactly_one(const at::Tensor& g) {
  return g.device().is_cpu() && !g.key_set().has(c10::DispatchKey::Python) &&
         g.item<double>() == 1.0;
}

class MappingDistanceTotal : public torch::autograd::Function<MappingDistanceTotal> {
 public:
  static at::Tensor forward(AutogradContext* ctx, at::TensorList students,
                            at::TensorList teachers, const at::Tensor& coefficients) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [distances, grads] = call_fwd_grad(students, teachers, coefficients);
    std::vector<at::Tensor> saved(students.begin(), students.end());
    saved.insert(saved.end(), teachers.begin(), teachers.end());
    saved.push_back(coefficients);
    ctx->save_for_backward(saved);
    ctx->saved_data["grads"] = c10::List<at::Tensor>(grads);
    return at::dot(distances, coefficients);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const size_t pairs = (saved.size() - 1) / 2;
    const at::Tensor& g = grad_outputs[0];
    variable_list grads;
    auto kept = ctx->saved_data.find("grads");
    if (kept != ctx->saved_data.end()) {
      // Handed over, not copied: holding no reference lets autograd take them as .grad as is.
      for (const at::Tensor& t : kept->second.toTensorList()) grads.push_back(t);
      ctx->saved_data.erase(kept);
      if (!is_exactly_one(g)) {
        for (at::Tensor& t : grads) t.mul_(g.to(t.scalar_type()));
      }
    } else {  // a second backward (retain_graph=True): from the saved pairs
      const at::TensorList students(saved.data(), pairs);
      const at::TensorList teachers(saved.data() + pairs, pairs);
      grads = call_bwd(at::mul(saved.back(), g).contiguous(), students, teachers);
    }
    grads.resize(2 * pairs + 1);  // none for the teachers and the coefficients
    return grads;
  }
};

using OptTensor = std::optional<at::Tensor>;

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_kd_fwd_grad(
    const at::Tensor& student, const at::Tensor& teacher, const OptTensor& target, double alpha,
    std::string_view distance, double temperature, int64_t ignore_index,
    const at::Tensor& coefficient) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mapopt_native::kd_loss_fwd_grad", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const OptTensor&, double, std::string_view,
              double, int64_t, const at::Tensor&)>();
  return op.call(student, teacher, target, alpha, distance, temperature, ignore_index,
                 coefficient);
}

at::Tensor call_kd_total(const at::Tensor& student, const at::Tensor& teacher,
                         const OptTensor& target, double alpha, std::string_view distance,
                         double temperature, int64_t ignore_index, const at::Tensor& coefficient) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mapopt_native::kd_loss_total", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, double,
                            std::string_view, double, int64_t, const at::Tensor&)>();
  return op.call(student, teacher, target, alpha, distance, temperature, ignore_index,
                 coefficient);
}

at::Tensor call_kd_bwd(const at::Tensor& grad_loss, const at::Tensor& student,
                       const at::Tensor& teacher, const OptTensor& target,
                       const at::Tensor& row_stats, double alpha, std::string_view distance,
                       double temperature, int64_t ignore_index) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mapopt_native::kd_loss_bwd", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const OptTensor&, const at::Tensor&, double, std::string_view, double,
                            int64_t)>();
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
    auto [total, stats, grad] = call_kd_fwd_grad(student, teacher, target, alpha, distance,
                                                 temperature, ignore_index, coefficient);
    ctx->save_for_backward({student, teacher, target.value_or(at::Tensor()), stats, coefficient});
    ctx->saved_data["grad"] = grad;
    ctx->saved_data["alpha"] = alpha;
    ctx->saved_data["distance"] = std::string(distance);
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["ignore_index"] = ignore_index;
    return total;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const at::Tensor& g = grad_outputs[0];
    at::Tensor grad;
    auto kept = ctx->saved_data.find("grad");
    if (kept != ctx->saved_data.end()) {  // handed over, as in MappingDistanceTotal
      grad = kept->second.toTensor();
      ctx->saved_data.erase(kept);
      if (!is_exactly_one(g)) grad.mul_(g.to(grad.scalar_type()));
    } else {  // a second backward (retain_graph=True): from the saved inputs and statistics
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
  if (!(at::GradMode::is_enabled() && student.requires_grad())) {
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
  const bool needs_grad =
      at::GradMode::is_enabled() &&
      std::any_of(students.begin(), students.end(), [](const at::Tensor& s) {
        return s.requires_grad();
      });
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
