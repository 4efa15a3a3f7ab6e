// CPU pass of the Hessian-norm ops (vectorised along the units, at::parallel_for over row and
// column blocks) and their registration; the ops are written once in csrc/hessian_norm.h.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ceil_div.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "../common/activations.h"
#include "../hessian_norm.h"
#include "float32_copies.h"
#include "vec_math.h"

namespace mapopt::cpu {
namespace {

// Columns per task: the block's running sums (8 KiB in float) stay in L1 while its rows stream by.
constexpr int64_t kColumnBlock = 2048;

int64_t column_blocks(int64_t M) {
  return std::max<int64_t>(1, at::ceil_div<int64_t>(M, kColumnBlock));
}

bool run_parallel(int64_t B, int64_t M) {
  return B * M > kPointwiseGrain && at::get_num_threads() > 1;
}

template <class F>
void dispatch(const at::Tensor& t, Activation a, const F& fn) {
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "mapopt_native hessian norm", [&] {
    dispatch_activation(a, [&](auto act) { fn(act, scalar_t{}); });
  });
}

struct CpuHessianKernels {
  // Enough row blocks that every thread has a task when the columns alone give too few (a dense
  // layer's units); one when they suffice (a convolution's channels x positions).
  static int64_t row_blocks(int64_t B, int64_t M) {
    if (!run_parallel(B, M)) return 1;
    return std::clamp<int64_t>(at::ceil_div<int64_t>(at::get_num_threads(), column_blocks(M)), 1,
                               B);
  }

  static void hessian_term_partials(const at::Tensor& z, const at::Tensor& s,
                                    const at::Tensor& value, const at::Tensor& partial,
                                    const ActivationSpec& spec) {
    if (is_reduced(z)) {  // s and partial are already float32 (the accumulation dtype)
      const at::Tensor v = wide_buffer(value);
      hessian_term_partials(widened(z), s, v, partial, spec);
      return copy_back(value, v);
    }
    const int64_t B = z.size(0), M = z.size(1);
    const int64_t R = partial.size(0), col_blocks = column_blocks(M);
    dispatch(z, spec.kind, [&](auto act, auto sc) {
      using scalar_t = decltype(sc);
      using V = Vectorized<scalar_t>;
      constexpr Activation A = decltype(act)::value;
      const auto p = activation_params<scalar_t>(spec).template as<V>();
      const scalar_t* zp = z.const_data_ptr<scalar_t>();
      const scalar_t* sp = s.const_data_ptr<scalar_t>();
      scalar_t* vp = value.defined() ? value.data_ptr<scalar_t>() : nullptr;
      scalar_t* pp = partial.data_ptr<scalar_t>();
      auto pass = [&](auto with_value) {
        auto tasks = [&](int64_t begin, int64_t end) {
          for (int64_t t = begin; t < end; ++t) {
            const int64_t r = t / col_blocks, c0 = (t % col_blocks) * kColumnBlock;
            const int64_t c1 = std::min(M, c0 + kColumnBlock);
            scalar_t* acc = pp + r * M;
            for (int64_t b = B * r / R; b < B * (r + 1) / R; ++b) {
              const scalar_t* zb = zp + b * M;
              for (int64_t j = c0; j < c1; j += V::size()) {
                const int64_t n = std::min<int64_t>(V::size(), c1 - j);
                const V zv = load(zb + j, n);
                store(load(acc + j, n) + hessian_term<A, V, VecMath>(zv, load(sp + j, n), p),
                      acc + j, n);
                if constexpr (decltype(with_value)::value) {
                  store(ActivationFn<A>::template value<V, VecMath>(zv, p), vp + b * M + j, n);
                }
              }
            }
          }
        };
        const int64_t n_tasks = R * col_blocks;
        if (run_parallel(B, M)) {
          at::parallel_for(0, n_tasks, 1, tasks);
        } else {
          tasks(0, n_tasks);
        }
      };
      if (vp) {
        pass(std::true_type{});
      } else {
        pass(std::false_type{});
      }
    });
  }

  static void activation_bwd(const at::Tensor& grad, const at::Tensor& z, const at::Tensor& grad_z,
                             const ActivationSpec& spec) {
    if (is_reduced(z)) {
      const at::Tensor g = wide_buffer(grad_z);
      activation_bwd(widened(grad), widened(z), g, spec);
      return copy_back(grad_z, g);
    }
    dispatch(z, spec.kind, [&](auto act, auto sc) {
      using scalar_t = decltype(sc);
      using V = Vectorized<scalar_t>;
      constexpr Activation A = decltype(act)::value;
      const auto p = activation_params<scalar_t>(spec).template as<V>();
      const scalar_t* gp = grad.const_data_ptr<scalar_t>();
      const scalar_t* zp = z.const_data_ptr<scalar_t>();
      scalar_t* op = grad_z.data_ptr<scalar_t>();
      at::parallel_for(0, z.numel(), kPointwiseGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; i += V::size()) {
          const int64_t n = std::min<int64_t>(V::size(), end - i);
          const V d = ActivationFn<A>::template derivative<V, VecMath>(load(zp + i, n), p);
          store(load(gp + i, n) * d, op + i, n);
        }
      });
    });
  }
};

}  // namespace
}  // namespace mapopt::cpu

TORCH_LIBRARY_IMPL(mapopt_native, CPU, m) {
  mapopt::register_hessian_norm_ops<mapopt::cpu::CpuHessianKernels>(m);
}
