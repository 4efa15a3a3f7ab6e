// CPU kernels of the distillation ops (MATH.md §3) and their registration: kd_loss rows in
// parallel (the forward reads each row once, the backward once more; the fused forward writes the
// gradient row right after its totals, while the row is in cache); mapping_distance over a table
// of fixed-size chunks of every pair, in one parallel pass.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <numeric>
#include <vector>

#include "../common/distill.h"
#include "../distill.h"
#include "float32_copies.h"
#include "vec_math.h"

namespace mapopt::cpu {
namespace {

// VecMath plus the online softmax's max; exp_u20 is ATen's softmax exp (a few ulp).
struct DistillVecMath : VecMath {
  template <class V>
  static V exp(const V& x) { return x.exp_u20(); }
  template <class V>
  static V max(const V& a, const V& b) { return at::vec::maximum(a, b); }
};

// Vectors per online group: one rescale of the running sums per G vectors.
constexpr int kGroup = 4;
// Elements per parallel task (rows are split no further).
constexpr int64_t kRowGrain = 32768;

// The lanes of a vector state folded into one scalar state: every lane is rebased to the
// largest max of all lanes (vector exps), then the sums add up.
template <class acc_t, class V>
KdRowState<acc_t, DistillScalarMath> fold_lanes(KdRowState<V, DistillVecMath> v) {
  constexpr int W = V::size();
  const auto lanes = [](const V& x, acc_t* out) { x.store(out); };
  const auto max_of = [&](const V& x) {
    acc_t l[W];
    lanes(x, l);
    return *std::max_element(l, l + W);
  };
  const auto sum_of = [&](const V& x) {
    acc_t l[W];
    lanes(x, l);
    return std::accumulate(l, l + W, acc_t(0));
  };
  const acc_t ms = max_of(v.s.m), mq = max_of(v.q.m), mp = max_of(v.p.m);
  v.rebase(V(ms), V(mq), V(mp));
  KdRowState<acc_t, DistillScalarMath> out;
  out.s.m = ms, out.s.z = sum_of(v.s.z);
  out.q.m = mq, out.q.z = sum_of(v.q.z);
  out.p.m = mp, out.p.z = sum_of(v.p.z);
  out.cross = sum_of(v.cross);
  out.sq = sum_of(v.sq);
  return out;
}

// Every target is a class index or ignore_index: checked up front, as an out-of-range index
// would read outside the row.
void check_targets(const at::Tensor& y, int64_t C, int64_t ignore_index) {
  const int64_t* yp = y.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < y.numel(); ++b) {
    TORCH_CHECK_VALUE(yp[b] == ignore_index || (yp[b] >= 0 && yp[b] < C), "target[", b, "] = ",
                      yp[b], " is not a class index in [0, ", C, ") nor ignore_index (",
                      ignore_index, ")");
  }
}

// One row of the gradient, scale · ∂L_b/∂s_b, from the row's totals r.
template <class scalar_t, class acc_t>
void kd_row_grad(const scalar_t* sb, const scalar_t* tb, int64_t C, int64_t yb,
                 const KdRowTotals<acc_t>& r, const KdParams<acc_t>& k, acc_t scale,
                 scalar_t* gb) {
  using V = Vectorized<scalar_t>;
  using SM = DistillScalarMath;
  constexpr int64_t W = V::size();
  const int64_t body = C - C % W;
  const V vscale(scale);
  for (int64_t j = 0; j < body; j += W) {
    (vscale * kd_grad<V, DistillVecMath>(V::loadu(sb + j), V::loadu(tb + j), r, k)).store(gb + j);
  }
  for (int64_t j = body; j < C; ++j) {
    gb[j] = scale * kd_grad<acc_t, SM>(static_cast<acc_t>(sb[j]), static_cast<acc_t>(tb[j]), r, k);
  }
  if (k.ce) {  // the one-hot term of the CE gradient
    gb[yb] = scale * (kd_grad<acc_t, SM>(static_cast<acc_t>(sb[yb]), static_cast<acc_t>(tb[yb]),
                                         r, k) - k.ce_weight);
  }
}

// Row losses and statistics; with `grad` defined also the gradient, every row scaled by
// `coefficient` (a 0-dim tensor), written right after the row's totals.
template <class scalar_t>
void kd_rows_fwd(const at::Tensor& s, const at::Tensor& t, const at::Tensor& y, Distance d,
                 double alpha, double temperature, int64_t ignore_index, const at::Tensor& loss,
                 const at::Tensor& stats, const at::Tensor& coefficient, const at::Tensor& grad) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vectorized<scalar_t>;
  using VM = DistillVecMath;
  using SM = DistillScalarMath;
  constexpr int64_t W = V::size();
  const int64_t N = s.size(0), C = s.size(1);
  const int64_t body = C - C % W;  // the vectorised part of a row; the rest is scalar
  const auto k = KdParams<acc_t>::make(d, y.defined(), alpha, temperature);
  const acc_t lowest = std::numeric_limits<acc_t>::lowest();
  const scalar_t* sp = s.const_data_ptr<scalar_t>();
  const scalar_t* tp = t.const_data_ptr<scalar_t>();
  const int64_t* yp = y.defined() ? y.const_data_ptr<int64_t>() : nullptr;
  acc_t* lp = loss.data_ptr<acc_t>();
  acc_t* stp = stats.data_ptr<acc_t>();
  scalar_t* gp = grad.defined() ? grad.data_ptr<scalar_t>() : nullptr;
  const acc_t coef = grad.defined() ? coefficient.item<acc_t>() : acc_t(0);

  at::parallel_for(0, N, std::max<int64_t>(1, kRowGrain / C), [&](int64_t r0, int64_t r1) {
    for (int64_t b = r0; b < r1; ++b) {
      const scalar_t* sb = sp + b * C;
      const scalar_t* tb = tp + b * C;
      acc_t* stb = stp + b * kKdRowStats;
      if (yp && yp[b] == ignore_index) {  // MATH.md §3: no loss, no gradient, not counted
        lp[b] = acc_t(0);
        std::fill_n(stb, kKdRowStats, acc_t(0));
        if (gp) std::fill_n(gp + b * C, C, scalar_t(0));
        continue;
      }
      KdRowState<V, VM> vs;
      vs.reset(V(lowest));
      for (int64_t j = 0; j < body; j += kGroup * W) {
        V xs[kGroup], xt[kGroup];
        const int n = static_cast<int>(std::min<int64_t>(kGroup, (body - j) / W));
        for (int i = 0; i < n; ++i) {
          xs[i] = V::loadu(sb + j + i * W);
          xt[i] = V::loadu(tb + j + i * W);
        }
        vs.template add_group<kGroup>(xs, xt, n, k);
      }
      KdRowState<acc_t, SM> st;
      st.reset(lowest);
      if (body > 0) st = fold_lanes<acc_t>(vs);
      for (int64_t j = body; j < C; ++j) {
        const acc_t a = sb[j], c = tb[j];
        st.template add_group<1>(&a, &c, 1, k);
      }
      const KdRowTotals<acc_t> r = kd_finish(st, k);
      lp[b] = r.loss - (k.ce ? k.ce_weight * static_cast<acc_t>(sb[yp[b]]) : acc_t(0));
      stb[0] = r.lse_s, stb[1] = r.lse_q, stb[2] = r.lse_p;
      if (gp) kd_row_grad(sb, tb, C, yp ? yp[b] : -1, r, k, coef, gp + b * C);
    }
  });
}

template <class scalar_t>
void kd_rows_bwd(const at::Tensor& grad_loss, const at::Tensor& s, const at::Tensor& t,
                 const at::Tensor& y, const at::Tensor& stats, Distance d, double alpha,
                 double temperature, int64_t ignore_index, const at::Tensor& grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = s.size(0), C = s.size(1);
  const auto k = KdParams<acc_t>::make(d, y.defined(), alpha, temperature);
  const acc_t* gl = grad_loss.const_data_ptr<acc_t>();
  const scalar_t* sp = s.const_data_ptr<scalar_t>();
  const scalar_t* tp = t.const_data_ptr<scalar_t>();
  const int64_t* yp = y.defined() ? y.const_data_ptr<int64_t>() : nullptr;
  const acc_t* stp = stats.const_data_ptr<acc_t>();
  scalar_t* gp = grad.data_ptr<scalar_t>();

  at::parallel_for(0, N, std::max<int64_t>(1, kRowGrain / C), [&](int64_t r0, int64_t r1) {
    for (int64_t b = r0; b < r1; ++b) {
      const scalar_t* sb = sp + b * C;
      const scalar_t* tb = tp + b * C;
      scalar_t* gb = gp + b * C;
      if (yp && yp[b] == ignore_index) {
        std::fill_n(gb, C, scalar_t(0));
        continue;
      }
      const acc_t* stb = stp + b * kKdRowStats;
      const KdRowTotals<acc_t> r{stb[0], stb[1], stb[2], acc_t(0)};
      kd_row_grad(sb, tb, C, yp ? yp[b] : -1, r, k, gl[b], gb);
    }
  });
}

// Elements per chunk of a mapping_distance pair: a parallel task, small enough that several
// pairs' chunks balance across threads, large enough to amortise the task.
constexpr int64_t kChunk = 16384;

struct Chunk {
  int64_t pair, begin, end;
};

std::vector<Chunk> chunk_table(const std::vector<at::Tensor>& students) {
  std::vector<Chunk> chunks;
  for (int64_t j = 0; j < static_cast<int64_t>(students.size()); ++j) {
    const int64_t n = students[j].numel();
    for (int64_t e = 0; e < n; e += kChunk) chunks.push_back({j, e, std::min(n, e + kChunk)});
  }
  return chunks;
}

// 1/B_j, and 0 for an empty batch (the pair then contributes nothing).
inline double inv_batch(const at::Tensor& s) { return s.size(0) > 0 ? 1.0 / s.size(0) : 0.0; }

// fn(students, teachers, grads) on float32 copies of 16-bit pairs, the gradients cast back.
template <class F>
void on_float32_copies(const std::vector<at::Tensor>& students,
                       const std::vector<at::Tensor>& teachers,
                       const std::vector<at::Tensor>& grads, const F& fn) {
  std::vector<at::Tensor> wide_grads;
  for (const at::Tensor& grad : grads) wide_grads.push_back(wide_buffer(grad));
  fn(widened(students), widened(teachers), wide_grads);
  for (size_t j = 0; j < grads.size(); ++j) copy_back(grads[j], wide_grads[j]);
}

struct CpuDistillKernels {
  static void kd_loss_fwd_rows(const at::Tensor& s, const at::Tensor& t, const at::Tensor& y,
                               Distance d, double alpha, double temperature,
                               int64_t ignore_index, const at::Tensor& loss,
                               const at::Tensor& stats) {
    kd_loss_fwd_grad_rows(s, t, y, d, alpha, temperature, ignore_index, at::Tensor(), loss, stats,
                          at::Tensor());
  }

  static void kd_loss_fwd_grad_rows(const at::Tensor& s, const at::Tensor& t, const at::Tensor& y,
                                    Distance d, double alpha, double temperature,
                                    int64_t ignore_index, const at::Tensor& coefficient,
                                    const at::Tensor& loss, const at::Tensor& stats,
                                    const at::Tensor& grad) {
    if (is_reduced(s)) {
      const at::Tensor g = wide_buffer(grad);
      kd_loss_fwd_grad_rows(widened(s), widened(t), y, d, alpha, temperature, ignore_index,
                            coefficient, loss, stats, g);
      return copy_back(grad, g);
    }
    if (y.defined()) check_targets(y, s.size(1), ignore_index);
    AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "mapopt_native kd_loss_fwd", [&] {
      kd_rows_fwd<scalar_t>(s, t, y, d, alpha, temperature, ignore_index, loss, stats,
                            coefficient, grad);
    });
  }

  static void kd_loss_bwd_rows(const at::Tensor& grad_loss, const at::Tensor& s,
                               const at::Tensor& t, const at::Tensor& y, const at::Tensor& stats,
                               Distance d, double alpha, double temperature,
                               int64_t ignore_index, const at::Tensor& grad) {
    if (is_reduced(s)) {
      const at::Tensor g = wide_buffer(grad);
      kd_loss_bwd_rows(grad_loss, widened(s), widened(t), y, stats, d, alpha, temperature,
                       ignore_index, g);
      return copy_back(grad, g);
    }
    if (y.defined()) check_targets(y, s.size(1), ignore_index);
    AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "mapopt_native kd_loss_bwd", [&] {
      kd_rows_bwd<scalar_t>(grad_loss, s, t, y, stats, d, alpha, temperature, ignore_index, grad);
    });
  }

  static void mapping_distance_fwd(const std::vector<at::Tensor>& students,
                                   const std::vector<at::Tensor>& teachers, const at::Tensor& out) {
    mapping_distance_fwd_grad(students, teachers, at::Tensor(), out, {});
  }

  // D_j into out and, when coefficients is defined, grads[j] = c_j ∂D_j/∂s_j in the same pass.
  static void mapping_distance_fwd_grad(const std::vector<at::Tensor>& students,
                                        const std::vector<at::Tensor>& teachers,
                                        const at::Tensor& coefficients, const at::Tensor& out,
                                        const std::vector<at::Tensor>& grads) {
    if (is_reduced(students[0])) {
      return on_float32_copies(students, teachers, grads, [&](const auto& s, const auto& t,
                                                              const auto& g) {
        mapping_distance_fwd_grad(s, t, coefficients, out, g);
      });
    }
    const std::vector<Chunk> chunks = chunk_table(students);
    const bool with_grad = coefficients.defined();
    AT_DISPATCH_FLOATING_TYPES(students[0].scalar_type(), "mapopt_native mapping_distance", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      using V = Vectorized<scalar_t>;
      constexpr int64_t W = V::size();
      std::vector<acc_t> partial(chunks.size());
      const acc_t* cp = with_grad ? coefficients.const_data_ptr<acc_t>() : nullptr;
      at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          const Chunk& ch = chunks[c];
          const scalar_t* sp = students[ch.pair].const_data_ptr<scalar_t>();
          const scalar_t* tp = teachers[ch.pair].const_data_ptr<scalar_t>();
          V acc(0);
          if (with_grad) {  // ∂D_j/∂s = 2 (s - t) / B_j (MATH.md §3), times c_j
            scalar_t* gp = grads[ch.pair].data_ptr<scalar_t>();
            const V scale(static_cast<scalar_t>(2 * inv_batch(students[ch.pair]) * cp[ch.pair]));
            for (int64_t e = ch.begin; e < ch.end; e += W) {
              const int64_t n = std::min(W, ch.end - e);
              const V diff = load(sp + e, n) - load(tp + e, n);
              acc = at::vec::fmadd(diff, diff, acc);
              store(scale * diff, gp + e, n);
            }
          } else {
            for (int64_t e = ch.begin; e < ch.end; e += W) {
              const int64_t n = std::min(W, ch.end - e);
              const V diff = load(sp + e, n) - load(tp + e, n);
              acc = at::vec::fmadd(diff, diff, acc);
            }
          }
          scalar_t lane_sums[W];
          acc.store(lane_sums);
          partial[c] = std::accumulate(lane_sums, lane_sums + W, acc_t(0));
        }
      });
      // Per pair, in chunk order: the same sum whatever the thread count.
      std::vector<acc_t> sums(students.size(), acc_t(0));
      for (size_t c = 0; c < chunks.size(); ++c) sums[chunks[c].pair] += partial[c];
      acc_t* op = out.data_ptr<acc_t>();
      for (size_t j = 0; j < students.size(); ++j) {
        op[j] = sums[j] * static_cast<acc_t>(inv_batch(students[j]));
      }
    });
  }

  static void mapping_distance_bwd(const at::Tensor& grad_distances,
                                   const std::vector<at::Tensor>& students,
                                   const std::vector<at::Tensor>& teachers,
                                   const std::vector<at::Tensor>& grads) {
    if (is_reduced(students[0])) {
      return on_float32_copies(students, teachers, grads, [&](const auto& s, const auto& t,
                                                              const auto& g) {
        mapping_distance_bwd(grad_distances, s, t, g);
      });
    }
    const std::vector<Chunk> chunks = chunk_table(students);
    AT_DISPATCH_FLOATING_TYPES(students[0].scalar_type(), "mapopt_native mapping_distance", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      using V = Vectorized<scalar_t>;
      constexpr int64_t W = V::size();
      const acc_t* gd = grad_distances.const_data_ptr<acc_t>();
      at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          const Chunk& ch = chunks[c];
          const scalar_t* sp = students[ch.pair].const_data_ptr<scalar_t>();
          const scalar_t* tp = teachers[ch.pair].const_data_ptr<scalar_t>();
          scalar_t* gp = grads[ch.pair].data_ptr<scalar_t>();
          // ∂D_j/∂s = 2 (s - t) / B_j (MATH.md §3), times the incoming gradient of D_j.
          const V scale(static_cast<scalar_t>(2 * inv_batch(students[ch.pair]) * gd[ch.pair]));
          for (int64_t e = ch.begin; e < ch.end; e += W) {
            const int64_t n = std::min(W, ch.end - e);
            store(scale * (load(sp + e, n) - load(tp + e, n)), gp + e, n);
          }
        }
      });
    });
  }
};

}  // namespace
}  // namespace mapopt::cpu

TORCH_LIBRARY_IMPL(mapopt_native, CPU, m) {
  using K = mapopt::cpu::CpuDistillKernels;
  mapopt::register_distill_ops<K>(m);
  m.impl("kd_loss_fwd_grad", &mapopt::kd_loss_fwd_grad<K>);
  m.impl("mapping_distance_fwd_grad", &mapopt::mapping_distance_fwd_grad<K>);
}
