// The autograd kernels of mapping_distance_fwd and mapping_distance_total, in C++ (one
// registration for every device).
//
// Why not torch.library.register_autograd like the other ops: mapping_distance is meant for many
// small feature pairs, where its kernels take tens of microseconds and the Python side of a
// registered autograd formula took about 250 us a step (bench_distill.py, pooled pairs). The
// formula is MATH.md §3: ∂D_j/∂s_j = 2 (s_j - t_j) / B_j. Teachers get no gradient.
//
// mapping_distance_total (Σ_j c_j D_j, the weighted sum / mean) computes c_j ∂D_j/∂s_j in its
// forward pass when a gradient will be needed: on large feature maps the op is memory-bound, and
// reading s and t once (writing the gradient beside the sums) moves 3 tensor-sizes of bytes where
// a forward then a backward pass moves 5. The backward hands those buffers over, scaled in place
// by the incoming gradient unless that is exactly 1 (known without a device sync on the CPU only).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
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
}
