// CPU pointwise kernels of the gated cells (vectorised, at::parallel_for) and the registration of
// the cell and layer ops, which are written once for every device in csrc/gated_cells.h and
// csrc/gated_layers.h on top of these kernels.
#include <ATen/Dispatch.h>
#include <ATen/ceil_div.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "../common/cells.h"
#include "../gated_registration.h"
#include "onednn_linear.h"
#include "vec_math.h"

namespace mapopt::cpu {
namespace {

template <class F>
void dispatch(const at::Tensor& t, Gate gate, const F& fn) {
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "mapopt_native gated cell", [&] {
    dispatch_gate(gate, [&](auto g) { fn(g, scalar_t{}); });
  });
}

// The forward pointwise math of row b's hidden units [j0, j1). gh's gate k of unit j is at
// ghb[k * gs + j - g0]: gs = H, g0 = 0 for the whole (B, chunks*H) product, or the tile's units and
// first unit for one tile of the fused step (RecurrentTiles).
template <Gate G, class scalar_t>
void gru_fwd_units(const at::Tensor& gi, const scalar_t* ghb, int64_t gs, int64_t g0,
                   const at::Tensor& hx, const at::Tensor& hy, const at::Tensor& ws, int64_t b,
                   int64_t j0, int64_t j1) {
  using V = Vectorized<scalar_t>;
  using P = GruPointwise<G, V, VecMath>;
  const int64_t H = hy.size(1);
  const scalar_t* gib = row_in<scalar_t>(gi, b);
  const scalar_t* hb = row_in<scalar_t>(hx, b);
  scalar_t* hyb = row_out<scalar_t>(hy, b);
  scalar_t* wsb = row_out<scalar_t>(ws, b);
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

// ws may be undefined (inference) or alias gi: each element is read before it is written.
template <Gate G, class scalar_t>
void lstm_fwd_units(const at::Tensor& gi, const scalar_t* ghb, int64_t gs, int64_t g0,
                    const at::Tensor& cx, const at::Tensor& hy, const at::Tensor& cy,
                    const at::Tensor& ws, int64_t b, int64_t j0, int64_t j1) {
  using V = Vectorized<scalar_t>;
  using P = LstmPointwise<G, V, VecMath>;
  const int64_t H = hy.size(1);
  const scalar_t* gib = row_in<scalar_t>(gi, b);
  const scalar_t* cb = row_in<scalar_t>(cx, b);
  scalar_t* hyb = row_out<scalar_t>(hy, b);
  scalar_t* cyb = row_out<scalar_t>(cy, b);
  scalar_t* wsb = ws.defined() ? row_out<scalar_t>(ws, b) : nullptr;
  for (int64_t j = j0; j < j1; j += V::size()) {
    const int64_t n = std::min<int64_t>(V::size(), j1 - j);
    const scalar_t* ghj = ghb + (j - g0);
    V a[4];
    for (int k = 0; k < 4; ++k) {
      a[k] = load(gib + k * H + j, n) + load(ghj + k * gs, n);
      if (wsb) store(a[k], wsb + k * H + j, n);
    }
    V c_new;
    const V h_new = P::forward(a[0], a[1], a[2], a[3], load(cb + j, n), c_new);
    store(h_new, hyb + j, n);
    store(c_new, cyb + j, n);
  }
}

// A layer's recurrent weight cut into one tile of hidden units per thread, each tile holding its
// units' rows of every gate block, packed for oneDNN. A fused step computes, on each thread, its
// tile's product (B, chunks*U) and at once the pointwise math of those U units: no barrier
// between product and pointwise, the pointwise reads the product from the core's own cache, and
// each core keeps only its part of the weight. Measured against product-then-pointwise (T = 100,
// 2 threads): 0-10% faster per layer. Small steps make one tile: the product runs on every
// thread, then the pointwise math inline, without a parallel region of its own (LSTM, B = 8,
// H = 128: 5.3 -> 4.4 ms).
struct RecurrentTiles {
  std::vector<at::Tensor> w;                // (chunks*U_i, H) packed
  std::vector<std::optional<at::Tensor>> b;  // (chunks*U_i) or none
  std::vector<int64_t> first;               // first unit of each tile, then H
  int64_t tiles() const { return static_cast<int64_t>(w.size()); }
};

// Multiply-adds per tile below which a step is cut into fewer tiles: a tile's product then costs
// less than handing it to a thread.
constexpr int64_t kMinTileWork = int64_t{1} << 20;

// For every tile, one tile per thread: its product gh = h W_tileᵀ + b_tile, then fn(b, u0, u1,
// row b of gh) for each row, as parallel_segments calls its fn. Inside the parallel region oneDNN
// runs each product on its calling thread.
template <class scalar_t, class F>
void for_each_tile_row(const RecurrentTiles& r, const at::Tensor& h, const F& fn) {
  at::parallel_for(0, r.tiles(), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const at::Tensor gh = onednn_linear(h, r.w[t], r.b[t]);
      for (int64_t b = 0; b < h.size(0); ++b) {
        fn(b, r.first[t], r.first[t + 1], row_in<scalar_t>(gh, b));
      }
    }
  });
}

struct CpuCellKernels {
  // Input projections are made in blocks of this size (csrc/gated_layers.h, seq::Projection):
  // small enough to stay in the last-level cache, large enough for an efficient product.
  static constexpr int64_t kProjectionBytes = int64_t{4} << 20;

  static at::Tensor linear(const at::Tensor& x, const at::Tensor& w,
                           const std::optional<at::Tensor>& b) {
    return onednn_linear(x, w, b);
  }
  static void linear_into(at::Tensor& out, const at::Tensor& x, const at::Tensor& w,
                          bool accumulate) {
    onednn_linear_into(out, x, w, accumulate);
  }
  static at::Tensor pack_weight(const at::Tensor& w, int64_t batch) {
    return onednn_pack(w, batch);
  }

  static void gru_pointwise_fwd(const at::Tensor& gi, const at::Tensor& gh, const at::Tensor& hx,
                                const at::Tensor& hy, const at::Tensor& ws, Gate gate) {
    const int64_t B = hy.size(0), H = hy.size(1);
    dispatch(hy, gate, [&](auto g, auto s) {
      using scalar_t = decltype(s);
      parallel_segments(B, H, [&](int64_t b, int64_t j0, int64_t j1) {
        gru_fwd_units<decltype(g)::value, scalar_t>(gi, row_in<scalar_t>(gh, b), H, 0, hx, hy, ws,
                                                    b, j0, j1);
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
      parallel_segments(B, H, [&](int64_t b, int64_t j0, int64_t j1) {
        const scalar_t* dhyb = row_in<scalar_t>(dhy, b);
        const scalar_t* hb = row_in<scalar_t>(hx, b);
        const scalar_t* wsb = row_in<scalar_t>(ws, b);
        scalar_t* dgib = row_out<scalar_t>(d_gi, b);
        scalar_t* dghb = row_out<scalar_t>(d_gh, b);
        scalar_t* dhb = row_out<scalar_t>(dh, b);
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
      parallel_segments(B, H, [&](int64_t b, int64_t j0, int64_t j1) {
        lstm_fwd_units<decltype(g)::value, scalar_t>(gi, row_in<scalar_t>(gh, b), H, 0, cx, hy, cy,
                                                     ws, b, j0, j1);
      });
    });
  }

  // The recurrent weight (chunks*H, H) and its bias (GRU: b_hh; LSTM: none, it is in the
  // projection) as per-thread tiles for the fused step, for batches of about `batch` rows.
  using Recurrent = RecurrentTiles;
  static Recurrent recurrent_weight(const at::Tensor& w, const std::optional<at::Tensor>& b,
                                    int64_t chunks, int64_t batch) {
    const int64_t H = w.size(1), unit = Vectorized<float>::size();
    const int64_t by_work = std::max<int64_t>(1, batch * chunks * H * H / kMinTileWork);
    const int64_t wanted = std::clamp<int64_t>(
        std::min<int64_t>(at::in_parallel_region() ? 1 : at::get_num_threads(), by_work), 1,
        std::max<int64_t>(1, H / unit));
    // Tiles of whole vectors of units, so every tile's pointwise loop runs on full vectors.
    const int64_t U = at::ceil_div<int64_t>(at::ceil_div<int64_t>(H, wanted), unit) * unit;
    Recurrent r;
    for (int64_t u0 = 0; u0 < H; u0 += U) {
      const int64_t n = std::min(U, H - u0);
      std::vector<at::Tensor> rows, bias;
      for (int64_t k = 0; k < chunks; ++k) {
        rows.push_back(w.narrow(0, k * H + u0, n));
        if (b) bias.push_back(b->narrow(0, k * H + u0, n));
      }
      r.w.push_back(onednn_pack(at::cat(rows), batch));
      r.b.push_back(b ? std::optional<at::Tensor>(at::cat(bias)) : std::nullopt);
      r.first.push_back(u0);
    }
    r.first.push_back(H);
    return r;
  }

  // One fused step: hy = GRU(gi + h W_hhᵀ + b_hh) (gi: this step's input projection).
  static void gru_step_fwd(const Recurrent& r, const at::Tensor& gi, const at::Tensor& hx,
                           const at::Tensor& hy, const at::Tensor& ws, Gate gate) {
    dispatch(hy, gate, [&](auto g, auto s) {
      using scalar_t = decltype(s);
      for_each_tile_row<scalar_t>(r, hx, [&](int64_t b, int64_t u0, int64_t u1, const auto* ghb) {
        gru_fwd_units<decltype(g)::value, scalar_t>(gi, ghb, u1 - u0, u0, hx, hy, ws, b, u0, u1);
      });
    });
  }

  static void lstm_step_fwd(const Recurrent& r, const at::Tensor& gi, const at::Tensor& hx,
                            const at::Tensor& cx, const at::Tensor& hy, const at::Tensor& cy,
                            const at::Tensor& ws, Gate gate) {
    dispatch(hy, gate, [&](auto g, auto s) {
      using scalar_t = decltype(s);
      for_each_tile_row<scalar_t>(r, hx, [&](int64_t b, int64_t u0, int64_t u1, const auto* ghb) {
        lstm_fwd_units<decltype(g)::value, scalar_t>(gi, ghb, u1 - u0, u0, cx, hy, cy, ws, b, u0,
                                                     u1);
      });
    });
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
      parallel_segments(B, H, [&](int64_t b, int64_t j0, int64_t j1) {
        // An undefined incoming gradient is zero (that output was not used).
        const scalar_t* dhyb = row_in<scalar_t>(dhy, b);
        const scalar_t* dcyb = row_in<scalar_t>(dcy, b);
        const scalar_t* ab = row_in<scalar_t>(gates, b);
        const scalar_t* cb = row_in<scalar_t>(cx, b);
        const scalar_t* cyb = row_in<scalar_t>(cy, b);
        scalar_t* dab = row_out<scalar_t>(d_gates, b);
        scalar_t* dcb = row_out<scalar_t>(dcx, b);
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

}  // namespace
}  // namespace mapopt::cpu

TORCH_LIBRARY_IMPL(mapopt_native, CPU, m) {
  mapopt::register_gated_ops<mapopt::cpu::CpuCellKernels>(m);
}
