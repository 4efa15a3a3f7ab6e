// Pointwise math of one hidden unit of the GRU and LSTM cells, forward and backward (MATH.md §1),
// written once for the CPU (vectorised) and CUDA (scalar) kernels. Torch-free.
//
// What the forward saves for the backward ("workspace", per row):
//   GRU  [pre_r | pre_z | n | gh_n]  (4H): gate pre-activations (gaussian / trig gates need z, not
//        only g), the candidate, and the recurrent candidate term that r multiplies.
//   LSTM [a_i | a_f | a_c | a_o]     (4H): the summed pre-activations; c' is the cell's own output.
#pragma once

#include "gates.h"
#include "macros.h"

namespace mapopt {

template <Gate G, class T, class M>
struct GruPointwise {
  using Fn = GateFn<G>;

  struct Saved {
    T pre_r, pre_z, n, gh_n;
  };

  // gi_*, gh_*: input and recurrent projections (biases included); h: previous hidden state.
  static MAPOPT_INLINE T forward(T gi_r, T gi_z, T gi_n, T gh_r, T gh_z, T gh_n, T h, Saved& s) {
    s.pre_r = gi_r + gh_r;
    s.pre_z = gi_z + gh_z;
    s.gh_n = gh_n;
    const T r = Fn::template value<T, M>(s.pre_r);
    const T z = Fn::template value<T, M>(s.pre_z);
    s.n = Candidate::value<T, M>(gi_n + r * gh_n);
    return (T(1) - z) * s.n + z * h;
  }

  struct Grads {
    T d_r, d_z;        // d gi_r = d gh_r, d gi_z = d gh_z
    T d_gi_n, d_gh_n;  // the candidate's two projections differ by the factor r
    T dh_direct;       // dh' * z: the part of dh that bypasses W_hh
  };

  static MAPOPT_INLINE Grads backward(T dhy, T h, const Saved& s) {
    const T r = Fn::template value<T, M>(s.pre_r);
    const T z = Fn::template value<T, M>(s.pre_z);
    const T dz = dhy * (h - s.n);
    const T dan = dhy * (T(1) - z) * Candidate::derivative_from_value(s.n);
    Grads g;
    g.d_gi_n = dan;
    g.d_gh_n = dan * r;
    g.d_r = dan * s.gh_n * Fn::template derivative<T, M>(s.pre_r, r);
    g.d_z = dz * Fn::template derivative<T, M>(s.pre_z, z);
    g.dh_direct = dhy * z;
    return g;
  }
};

template <Gate G, class T, class M>
struct LstmPointwise {
  using Fn = GateFn<G>;

  // a_*: summed pre-activations (both projections and both biases); c: previous cell state.
  // Returns h' and writes c'.
  static MAPOPT_INLINE T forward(T a_i, T a_f, T a_c, T a_o, T c, T& cy) {
    const T i = Fn::template value<T, M>(a_i);
    const T f = Fn::template value<T, M>(a_f);
    const T ct = Candidate::value<T, M>(a_c);
    const T o = Fn::template value<T, M>(a_o);
    cy = f * c + i * ct;
    return o * Candidate::value<T, M>(cy);
  }

  struct Grads {
    T d_i, d_f, d_c, d_o;  // gradients of the pre-activations a_*
    T dc_prev;             // gradient of the previous cell state
  };

  // dhy, dcy: incoming gradients of h' and c'.
  static MAPOPT_INLINE Grads backward(T dhy, T dcy, T a_i, T a_f, T a_c, T a_o, T c, T cy) {
    const T i = Fn::template value<T, M>(a_i);
    const T f = Fn::template value<T, M>(a_f);
    const T ct = Candidate::value<T, M>(a_c);
    const T o = Fn::template value<T, M>(a_o);
    const T tcy = Candidate::value<T, M>(cy);
    const T dc = dcy + dhy * o * Candidate::derivative_from_value(tcy);
    Grads g;
    g.d_i = dc * ct * Fn::template derivative<T, M>(a_i, i);
    g.d_f = dc * c * Fn::template derivative<T, M>(a_f, f);
    g.d_c = dc * i * Candidate::derivative_from_value(ct);
    g.d_o = dhy * tcy * Fn::template derivative<T, M>(a_o, o);
    g.dc_prev = dc * f;
    return g;
  }
};

}  // namespace mapopt
