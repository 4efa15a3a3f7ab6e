// Whole-sequence gated GRU / LSTM layers (one layer, one direction per call), written once for
// every device on top of the cells' pointwise kernels K (csrc/gated_cells.h).
//
// Layout: `input` is either padded, (T, B, I) time-major, with batch_sizes undefined, or packed,
// (N, I) rows with batch_sizes (T,) on the CPU, non-increasing (PackedSequence's layout: the rows
// of step t are the first batch_sizes[t] sequences). Padded input is the packed case with every
// batch size B. Packed sequences run on the packed rows: the batch shrinks step by step.
//
// Forward: the input projection of every step as matrix products over blocks of steps (one on
// CUDA), then per step the recurrent product and the fused pointwise kernel, looped here; a
// backend with lstm_input_step_fwd (the CPU) makes an LSTM inference step's projection in the
// pass of its recurrent product instead. Backward: in reverse, per step
// the fused pointwise backward and the recurrent product; the weight gradients after the loop as
// a few large products over all steps.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>

#include <algorithm>
#include <array>
#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "gated_cells.h"
#include "recycled_buffer.h"

namespace mapopt {

namespace seq {

// The step structure of a (possibly packed) sequence.
struct Steps {
  std::vector<int64_t> sizes;    // batch size of each step
  std::vector<int64_t> offsets;  // first row of each step
  int64_t batch = 0;             // sequences (batch size of the first step)
  int64_t rows = 0;              // N = sum of sizes

  int64_t T() const { return static_cast<int64_t>(sizes.size()); }
  // Batch size of the step after t in processing order (0 past the end).
  int64_t next_size(int64_t t, bool reverse) const {
    const int64_t n = reverse ? t - 1 : t + 1;
    return (n < 0 || n >= T()) ? 0 : sizes[n];
  }
};

// What a layer call holds while it runs: the input's device, and dispatch below autograd for the
// ATen ops it makes itself (a few step views a step): the call's own tensors need no autograd view
// tracking, which made most of a step's fixed cost on the CPU.
struct CallGuards {
  explicit CallGuards(const at::Tensor& input) : device(input.device()) {}
  c10::OptionalDeviceGuard device;
  at::AutoDispatchBelowADInplaceOrView below_autograd;
};

inline Steps make_steps(const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes) {
  Steps s;
  if (!batch_sizes) {
    TORCH_CHECK_VALUE(input.dim() == 3, "input must be 3-D (seq_len, batch, input_size) when ",
                      "batch_sizes is not given, got shape ", input.sizes());
    s.sizes.assign(input.size(0), input.size(1));
    s.batch = input.size(1);
  } else {
    TORCH_CHECK_VALUE(input.dim() == 2, "packed input must be 2-D (rows, input_size), got shape ",
                      input.sizes());
    const at::Tensor& bs = *batch_sizes;
    TORCH_CHECK_VALUE(bs.dim() == 1 && bs.device().is_cpu() && bs.scalar_type() == at::kLong,
                      "batch_sizes must be a 1-D int64 CPU tensor (as in PackedSequence), got ",
                      bs.scalar_type(), " of shape ", bs.sizes(), " on ", bs.device());
    const at::Tensor c = bs.contiguous();
    const int64_t* p = c.const_data_ptr<int64_t>();
    s.sizes.assign(p, p + c.numel());
    for (int64_t t = 0; t < s.T(); ++t) {
      TORCH_CHECK_VALUE(s.sizes[t] > 0 && (t == 0 || s.sizes[t] <= s.sizes[t - 1]),
                        "batch_sizes must be positive and non-increasing, got ",
                        c10::IntArrayRef(s.sizes));
    }
    s.batch = s.T() ? s.sizes[0] : 0;
  }
  TORCH_CHECK_VALUE(s.T() > 0, "input must have at least one time step, got shape ",
                    input.sizes());
  s.offsets.resize(s.T());
  for (int64_t t = 0; t < s.T(); ++t) {
    s.offsets[t] = s.rows;
    s.rows += s.sizes[t];
  }
  if (batch_sizes) {
    TORCH_CHECK_VALUE(s.rows == input.size(0), "batch_sizes sum to ", s.rows,
                      " rows but the packed input has ", input.size(0));
  }
  return s;
}

inline at::Tensor rows(const at::Tensor& t, int64_t first, int64_t count) {
  return t.narrow(0, first, count);
}

// The state a step starts from, while running the forward loop: `last` holds the previous
// step's states (batch size `last_n`) or is undefined at the first step.
inline at::Tensor start_state(const at::Tensor& last, int64_t last_n, const at::Tensor& initial,
                              int64_t n) {
  if (!last.defined()) return rows(initial, 0, n);
  if (last_n >= n) return rows(last, 0, n);
  // Reverse direction, batch grows: continuing rows, then the new sequences' initial states.
  return at::cat({last, rows(initial, last_n, n - last_n)});
}

// The state step t started from, given every step's states (N, H): going forward in time the
// first sizes[t] rows of the previous step's states, or the initial state at t = 0; in reverse the
// next step's states for the rows that continue and the initial state for the rows whose
// (reversed) sequence starts at t. A view unless the batch grows there.
inline at::Tensor step_start(const at::Tensor& states, const at::Tensor& initial, const Steps& s,
                             int64_t t, bool reverse) {
  const int64_t prev = reverse ? t + 1 : t - 1;
  if (prev < 0 || prev >= s.T()) return rows(initial, 0, s.sizes[t]);
  return start_state(rows(states, s.offsets[prev], s.sizes[prev]), s.sizes[prev], initial,
                     s.sizes[t]);
}

// a b in a new tensor (the backward's weight and input gradients).
template <class K>
at::Tensor product(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor out = empty_recycled({a.size(0), b.size(1)}, a.options());
  K::matmul_into(out, a, b, /*accumulate=*/false);
  return out;
}

// The recurrent weight's gradient dᵀ S, d (N, chunks*H) the gate gradients of the recurrent
// projection, S (N, H) the state each row's step started from. With every step of the same batch
// size S is the output shifted by one step with the initial state at the end it leaves open, so
// it is two products on views; packed sequences whose batch shrinks gather S first.
template <class K>
at::Tensor recurrent_weight_grad(const at::Tensor& d, const at::Tensor& states,
                                 const at::Tensor& initial, const Steps& s, bool reverse) {
  const int64_t B = s.batch, N = s.rows;
  const bool same_sizes =
      std::all_of(s.sizes.begin(), s.sizes.end(), [&](int64_t n) { return n == B; });
  if (!same_sizes) {
    at::Tensor prev = empty_recycled(states.sizes(), states.options());
    for (int64_t t = 0; t < s.T(); ++t) {
      rows(prev, s.offsets[t], s.sizes[t]).copy_(step_start(states, initial, s, t, reverse));
    }
    return product<K>(d.t(), prev);
  }
  // Going forward the first step starts from the initial state and step t from step t - 1; in
  // reverse the last step starts from it and step t from step t + 1.
  at::Tensor grad = product<K>(rows(d, reverse ? N - B : 0, B).t(), rows(initial, 0, B));
  if (N > B) {
    K::matmul_into(grad, rows(d, reverse ? 0 : B, N - B).t(), rows(states, reverse ? B : 0, N - B),
                   /*accumulate=*/true);
  }
  return grad;
}

// The final state of each sequence: for the forward direction the sequence's last step, for the
// reverse direction step 0 (which holds every sequence).
inline void collect_final(at::Tensor& final, const at::Tensor& step_states, int64_t n,
                          int64_t next_n, bool reverse) {
  if (reverse) {
    if (next_n == 0) final.copy_(step_states);  // step 0 comes last in reverse
  } else if (n > next_n) {
    rows(final, next_n, n - next_n).copy_(rows(step_states, next_n, n - next_n));
  }
}

// The backward's running gradient of each sequence's current state (B, H), starting from the
// final state's gradient (zero if none came): in the forward direction a sequence's final state
// is its last step, in reverse it is step 0. The loop updates it in place.
inline at::Tensor carried_grad(const std::optional<at::Tensor>& grad_final, const Steps& s,
                               int64_t H, const at::Tensor& like) {
  return grad_final ? grad_final->clone(at::MemoryFormat::Contiguous)
                    : at::zeros({s.batch, H}, like.options());
}

inline void check_workspace(const at::Tensor& workspace, const Steps& s) {
  TORCH_CHECK_VALUE(workspace.numel() > 0 || s.rows == 0,
                    "workspace is empty: the forward ran with need_workspace=False (inference), "
                    "so it kept nothing to differentiate with");
}

// The input projection x W_ihᵀ + b of every step, made a block of consecutive steps at a time,
// in processing order, into blocks of at most K::kProjectionBytes. Why: on the CPU a whole
// sequence's projection (rows x 4H) would be written to fresh memory and read back once, and first
// touching that much memory costs about as much as the pass; a block of half a MB stays in a
// core's L2 until its steps read it (and the CPU backend keeps it between calls, cpu/scratch.h).
// On CUDA the budget is unlimited: the whole sequence is one product. The CPU's LSTM inference
// makes no blocks: each step's projection is made in the pass of its recurrent product
// (lstm_input_step_fwd), with only the packed weight taken from here.
template <class K>
class Projection {
 public:
  // keep_whole: the caller holds on to the whole sequence's projection (the LSTM's training
  // workspace) when one product covers it; anything else may live in the backend's scratch.
  Projection(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
             int64_t chunks, const Steps& s, bool reverse, bool keep_whole)
      : x_(x), s_(s), reverse_(reverse), keep_whole_(keep_whole) {
    const int64_t row_bytes = w.size(0) * x.element_size();
    max_rows_ = std::max<int64_t>(1, K::kProjectionBytes / std::max<int64_t>(row_bytes, 1));
    whole_ = s.rows <= max_rows_;
    w_ = K::input_weight(w, b, chunks, std::min(max_rows_, s.rows));
  }

  // Whether one product covers the whole sequence; then block() is that product, once a step
  // has been asked for.
  bool whole() const { return whole_; }
  // W_ih and the bias as K::input_weight packed them.
  const typename K::Input& weight() const { return w_; }
  const at::Tensor& block() const { return block_; }

  // The rows of step t; steps are asked for in processing order.
  at::Tensor step(int64_t t) {
    if (!block_.defined() || t < first_ || t > last_) make_block(t);
    return rows(block_, s_.offsets[t] - s_.offsets[first_], s_.sizes[t]);
  }

 private:
  // The block that starts at step t in processing order: steps t.. forward, ..t in reverse.
  void make_block(int64_t t) {
    int64_t lo = t, hi = t, count = s_.sizes[t];
    if (whole_) {
      lo = 0, hi = s_.T() - 1, count = s_.rows;
    } else if (!reverse_) {
      while (hi + 1 < s_.T() && count + s_.sizes[hi + 1] <= max_rows_) count += s_.sizes[++hi];
    } else {
      while (lo > 0 && count + s_.sizes[lo - 1] <= max_rows_) count += s_.sizes[--lo];
    }
    first_ = lo;
    last_ = hi;
    // A block of a longer sequence lives until the next.
    block_ = K::project(w_, rows(x_, s_.offsets[lo], count), /*keep=*/whole_ && keep_whole_);
  }

  const at::Tensor& x_;
  typename K::Input w_;
  const Steps& s_;
  const bool reverse_, keep_whole_;
  int64_t max_rows_ = 0;
  bool whole_ = false;
  at::Tensor block_;
  int64_t first_ = 0, last_ = -1;
};

// The input gradient d W (d: (rows, chunks*H), W = W_ih). W is made contiguous (a copy only when
// it is not) so that weights of any strides run the same product, bit for bit.
template <class K>
at::Tensor input_grad(const at::Tensor& d, const at::Tensor& w) {
  return product<K>(d, w.contiguous());
}

inline at::Tensor as_rows(const at::Tensor& t) { return t.dim() == 3 ? t.flatten(0, 1) : t; }

inline at::Tensor shaped_like_input(const at::Tensor& rows_tensor, const at::Tensor& input) {
  if (input.dim() == 3) {
    return rows_tensor.view({input.size(0), input.size(1), rows_tensor.size(1)});
  }
  return rows_tensor;
}

}  // namespace seq

// The forward step for backends without a fused one (CUDA): the recurrent product, then the
// pointwise kernel; the input projection and the backward's recurrent product by K::linear /
// K::linear_into. A backend K derives from StepByProduct<K> to get K::Input, K::input_weight,
// K::project, K::Recurrent, K::recurrent_weight, K::RecurrentT, K::recurrent_weight_t,
// K::recurrent_product_t, K::gru_step_fwd, K::lstm_step_fwd and K::step_grads (csrc/gated_cells.h
// lists them).
template <class K>
struct StepByProduct {
  struct Weight {
    at::Tensor w;
    std::optional<at::Tensor> b;
  };
  using Input = Weight;
  using Recurrent = Weight;
  static Input input_weight(const at::Tensor& w, const std::optional<at::Tensor>& b,
                            int64_t /*chunks*/, int64_t rows) {
    return {K::pack_weight(w, rows), b};
  }
  static at::Tensor project(const Input& in, const at::Tensor& x, bool /*keep*/) {
    return K::linear(x, in.w, in.b);
  }
  static Recurrent recurrent_weight(const at::Tensor& w, const std::optional<at::Tensor>& b,
                                    int64_t chunks, int64_t batch) {
    return input_weight(w, b, chunks, batch);
  }
  using RecurrentT = at::Tensor;
  static RecurrentT recurrent_weight_t(const at::Tensor& w, int64_t batch) {
    return K::pack_weight(w.t().contiguous(), batch);
  }
  static void recurrent_product_t(const RecurrentT& rt, const at::Tensor& d, at::Tensor& out,
                                  bool accumulate) {
    K::linear_into(out, d, rt, accumulate);
  }
  static void gru_step_fwd(const Recurrent& r, const at::Tensor& gi, const at::Tensor& hx,
                           const at::Tensor& hy, const at::Tensor& ws, Gate gate) {
    K::gru_pointwise_fwd(gi, K::linear(hx, r.w, r.b), hx, hy, ws, gate);
  }
  static void lstm_step_fwd(const Recurrent& r, const at::Tensor& gi, const at::Tensor& hx,
                            const at::Tensor& cx, const at::Tensor& hy, const at::Tensor& cy,
                            const at::Tensor& ws, Gate gate) {
    K::lstm_pointwise_fwd(gi, K::linear(hx, r.w, r.b), cx, hy, cy, ws, gate);
  }
  static at::Tensor step_grads(int64_t numel, const at::TensorOptions& options) {
    return at::empty({numel}, options);
  }
};

// ------------------------------------------------------------------------------------- GRU

template <class K>
std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_gru_seq_fwd(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& batch_sizes, bool reverse, std::string_view gate,
    bool need_workspace) {
  const Gate g = parse_gate(gate);
  const seq::Steps s = seq::make_steps(input, batch_sizes);
  const at::Tensor x = seq::as_rows(input);
  const int64_t H = check_weights(3, x, w_ih, w_hh, b_ih, b_hh);
  check_state(hx, "hx", s.batch, H, input);
  const seq::CallGuards guards(input);

  seq::Projection<K> gi(x, w_ih, b_ih, 3, s, reverse, /*keep_whole=*/false);
  const typename K::Recurrent rec = K::recurrent_weight(w_hh, b_hh, 3, s.batch);
  at::Tensor out = empty_recycled({s.rows, H}, x.options());
  at::Tensor hy = at::empty({s.batch, H}, x.options());
  // Training keeps every step's workspace for the backward; inference reuses one step's.
  at::Tensor ws = empty_recycled({need_workspace ? s.rows : s.batch, 4 * H}, x.options());
  const at::Tensor h0 = hx.contiguous();
  at::Tensor last;
  int64_t last_n = 0;
  for (int64_t i = 0; i < s.T(); ++i) {
    const int64_t t = reverse ? s.T() - 1 - i : i;
    const int64_t n = s.sizes[t], off = s.offsets[t];
    const at::Tensor h = seq::start_state(last, last_n, h0, n);
    at::Tensor out_t = seq::rows(out, off, n);
    K::gru_step_fwd(rec, gi.step(t), h, out_t, seq::rows(ws, need_workspace ? off : 0, n), g);
    seq::collect_final(hy, out_t, n, s.next_size(t, reverse), reverse);
    last = out_t;
    last_n = n;
  }
  if (!need_workspace) ws = at::empty({0}, x.options());
  return {seq::shaped_like_input(out, input), hy, ws};
}

// output_mask: gradients wanted for (input, hx, parameters).
template <class K>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gated_gru_seq_bwd(const std::optional<at::Tensor>& grad_output,
                  const std::optional<at::Tensor>& grad_hy, const at::Tensor& input,
                  const at::Tensor& hx, const at::Tensor& w_ih, const at::Tensor& w_hh,
                  const at::Tensor& output, const at::Tensor& workspace,
                  const std::optional<at::Tensor>& batch_sizes, bool reverse,
                  std::string_view gate, bool has_bias, std::array<bool, 3> output_mask) {
  const Gate g = parse_gate(gate);
  const seq::Steps s = seq::make_steps(input, batch_sizes);
  const at::Tensor x = seq::as_rows(input);
  const int64_t H = check_weights(3, x, w_ih, w_hh, {}, {});
  check_state(hx, "hx", s.batch, H, input);
  seq::check_workspace(workspace, s);
  check_shape(workspace, "workspace", {s.rows, 4 * H}, "(rows, 4*hidden_size)");
  const seq::CallGuards guards(input);

  const at::Tensor out = seq::as_rows(output).contiguous();
  const at::Tensor h0 = hx.contiguous();
  const at::Tensor gout = grad_output ? seq::as_rows(*grad_output).contiguous() : at::Tensor();
  at::Tensor dh = seq::carried_grad(grad_hy, s, H, x);
  // Every step's gate gradients of both projections, d_gi and d_gh, in one buffer. They differ
  // only in their n part (d gh_r = d gi_r, d gh_z = d gi_z; MATH.md §1), but with the r and z part
  // kept once one of the two would be strided, and its weight gradient's product over all steps
  // is then ATen's, about 1.2x oneDNN's (csrc/cpu/onednn_linear.h). A step's d_gh rows are the
  // recurrent product's input in place.
  const at::Tensor grads = K::step_grads(s.rows * 6 * H, x.options());
  const at::Tensor d_gi = grads.narrow(0, 0, s.rows * 3 * H).view({s.rows, 3 * H});
  const at::Tensor d_gh = grads.narrow(0, s.rows * 3 * H, s.rows * 3 * H).view({s.rows, 3 * H});
  const typename K::RecurrentT w_hh_t = K::recurrent_weight_t(w_hh, s.batch);  // d_gh W_hh
  for (int64_t i = 0; i < s.T(); ++i) {
    const int64_t t = reverse ? i : s.T() - 1 - i;  // backward runs against the forward order
    const int64_t n = s.sizes[t], off = s.offsets[t];
    at::Tensor dh_t = seq::rows(dh, 0, n);
    if (gout.defined()) dh_t.add_(seq::rows(gout, off, n));
    const at::Tensor d_gh_t = seq::rows(d_gh, off, n);
    // In place: the kernel reads dh'[j] and writes the direct part of dh[j] at the same index.
    K::gru_pointwise_bwd(dh_t, seq::step_start(out, h0, s, t, reverse),
                         seq::rows(workspace, off, n), seq::rows(d_gi, off, n), d_gh_t, dh_t, g);
    K::recurrent_product_t(w_hh_t, d_gh_t, dh_t, /*accumulate=*/true);
  }
  auto none = [&] { return detail::not_requested(x); };
  const bool params = output_mask[2];
  at::Tensor gb_ih = params && has_bias ? d_gi.sum(0) : none();
  return {output_mask[0] ? seq::shaped_like_input(seq::input_grad<K>(d_gi, w_ih), input) : none(),
          output_mask[1] ? dh : none(),
          params ? seq::product<K>(d_gi.t(), x) : none(),
          params ? seq::recurrent_weight_grad<K>(d_gh, out, h0, s, reverse) : none(),
          gb_ih,
          params && has_bias
              ? at::cat({gb_ih.narrow(0, 0, 2 * H), d_gh.narrow(1, 2 * H, H).sum(0)})
              : none()};
}

// ------------------------------------------------------------------------------------ LSTM

template <class K>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_lstm_seq_fwd(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& batch_sizes,
    bool reverse, std::string_view gate, bool need_workspace) {
  const Gate g = parse_gate(gate);
  const seq::Steps s = seq::make_steps(input, batch_sizes);
  const at::Tensor x = seq::as_rows(input);
  const int64_t H = check_weights(4, x, w_ih, w_hh, b_ih, b_hh);
  check_state(hx, "hx", s.batch, H, input);
  check_state(cx, "cx", s.batch, H, input);
  const seq::CallGuards guards(input);

  const std::optional<at::Tensor> bias = detail::summed_bias(b_ih, b_hh);
  seq::Projection<K> gi(x, w_ih, bias, 4, s, reverse, /*keep_whole=*/need_workspace);
  const typename K::Recurrent rec = K::recurrent_weight(w_hh, std::nullopt, 4, s.batch);
  // Inference on a backend that can (the CPU's) makes each step's input projection in the pass
  // of its recurrent product instead of in blocks of steps beforehand.
  constexpr bool kInputInStep = requires { &K::lstm_input_step_fwd; };
  const bool input_in_step = kInputInStep && !need_workspace;
  // Training keeps every step's summed pre-activations (the workspace): in place of the
  // projection when that is one tensor, else in their own buffer. Inference keeps none.
  at::Tensor gates = need_workspace && !gi.whole()
                         ? empty_recycled({s.rows, 4 * H}, x.options())
                         : at::Tensor();
  at::Tensor out = empty_recycled({s.rows, H}, x.options());
  at::Tensor cs = empty_recycled({need_workspace ? s.rows : 2 * s.batch, H}, x.options());
  at::Tensor hy = at::empty({s.batch, H}, x.options());
  at::Tensor cy = at::empty({s.batch, H}, x.options());
  const at::Tensor h0 = hx.contiguous(), c0 = cx.contiguous();
  at::Tensor last_h, last_c;
  int64_t last_n = 0;
  for (int64_t i = 0; i < s.T(); ++i) {
    const int64_t t = reverse ? s.T() - 1 - i : i;
    const int64_t n = s.sizes[t], off = s.offsets[t];
    const at::Tensor h = seq::start_state(last_h, last_n, h0, n);
    const at::Tensor c = seq::start_state(last_c, last_n, c0, n);
    at::Tensor out_t = seq::rows(out, off, n);
    // Inference alternates two cell-state buffers instead of keeping every step's.
    at::Tensor c_t = seq::rows(cs, need_workspace ? off : (i % 2) * s.batch, n);
    if (input_in_step) {
      if constexpr (kInputInStep) {
        K::lstm_input_step_fwd(gi.weight(), seq::rows(x, off, n), rec, h, c, out_t, c_t, g);
      }
    } else {
      const at::Tensor gi_t = gi.step(t);
      at::Tensor ws_t;
      if (need_workspace) ws_t = gi.whole() ? gi_t : seq::rows(gates, off, n);
      K::lstm_step_fwd(rec, gi_t, h, c, out_t, c_t, ws_t, g);
    }
    const int64_t next_n = s.next_size(t, reverse);
    seq::collect_final(hy, out_t, n, next_n, reverse);
    seq::collect_final(cy, c_t, n, next_n, reverse);
    last_h = out_t;
    last_c = c_t;
    last_n = n;
  }
  if (!need_workspace) {
    gates = at::empty({0}, x.options());
    cs = at::empty({0}, x.options());
  } else if (gi.whole()) {
    gates = gi.block();
  }
  return {seq::shaped_like_input(out, input), hy, cy, gates, cs};
}

// output_mask: gradients wanted for (input, hx, cx, parameters).
template <class K>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gated_lstm_seq_bwd(const std::optional<at::Tensor>& grad_output,
                   const std::optional<at::Tensor>& grad_hy,
                   const std::optional<at::Tensor>& grad_cy, const at::Tensor& input,
                   const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
                   const at::Tensor& w_hh, const at::Tensor& output, const at::Tensor& workspace,
                   const at::Tensor& cell_states, const std::optional<at::Tensor>& batch_sizes,
                   bool reverse, std::string_view gate, bool has_bias,
                   std::array<bool, 4> output_mask) {
  const Gate g = parse_gate(gate);
  const seq::Steps s = seq::make_steps(input, batch_sizes);
  const at::Tensor x = seq::as_rows(input);
  const int64_t H = check_weights(4, x, w_ih, w_hh, {}, {});
  check_state(hx, "hx", s.batch, H, input);
  check_state(cx, "cx", s.batch, H, input);
  seq::check_workspace(workspace, s);
  check_shape(workspace, "workspace", {s.rows, 4 * H}, "(rows, 4*hidden_size)");
  check_shape(cell_states, "cell_states", {s.rows, H}, "(rows, hidden_size)");
  const seq::CallGuards guards(input);

  const at::Tensor out = seq::as_rows(output).contiguous();
  const at::Tensor h0 = hx.contiguous(), c0 = cx.contiguous();
  const at::Tensor gout = grad_output ? seq::as_rows(*grad_output).contiguous() : at::Tensor();
  at::Tensor dh = seq::carried_grad(grad_hy, s, H, x);
  at::Tensor dc = seq::carried_grad(grad_cy, s, H, x);
  const at::Tensor d_gates = K::step_grads(s.rows * 4 * H, x.options()).view({s.rows, 4 * H});
  const typename K::RecurrentT w_hh_t = K::recurrent_weight_t(w_hh, s.batch);  // d_a W_hh
  for (int64_t i = 0; i < s.T(); ++i) {
    const int64_t t = reverse ? i : s.T() - 1 - i;
    const int64_t n = s.sizes[t], off = s.offsets[t];
    at::Tensor dh_t = seq::rows(dh, 0, n), dc_t = seq::rows(dc, 0, n);
    if (gout.defined()) dh_t.add_(seq::rows(gout, off, n));
    at::Tensor d_gates_t = seq::rows(d_gates, off, n);
    // In place on dc: the kernel reads dc'[j] and writes dc[j] at the same index.
    K::lstm_pointwise_bwd(dh_t, dc_t, seq::rows(workspace, off, n),
                          seq::step_start(cell_states, c0, s, t, reverse),
                          seq::rows(cell_states, off, n), d_gates_t, dc_t, g);
    K::recurrent_product_t(w_hh_t, d_gates_t, dh_t, /*accumulate=*/false);
  }
  auto none = [&] { return detail::not_requested(x); };
  const bool params = output_mask[3];
  // d b_ih = d b_hh: both biases enter the same sum (MATH.md §1).
  at::Tensor gb = params && has_bias ? d_gates.sum(0) : none();
  return {output_mask[0] ? seq::shaped_like_input(seq::input_grad<K>(d_gates, w_ih), input)
                         : none(),
          output_mask[1] ? dh : none(),
          output_mask[2] ? dc : none(),
          params ? seq::product<K>(d_gates.t(), x) : none(),
          params ? seq::recurrent_weight_grad<K>(d_gates, out, h0, s, reverse) : none(),
          gb,
          gb.clone()};
}

}  // namespace mapopt
