// The gate families of MATH.md §1: value g(z) and derivative g'(z), written once for the CPU and
// CUDA kernels. Torch-free.
//
// T is the value type (float, double, or a SIMD vector of them), M the math policy
// (ScalarMath or the CPU's VecMath). derivative() takes both z and g = value(z) so that each gate
// uses whichever is cheaper: sigmoid needs only g, gaussian both, trig only z.
#pragma once

#include <type_traits>

#include "macros.h"

namespace mapopt {

enum class Gate : int { Sigmoid = 0, Gaussian = 1, Trig = 2 };

constexpr int kNumGates = 3;
// Indexed by Gate; the public names (mapopt_native.GATES) come from here.
constexpr const char* kGateNames[kNumGates] = {"sigmoid", "gaussian", "trig"};

template <Gate G>
struct GateFn;

template <>
struct GateFn<Gate::Sigmoid> {
  // 1 / (1 + e^{-z}); g' = g (1 - g)
  template <class T, class M>
  static MAPOPT_INLINE T value(T z) {
    return T(1) / (T(1) + M::exp(T(0) - z));
  }
  template <class T, class M>
  static MAPOPT_INLINE T derivative(T /*z*/, T g) {
    return g * (T(1) - g);
  }
};

template <>
struct GateFn<Gate::Gaussian> {
  // exp(-z^2 / 2); g' = -z g
  template <class T, class M>
  static MAPOPT_INLINE T value(T z) {
    return M::exp(T(-0.5f) * z * z);
  }
  template <class T, class M>
  static MAPOPT_INLINE T derivative(T z, T g) {
    return (T(0) - z) * g;
  }
};

template <>
struct GateFn<Gate::Trig> {
  // (1 + sin z) / 2; g' = cos(z) / 2
  template <class T, class M>
  static MAPOPT_INLINE T value(T z) {
    return T(0.5f) * (T(1) + M::sin(z));
  }
  template <class T, class M>
  static MAPOPT_INLINE T derivative(T z, T /*g*/) {
    return T(0.5f) * M::cos(z);
  }
};

// The candidate (n, c~) and the LSTM output squashing: tanh for every gate family (MATH.md §1).
struct Candidate {
  template <class T, class M>
  static MAPOPT_INLINE T value(T a) {
    return M::tanh(a);
  }
  // Derivative from the value t = tanh(a).
  template <class T>
  static MAPOPT_INLINE T derivative_from_value(T t) {
    return T(1) - t * t;
  }
};

}  // namespace mapopt

namespace mapopt {

// Calls f(std::integral_constant<Gate, G>{}) for the runtime gate g, so kernels are compiled
// once per gate with the gate's math inlined.
template <class F>
inline void dispatch_gate(Gate g, F&& f) {
  switch (g) {
    case Gate::Sigmoid: f(std::integral_constant<Gate, Gate::Sigmoid>{}); break;
    case Gate::Gaussian: f(std::integral_constant<Gate, Gate::Gaussian>{}); break;
    case Gate::Trig: f(std::integral_constant<Gate, Gate::Trig>{}); break;
  }
}

}  // namespace mapopt
