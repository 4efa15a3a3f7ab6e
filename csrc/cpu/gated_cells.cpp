// CPU pointwise kernels of the gated cells (vectorised, at::parallel_for) and the registration of
// the cell and layer ops, which are written once for every device in csrc/gated_cells.h and
// csrc/gated_layers.h on top of these kernels.
#include <ATen/Dispatch.h>
#include <torch/library.h>

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
      using V = Vectorized<scalar_t>;
      using P = GruPointwise<decltype(g)::value, V, VecMath>;
      parallel_segments(B, H, [&](int64_t b, int64_t j0, int64_t j1) {
        const scalar_t* gib = gi.const_data_ptr<scalar_t>() + b * gi.stride(0);
        const scalar_t* ghb = gh.const_data_ptr<scalar_t>() + b * gh.stride(0);
        const scalar_t* hb = hx.const_data_ptr<scalar_t>() + b * hx.stride(0);
        scalar_t* hyb = hy.data_ptr<scalar_t>() + b * hy.stride(0);
        scalar_t* wsb = ws.data_ptr<scalar_t>() + b * ws.stride(0);
        for (int64_t j = j0; j < j1; j += V::size()) {
          const int64_t n = std::min<int64_t>(V::size(), j1 - j);
          typename P::Saved sv;
          const V out = P::forward(load(gib + j, n), load(gib + H + j, n), load(gib + 2 * H + j, n),
                                   load(ghb + j, n), load(ghb + H + j, n), load(ghb + 2 * H + j, n),
                                   load(hb + j, n), sv);
          store(out, hyb + j, n);
          store(sv.pre_r, wsb + j, n);
          store(sv.pre_z, wsb + H + j, n);
          store(sv.n, wsb + 2 * H + j, n);
          store(sv.gh_n, wsb + 3 * H + j, n);
        }
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
        const scalar_t* dhyb = dhy.const_data_ptr<scalar_t>() + b * dhy.stride(0);
        const scalar_t* hb = hx.const_data_ptr<scalar_t>() + b * hx.stride(0);
        const scalar_t* wsb = ws.const_data_ptr<scalar_t>() + b * ws.stride(0);
        scalar_t* dgib = d_gi.data_ptr<scalar_t>() + b * d_gi.stride(0);
        scalar_t* dghb = d_gh.data_ptr<scalar_t>() + b * d_gh.stride(0);
        scalar_t* dhb = dh.data_ptr<scalar_t>() + b * dh.stride(0);
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
      using V = Vectorized<scalar_t>;
      using P = LstmPointwise<decltype(g)::value, V, VecMath>;
      parallel_segments(B, H, [&](int64_t b, int64_t j0, int64_t j1) {
        const scalar_t* gib = gi.const_data_ptr<scalar_t>() + b * gi.stride(0);
        const scalar_t* ghb = gh.const_data_ptr<scalar_t>() + b * gh.stride(0);
        const scalar_t* cb = cx.const_data_ptr<scalar_t>() + b * cx.stride(0);
        scalar_t* hyb = hy.data_ptr<scalar_t>() + b * hy.stride(0);
        scalar_t* cyb = cy.data_ptr<scalar_t>() + b * cy.stride(0);
        // ws may alias gi: each element is read before it is written.
        scalar_t* wsb = ws.defined() ? ws.data_ptr<scalar_t>() + b * ws.stride(0) : nullptr;
        for (int64_t j = j0; j < j1; j += V::size()) {
          const int64_t n = std::min<int64_t>(V::size(), j1 - j);
          V a[4];
          for (int k = 0; k < 4; ++k) {
            a[k] = load(gib + k * H + j, n) + load(ghb + k * H + j, n);
            if (wsb) store(a[k], wsb + k * H + j, n);
          }
          V c_new;
          const V h_new = P::forward(a[0], a[1], a[2], a[3], load(cb + j, n), c_new);
          store(h_new, hyb + j, n);
          store(c_new, cyb + j, n);
        }
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
        const scalar_t* dhyb =
            dhy.defined() ? dhy.const_data_ptr<scalar_t>() + b * dhy.stride(0) : nullptr;
        const scalar_t* dcyb =
            dcy.defined() ? dcy.const_data_ptr<scalar_t>() + b * dcy.stride(0) : nullptr;
        const scalar_t* ab = gates.const_data_ptr<scalar_t>() + b * gates.stride(0);
        const scalar_t* cb = cx.const_data_ptr<scalar_t>() + b * cx.stride(0);
        const scalar_t* cyb = cy.const_data_ptr<scalar_t>() + b * cy.stride(0);
        scalar_t* dab = d_gates.data_ptr<scalar_t>() + b * d_gates.stride(0);
        scalar_t* dcb = dcx.data_ptr<scalar_t>() + b * dcx.stride(0);
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
