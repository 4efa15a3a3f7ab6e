// CUDA pointwise kernels of the gated cells and their registration. One thread per (row, unit);
// half / bfloat16 are computed in float. The cell and layer ops (matrix products via cuBLAS + these
// kernels) are written once in csrc/gated_cells.h and csrc/gated_layers.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "../common/cells.h"
#include "../common/scalar_math.h"
#include "../gated_registration.h"
#include "../linear.h"
#include "launch.cuh"

namespace mapopt::cuda {
namespace {

template <class F>
void dispatch(const at::Tensor& t, Gate gate, const F& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(),
                                  "mapopt_native gated cell", [&] {
    dispatch_gate(gate, [&](auto g) { fn(g, scalar_t{}); });
  });
}

template <Gate G, class scalar_t>
__global__ void gru_fwd_kernel(int64_t n, int64_t H, const scalar_t* gi, int64_t gi_s,
                               const scalar_t* gh, int64_t gh_s, const scalar_t* hx, int64_t hx_s,
                               scalar_t* hy, int64_t hy_s, scalar_t* ws, int64_t ws_s) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = GruPointwise<G, acc_t, ScalarMath>;
  MAPOPT_GRID_STRIDE(e, n) {
    const int64_t b = e / H, j = e - b * H;
    const scalar_t* gib = gi + b * gi_s;
    const scalar_t* ghb = gh + b * gh_s;
    typename P::Saved s;
    const acc_t out = P::forward(gib[j], gib[H + j], gib[2 * H + j], ghb[j], ghb[H + j],
                                 ghb[2 * H + j], hx[b * hx_s + j], s);
    hy[b * hy_s + j] = out;
    scalar_t* wsb = ws + b * ws_s;
    wsb[j] = s.pre_r;
    wsb[H + j] = s.pre_z;
    wsb[2 * H + j] = s.n;
    wsb[3 * H + j] = s.gh_n;
  }
}

template <Gate G, class scalar_t>
__global__ void gru_bwd_kernel(int64_t n, int64_t H, const scalar_t* dhy, int64_t dhy_s,
                               const scalar_t* hx, int64_t hx_s, const scalar_t* ws, int64_t ws_s,
                               scalar_t* d_gi, int64_t d_gi_s, scalar_t* d_gh, int64_t d_gh_s,
                               scalar_t* dh, int64_t dh_s) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = GruPointwise<G, acc_t, ScalarMath>;
  MAPOPT_GRID_STRIDE(e, n) {
    const int64_t b = e / H, j = e - b * H;
    const scalar_t* wsb = ws + b * ws_s;
    const typename P::Saved s{wsb[j], wsb[H + j], wsb[2 * H + j], wsb[3 * H + j]};
    const auto g = P::backward(dhy[b * dhy_s + j], hx[b * hx_s + j], s);
    scalar_t* dgib = d_gi + b * d_gi_s;
    scalar_t* dghb = d_gh + b * d_gh_s;
    dgib[j] = g.d_r;
    dgib[H + j] = g.d_z;
    dgib[2 * H + j] = g.d_gi_n;
    dghb[j] = g.d_r;
    dghb[H + j] = g.d_z;
    dghb[2 * H + j] = g.d_gh_n;
    dh[b * dh_s + j] = g.dh_direct;
  }
}

template <Gate G, class scalar_t>
__global__ void lstm_fwd_kernel(int64_t n, int64_t H, const scalar_t* gi, int64_t gi_s,
                                const scalar_t* gh, int64_t gh_s, const scalar_t* cx,
                                int64_t cx_s, scalar_t* hy, int64_t hy_s, scalar_t* cy,
                                int64_t cy_s, scalar_t* ws, int64_t ws_s) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = LstmPointwise<G, acc_t, ScalarMath>;
  MAPOPT_GRID_STRIDE(e, n) {
    const int64_t b = e / H, j = e - b * H;
    acc_t a[4];
    for (int k = 0; k < 4; ++k) {
      // The workspace keeps the summed pre-activation in the input dtype, as the backward reads
      // it; ws may alias gi (each thread reads its elements before writing them).
      const scalar_t sum = static_cast<acc_t>(gi[b * gi_s + k * H + j]) +
                           static_cast<acc_t>(gh[b * gh_s + k * H + j]);
      if (ws) ws[b * ws_s + k * H + j] = sum;
      a[k] = sum;
    }
    acc_t c_new;
    const acc_t h_new = P::forward(a[0], a[1], a[2], a[3], cx[b * cx_s + j], c_new);
    hy[b * hy_s + j] = h_new;
    cy[b * cy_s + j] = c_new;
  }
}

template <Gate G, class scalar_t>
__global__ void lstm_bwd_kernel(int64_t n, int64_t H, const scalar_t* dhy, int64_t dhy_s,
                                const scalar_t* dcy, int64_t dcy_s, const scalar_t* a, int64_t a_s,
                                const scalar_t* cx, int64_t cx_s, const scalar_t* cy, int64_t cy_s,
                                scalar_t* d_a, int64_t d_a_s, scalar_t* dcx, int64_t dcx_s) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = LstmPointwise<G, acc_t, ScalarMath>;
  MAPOPT_GRID_STRIDE(e, n) {
    const int64_t b = e / H, j = e - b * H;
    const scalar_t* ab = a + b * a_s;
    // A null incoming gradient is zero (that output was not used).
    const acc_t gh = dhy ? static_cast<acc_t>(dhy[b * dhy_s + j]) : acc_t(0);
    const acc_t gc = dcy ? static_cast<acc_t>(dcy[b * dcy_s + j]) : acc_t(0);
    const auto g = P::backward(gh, gc, ab[j], ab[H + j], ab[2 * H + j], ab[3 * H + j],
                               cx[b * cx_s + j], cy[b * cy_s + j]);
    scalar_t* dab = d_a + b * d_a_s;
    dab[j] = g.d_i;
    dab[H + j] = g.d_f;
    dab[2 * H + j] = g.d_c;
    dab[3 * H + j] = g.d_o;
    dcx[b * dcx_s + j] = g.dc_prev;
  }
}

template <class scalar_t>
const scalar_t* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr;
}

inline int64_t stride_or_zero(const at::Tensor& t) { return t.defined() ? t.stride(0) : 0; }

struct CudaCellKernels : StepByProduct<CudaCellKernels> {
  // The whole sequence's input projection is one product (csrc/gated_layers.h, seq::Projection).
  static constexpr int64_t kProjectionBytes = std::numeric_limits<int64_t>::max();

  static at::Tensor linear(const at::Tensor& x, const at::Tensor& w,
                           const std::optional<at::Tensor>& b) {
    return aten_linear(x, w, b);
  }
  static void linear_into(at::Tensor& out, const at::Tensor& x, const at::Tensor& w,
                          bool accumulate) {
    aten_linear_into(out, x, w, accumulate);
  }
  static void matmul_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                          bool accumulate) {
    aten_matmul_into(out, a, b, accumulate);
  }
  static at::Tensor pack_weight(const at::Tensor& w, int64_t /*batch*/) { return w; }

  static void gru_pointwise_fwd(const at::Tensor& gi, const at::Tensor& gh, const at::Tensor& hx,
                                const at::Tensor& hy, const at::Tensor& ws, Gate gate) {
    const int64_t H = hy.size(1);
    dispatch(hy, gate, [&](auto g, auto s) {
      using scalar_t = decltype(s);
      launch(hy.numel(), gru_fwd_kernel<decltype(g)::value, scalar_t>, H,
             gi.const_data_ptr<scalar_t>(), gi.stride(0), gh.const_data_ptr<scalar_t>(),
             gh.stride(0), hx.const_data_ptr<scalar_t>(), hx.stride(0), hy.data_ptr<scalar_t>(),
             hy.stride(0), ws.data_ptr<scalar_t>(), ws.stride(0));
    });
  }

  static void gru_pointwise_bwd(const at::Tensor& dhy, const at::Tensor& hx, const at::Tensor& ws,
                                const at::Tensor& d_gi, const at::Tensor& d_gh,
                                const at::Tensor& dh, Gate gate) {
    const int64_t H = dh.size(1);
    dispatch(dh, gate, [&](auto g, auto s) {
      using scalar_t = decltype(s);
      launch(dh.numel(), gru_bwd_kernel<decltype(g)::value, scalar_t>, H,
             dhy.const_data_ptr<scalar_t>(), dhy.stride(0), hx.const_data_ptr<scalar_t>(),
             hx.stride(0), ws.const_data_ptr<scalar_t>(), ws.stride(0), d_gi.data_ptr<scalar_t>(),
             d_gi.stride(0), d_gh.data_ptr<scalar_t>(), d_gh.stride(0), dh.data_ptr<scalar_t>(),
             dh.stride(0));
    });
  }

  static void lstm_pointwise_fwd(const at::Tensor& gi, const at::Tensor& gh,
                                 const at::Tensor& cx, const at::Tensor& hy, const at::Tensor& cy,
                                 const at::Tensor& ws, Gate gate) {
    const int64_t H = hy.size(1);
    dispatch(hy, gate, [&](auto g, auto s) {
      using scalar_t = decltype(s);
      launch(hy.numel(), lstm_fwd_kernel<decltype(g)::value, scalar_t>, H,
             gi.const_data_ptr<scalar_t>(), gi.stride(0), gh.const_data_ptr<scalar_t>(),
             gh.stride(0), cx.const_data_ptr<scalar_t>(), cx.stride(0), hy.data_ptr<scalar_t>(),
             hy.stride(0), cy.data_ptr<scalar_t>(), cy.stride(0),
             ws.defined() ? ws.data_ptr<scalar_t>() : nullptr, stride_or_zero(ws));
    });
  }

  static void lstm_pointwise_bwd(const at::Tensor& dhy, const at::Tensor& dcy,
                                 const at::Tensor& gates, const at::Tensor& cx,
                                 const at::Tensor& cy, const at::Tensor& d_gates,
                                 const at::Tensor& dcx, Gate gate) {
    const int64_t H = dcx.size(1);
    dispatch(dcx, gate, [&](auto g, auto s) {
      using scalar_t = decltype(s);
      launch(dcx.numel(), lstm_bwd_kernel<decltype(g)::value, scalar_t>, H,
             ptr_or_null<scalar_t>(dhy), stride_or_zero(dhy), ptr_or_null<scalar_t>(dcy),
             stride_or_zero(dcy), gates.const_data_ptr<scalar_t>(), gates.stride(0),
             cx.const_data_ptr<scalar_t>(), cx.stride(0), cy.const_data_ptr<scalar_t>(),
             cy.stride(0), d_gates.data_ptr<scalar_t>(), d_gates.stride(0),
             dcx.data_ptr<scalar_t>(), dcx.stride(0));
    });
  }
};

}  // namespace
}  // namespace mapopt::cuda

TORCH_LIBRARY_IMPL(mapopt_native, CUDA, m) {
  mapopt::register_gated_ops<mapopt::cuda::CudaCellKernels>(m);
}
