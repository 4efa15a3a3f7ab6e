// The autograd kernel of mapping_distance_fwd, in C++ (one registration for every device).
//
// Why not torch.library.register_autograd like the other ops: mapping_distance is meant for many
// small feature pairs, where its two kernels take tens of microseconds and the Python side of a
// registered autograd formula took about 250 us a step (bench_distill.py, pooled pairs). Here the
// forward and backward stay in C++; the formula is MATH.md §3: ∂D_j/∂s_j = 2 (s_j - t_j) / B_j,
// written by mapping_distance_bwd. Teachers get no gradient.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

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

}  // namespace
}  // namespace mapopt

TORCH_LIBRARY_IMPL(mapopt_native, Autograd, m) {
  m.impl("mapping_distance_fwd", &mapopt::mapping_distance_autograd);
}
