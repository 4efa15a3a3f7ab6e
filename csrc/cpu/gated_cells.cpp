// CPU pointwise kernels of the gated cells (vectorised, at::parallel_for) and the registration of
// the cell and layer ops, which are written once for every device in csrc/gated_cells.h and
// csrc/gated_layers.h on top of these kernels.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "../common/cells.h"
#include "../gated_registration.h"
#include "onednn_linear.h"
#include "layer_products.h"
#include "scratch.h"
#include "vec_math.h"

namespace mapopt::cpu {
namespace {

template <class F>
void dispatch(const at::Tensor& t, Gate gate, const F& fn) {
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "mapopt_native gated cell", [&] {
    dispatch_gate(gate, [&](auto g) { fn(g, scalar_t{}); });
  });
}

// The forward pointwise math of one row's hidden units [j0, j1) (row pointers; H hidden units).
// gh's gate k of unit j is at ghb[k * gs + j - g0]: gs = H, g0 = 0 for a whole (B, chunks*H)
// product row, or gs = L, g0 = j0 for a block of the fused step (layer_products.h).
template <Gate G, class scalar_t>
void gru_fwd_units(const scalar_t* gib, const scalar_t* ghb, int64_t gs, int64_t g0,
                   const scalar_t* hb, scalar_t* hyb, scalar_t* wsb, int64_t H, int64_t j0,
                   int64_t j1) {
  using V = Vectorized<scalar_t>;
  using P = GruPointwise<G, V, VecMath>;
  for (int64_t j = j0; j < j1; j += V::size()) {
    const int64_t n = std::min<int64_t>(V::size(), j1 - j);
    const scalar_t* ghj = ghb + (j - g0);
    typename P::Saved sv;
    const V out = P::forward(load(gib + j, n), load(gib + H + j, n), load(gib + 2 * H + j, n),
                             load(ghj, n), load(ghj + gs, n), load(ghj + 2 * gs, n),
                             load(hb + j, n), sv);
    store(out, hyb + j, n);
    store(sv.pre_r, wsb + j, n);
    store(sv.pre_z, wsb + H + j, n);
    store(sv.n, wsb + 2 * H + j, n);
    store(sv.gh_n, wsb + 3 * H + j, n);
  }
}

// wsb may be null (inference) or alias gib: each element is read before it is written. gib is
// null where gh already holds the whole pre-activation (the input projection summed in).
template <Gate G, class scalar_t>
void lstm_fwd_units(const scalar_t* gib, const scalar_t* ghb, int64_t gs, int64_t g0,
                    const scalar_t* cb, scalar_t* hyb, scalar_t* cyb, scalar_t* wsb, int64_t H,
                    int64_t j0, int64_t j1) {
  using V = Vectorized<scalar_t>;
  using P = LstmPointwise<G, V, VecMath>;
  for (int64_t j = j0; j < j1; j += V::size()) {
    const int64_t n = std::min<int64_t>(V::size(), j1 - j);
    const scalar_t* ghj = ghb + (j - g0);
    V a[4];
    for (int k = 0; k < 4; ++k) {
      a[k] = gib ? load(gib + k * H + j, n) + load(ghj + k * gs, n) : load(ghj + k * gs, n);
      if (wsb) store(a[k], wsb + k * H + j, n);
    }
    V c_new;
    const V h_new = P::forward(a[0], a[1], a[2], a[3], load(cb + j, n), c_new);
    store(h_new, hyb + j, n);
    store(c_new, cyb + j, n);
  }
}

struct CpuCellKernels {
 private:
  static PackedUnits packed(Scratch slot, const at::Tensor& w, const std::optional<at::Tensor>& b,
                            int64_t chunks, bool by_columns = false) {
    PackedUnits p;
    AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "mapopt_native packed weight", [&] {
      const int64_t units = by_columns ? w.size(0) : w.size(0) / chunks;
      const int64_t size = packed_units_size<scalar_t>(chunks, units, w.size(1), by_columns);
      p = pack_units<scalar_t>(w, b, chunks, by_columns, scratch(slot, size, w.options()));
    });
    return p;
  }

  // An LSTM step's product and gate math: gi (undefined with `in`) plus h W_hhᵀ, or with `in`
  // x W_ihᵀ + b plus h W_hhᵀ summed in one pass; ws (undefined in inference) gets the sums.
  static void lstm_step(const PackedUnits* in, const at::Tensor& x, const at::Tensor& gi,
                        const PackedUnits& r, const at::Tensor& hx, const at::Tensor& cx,
                        const at::Tensor& hy, const at::Tensor& cy, const at::Tensor& ws,
                        Gate gate) {
    const int64_t H = hy.size(1);
    dispatch(hy, gate, [&](auto g, auto s) {
      using scalar_t = decltype(s);
      constexpr int64_t L = Vectorized<scalar_t>::size();
      const auto gi_r = rows_in<scalar_t>(gi), c_r = rows_in<scalar_t>(cx);
      const auto hy_r = rows_out<scalar_t>(hy), cy_r = rows_out<scalar_t>(cy);
      const auto ws_r = rows_out<scalar_t>(ws);
      const auto units = [&](int64_t b, int64_t j0, int64_t j1, const scalar_t* ab) {
        lstm_fwd_units<decltype(g)::value, scalar_t>(gi_r[b], ab, L, j0, c_r[b], hy_r[b], cy_r[b],
                                                     ws_r[b], H, j0, j1);
      };
      if (in) {
        for_each_summed_product_row<4, scalar_t>(*in, x, &r, hx, units);
      } else {
        for_each_product_row<4, scalar_t>(r, hx, units);
      }
    });
  }

 public:
  static constexpr int64_t kProjectionBytes = kProjectionBlockBytes;  // scratch.h says why

  static at::Tensor linear(const at::Tensor& x, const at::Tensor& w,
                           const std::optional<at::Tensor>& b) {
    return onednn_linear(x, w, b);
  }
  static void linear_into(at::Tensor& out, const at::Tensor& x, const at::Tensor& w,
                          bool accumulate) {
    onednn_linear_into(out, x, w, accumulate);
  }
  static void matmul_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                          bool accumulate) {
    onednn_matmul_into(out, a, b, accumulate);
  }
  static at::Tensor pack_weight(const at::Tensor& w, int64_t batch) {
    return onednn_pack(w, batch);
  }

  static void gru_pointwise_fwd(const at::Tensor& gi, const at::Tensor& gh, const at::Tensor& hx,
                                const at::Tensor& hy, const at::Tensor& ws, Gate gate) {
    const int64_t B = hy.size(0), H = hy.size(1);
    dispatch(hy, gate, [&](auto g, auto s) {
      using scalar_t = decltype(s);
      const auto gi_r = rows_in<scalar_t>(gi), gh_r = rows_in<scalar_t>(gh);
      const auto h_r = rows_in<scalar_t>(hx);
      const auto hy_r = rows_out<scalar_t>(hy), ws_r = rows_out<scalar_t>(ws);
      parallel_segments(B, H, [&](int64_t b, int64_t j0, int64_t j1) {
        gru_fwd_units<decltype(g)::value>(gi_r[b], gh_r[b], H, 0, h_r[b], hy_r[b], ws_r[b], H, j0,
                                          j1);
      });
    });
  }

  static void gru_pointwise_bwd(const at::Tensor& dhy, const at::Tensor& hx, const at::Tensor& ws,
                                const at::Tensor& d_gi, const at::Tensor& d_gh,
                                const at::Tensor& dh, Gate gate) {
    const int64_t B = dh.size(0), H = dh.size(1);
    dispatch(dh, gate, [&](auto g, auto s) {
      using scalar_t = decltype(s);
      using V = Vectorized<scalar_t>;
      using P = GruPointwise<decltype(g)::value, V, VecMath>;
      const auto dhy_r = rows_in<scalar_t>(dhy), h_r = rows_in<scalar_t>(hx);
      const auto ws_r = rows_in<scalar_t>(ws);
      const auto d_gi_r = rows_out<scalar_t>(d_gi), d_gh_r = rows_out<scalar_t>(d_gh);
      const auto dh_r = rows_out<scalar_t>(dh);
      parallel_segments(B, H, [&](int64_t b, int64_t j0, int64_t j1) {
        const scalar_t* dhyb = dhy_r[b];
        const scalar_t* hb = h_r[b];
        const scalar_t* wsb = ws_r[b];
        scalar_t* dgib = d_gi_r[b];
        scalar_t* dghb = d_gh_r[b];
        scalar_t* dhb = dh_r[b];
        for (int64_t j = j0; j < j1; j += V::size()) {
          const int64_t n = std::min<int64_t>(V::size(), j1 - j);
          const typename P::Saved sv{load(wsb + j, n), load(wsb + H + j, n),
                                     load(wsb + 2 * H + j, n), load(wsb + 3 * H + j, n)};
          const auto gr = P::backward(load(dhyb + j, n), load(hb + j, n), sv);
          store(gr.d_r, dgib + j, n);
          store(gr.d_z, dgib + H + j, n);
          store(gr.d_gi_n, dgib + 2 * H + j, n);
          store(gr.d_r, dghb + j, n);
          store(gr.d_z, dghb + H + j, n);
          store(gr.d_gh_n, dghb + 2 * H + j, n);
          store(gr.dh_direct, dhb + j, n);
        }
      });
    });
  }

  static void lstm_pointwise_fwd(const at::Tensor& gi, const at::Tensor& gh,
                                 const at::Tensor& cx, const at::Tensor& hy, const at::Tensor& cy,
                                 const at::Tensor& ws, Gate gate) {
    const int64_t B = hy.size(0), H = hy.size(1);
    dispatch(hy, gate, [&](auto g, auto s) {
      using scalar_t = decltype(s);
      const auto gi_r = rows_in<scalar_t>(gi), gh_r = rows_in<scalar_t>(gh);
      const auto c_r = rows_in<scalar_t>(cx);
      const auto hy_r = rows_out<scalar_t>(hy), cy_r = rows_out<scalar_t>(cy);
      const auto ws_r = rows_out<scalar_t>(ws);
      parallel_segments(B, H, [&](int64_t b, int64_t j0, int64_t j1) {
        lstm_fwd_units<decltype(g)::value>(gi_r[b], gh_r[b], H, 0, c_r[b], hy_r[b], cy_r[b],
                                           ws_r[b], H, j0, j1);
      });
    });
  }

  // The layers' products by layer_products.h's kernel over weights packed into this thread's
  // scratch (scratch.h): the input projection of a block of steps, and the forward step, each
  // block of the recurrent product followed by its pointwise math. rec packs W_hh (chunks*H, H)
  // and b_hh (GRU; the LSTM's is in the projection).
  using Input = PackedUnits;
  using Recurrent = PackedUnits;
  static PackedUnits input_weight(const at::Tensor& w, const std::optional<at::Tensor>& b,
                                  int64_t chunks, int64_t /*rows*/) {
    return packed(Scratch::InputWeight, w, b, chunks);
  }
  static PackedUnits recurrent_weight(const at::Tensor& w, const std::optional<at::Tensor>& b,
                                      int64_t chunks, int64_t /*batch*/) {
    return packed(Scratch::RecurrentWeight, w, b, chunks);
  }

  // The backward's recurrent product, out (+)= d W_hh (d: (n, chunks*H)). Up to
  // kOwnStepGradMacs multiply-adds a step by the same kernel as the forward (W_hhᵀ packed by runs
  // of 4 vectors of output columns, in the scratch slot of the forward's W_hh: a layer's backward
  // never runs inside its forward), since oneDNN's call and fresh output cost about 20 us a step,
  // most of a step at B = 8, H = 128; above, by oneDNN, which reads the backward's long rows
  // (4H) better. LSTM training, A/B of the two on this project's 2-core EPYC: B = 8, H = 128
  // 7.9 -> 6.2 ms, B = 8, H = 512 57 -> 51 ms (8.4M a step), B = 64, H = 128 even (4.2M),
  // B = 64, H = 512 376 -> 388-408 ms (67M).
  static constexpr int64_t kOwnStepGradMacs = int64_t{1} << 24;
  using Plain = StepByProduct<CpuCellKernels>;  // the product through linear_into
  struct RecurrentT {
    PackedUnits own;          // our kernel's packing, or
    Plain::RecurrentT plain;  // the plain path's (oneDNN)
  };
  static RecurrentT recurrent_weight_t(const at::Tensor& w, int64_t batch) {
    if (batch * w.size(0) * w.size(1) > kOwnStepGradMacs) {
      return {{}, Plain::recurrent_weight_t(w, batch)};
    }
    return {packed(Scratch::RecurrentWeight, w.t(), std::nullopt, 4, /*by_columns=*/true), {}};
  }
  static void recurrent_product_t(const RecurrentT& rt, const at::Tensor& d, at::Tensor& out,
                                  bool accumulate) {
    if (!rt.own.w.defined()) return Plain::recurrent_product_t(rt.plain, d, out, accumulate);
    AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "mapopt_native recurrent gradient", [&] {
      using V = Vectorized<scalar_t>;
      constexpr int64_t L = V::size();
      const auto out_r = rows_out<scalar_t>(out);
      for_each_product_row<4, scalar_t>(rt.own, d, [&](int64_t r, int64_t j0, int64_t j1,
                                                       const scalar_t* p) {
        for (int64_t j = j0; j < j1; j += L) {
          scalar_t* o = out_r[r] + j;
          const int64_t n = std::min(L, j1 - j);
          const V v = V::loadu(p + (j - j0));
          store(accumulate ? v + load(o, n) : v, o, n);
        }
      });
    });
  }

  // The backward's buffer of every step's gate gradients, in this thread's scratch.
  static at::Tensor step_grads(int64_t numel, const at::TensorOptions& options) {
    return scratch(Scratch::StepGrads, numel, options);
  }

  // x Wᵀ + b (rows, chunks*H); in this thread's scratch unless `keep` (the caller holds on to it).
  static at::Tensor project(const PackedUnits& in, const at::Tensor& x, bool keep) {
    const int64_t n = x.size(0), H = in.units, C = in.chunks();
    at::Tensor out = keep ? empty_recycled({n, C * H}, x.options())
                          : scratch(Scratch::Projection, n * C * H, x.options()).view({n, C * H});
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mapopt_native input projection", [&] {
      constexpr int64_t L = Vectorized<scalar_t>::size();
      const auto out_r = rows_out<scalar_t>(out);
      auto store_row = [&](int64_t r, int64_t j0, int64_t j1, const scalar_t* p) {
        for (int64_t c = 0; c < C; ++c) {
          store(Vectorized<scalar_t>::loadu(p + c * L), out_r[r] + c * H + j0, j1 - j0);
        }
      };
      if (C == 3) {
        for_each_product_row<3, scalar_t>(in, x, store_row);
      } else {
        for_each_product_row<4, scalar_t>(in, x, store_row);
      }
    });
    return out;
  }

  // hy = GRU(gi + h W_hhᵀ + b_hh) (gi: this step's input projection).
  static void gru_step_fwd(const Recurrent& r, const at::Tensor& gi, const at::Tensor& hx,
                           const at::Tensor& hy, const at::Tensor& ws, Gate gate) {
    const int64_t H = hy.size(1);
    dispatch(hy, gate, [&](auto g, auto s) {
      using scalar_t = decltype(s);
      constexpr int64_t L = Vectorized<scalar_t>::size();
      const auto gi_r = rows_in<scalar_t>(gi), h_r = rows_in<scalar_t>(hx);
      const auto hy_r = rows_out<scalar_t>(hy), ws_r = rows_out<scalar_t>(ws);
      for_each_product_row<3, scalar_t>(r, hx, [&](int64_t b, int64_t j0, int64_t j1,
                                                   const scalar_t* ghb) {
        gru_fwd_units<decltype(g)::value>(gi_r[b], ghb, L, j0, h_r[b], hy_r[b], ws_r[b], H, j0,
                                          j1);
      });
    });
  }

  static void lstm_step_fwd(const Recurrent& r, const at::Tensor& gi, const at::Tensor& hx,
                            const at::Tensor& cx, const at::Tensor& hy, const at::Tensor& cy,
                            const at::Tensor& ws, Gate gate) {
    lstm_step(nullptr, at::Tensor(), gi, r, hx, cx, hy, cy, ws, gate);
  }

  // hy, cy = LSTM(x W_ihᵀ + b + h W_hhᵀ), an inference step that makes its input projection
  // (in: W_ih and the summed bias) in the same pass as its recurrent product, so the gate inputs
  // go from registers to the gate math without a projection block written and read back.
  static void lstm_input_step_fwd(const PackedUnits& in, const at::Tensor& x, const Recurrent& r,
                                  const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& hy,
                                  const at::Tensor& cy, Gate gate) {
    lstm_step(&in, x, at::Tensor(), r, hx, cx, hy, cy, at::Tensor(), gate);
  }

  static void lstm_pointwise_bwd(const at::Tensor& dhy, const at::Tensor& dcy,
                                 const at::Tensor& gates, const at::Tensor& cx,
                                 const at::Tensor& cy, const at::Tensor& d_gates,
                                 const at::Tensor& dcx, Gate gate) {
    const int64_t B = dcx.size(0), H = dcx.size(1);
    dispatch(dcx, gate, [&](auto g, auto s) {
      using scalar_t = decltype(s);
      using V = Vectorized<scalar_t>;
      using P = LstmPointwise<decltype(g)::value, V, VecMath>;
      const auto dhy_r = rows_in<scalar_t>(dhy), dcy_r = rows_in<scalar_t>(dcy);
      const auto a_r = rows_in<scalar_t>(gates), c_r = rows_in<scalar_t>(cx);
      const auto cy_r = rows_in<scalar_t>(cy);
      const auto da_r = rows_out<scalar_t>(d_gates), dc_r = rows_out<scalar_t>(dcx);
      parallel_segments(B, H, [&](int64_t b, int64_t j0, int64_t j1) {
        // An undefined incoming gradient is zero (that output was not used).
        const scalar_t* dhyb = dhy_r[b];
        const scalar_t* dcyb = dcy_r[b];
        const scalar_t* ab = a_r[b];
        const scalar_t* cb = c_r[b];
        const scalar_t* cyb = cy_r[b];
        scalar_t* dab = da_r[b];
        scalar_t* dcb = dc_r[b];
        for (int64_t j = j0; j < j1; j += V::size()) {
          const int64_t n = std::min<int64_t>(V::size(), j1 - j);
          const V dh_in = dhyb ? load(dhyb + j, n) : V(0);
          const V dc_in = dcyb ? load(dcyb + j, n) : V(0);
          const auto gr = P::backward(dh_in, dc_in,
                                      load(ab + j, n), load(ab + H + j, n), load(ab + 2 * H + j, n),
                                      load(ab + 3 * H + j, n), load(cb + j, n), load(cyb + j, n));
          store(gr.d_i, dab + j, n);
          store(gr.d_f, dab + H + j, n);
          store(gr.d_c, dab + 2 * H + j, n);
          store(gr.d_o, dab + 3 * H + j, n);
          store(gr.dc_prev, dcb + j, n);
        }
      });
    });
  }
};

// The layers take the summed inference step where a backend has it (gated_layers.h asks with a
// requires-expression, which a renamed or overloaded function would quietly turn false).
static_assert(requires { &CpuCellKernels::lstm_input_step_fwd; });

}  // namespace
}  // namespace mapopt::cpu

TORCH_LIBRARY_IMPL(mapopt_native, CPU, m) {
  mapopt::register_gated_ops<mapopt::cpu::CpuCellKernels>(m);
}
