// The activations of the Hessian-norm criterion (MATH.md §2.1, §2.2): value φ(z), derivative
// φ'(z), second derivative φ''(z), and the per-element term of the criterion, written once for the
// CPU and CUDA kernels. Torch-free.
//
// T is the value type (float, double, or a SIMD vector of them), M the math policy (ScalarMath or
// the CPU's VecMath, which also supply erf, log1p and select_le0). Every branch is a select on
// z <= 0, so that a NaN input takes the branch that passes it on.
#pragma once

#include <type_traits>

#include "macros.h"

namespace mapopt {

enum class Activation : int {
  Tanh = 0,
  Sigmoid = 1,
  Softplus = 2,
  Silu = 3,
  Gelu = 4,
  Elu = 5,
  Relu = 6,
  LeakyRelu = 7,
  Identity = 8,
};

constexpr int kNumActivations = 9;
// Indexed by Activation; the public names (mapopt_native.ACTIVATIONS) come from here.
constexpr const char* kActivationNames[kNumActivations] = {
    "tanh", "sigmoid", "softplus", "silu", "gelu", "elu", "relu", "leaky_relu", "identity"};

// Piecewise-linear activations have φ'' = 0 almost everywhere: they are scored smoothed (§2.2).
MAPOPT_INLINE constexpr bool is_piecewise_linear(Activation a) {
  return a == Activation::Relu || a == Activation::LeakyRelu || a == Activation::Identity;
}

// The user's choice, as the host passes it to the kernels. sigma is used by the piecewise-linear
// activations only (the host validates that it is > 0 for them).
struct ActivationSpec {
  Activation kind;
  double negative_slope;  // leaky_relu
  double alpha;           // elu
  double sigma;           // Gaussian smoothing scale (§2.2)
};

// Constants of one activation in the kernels' value type.
template <class T>
struct ActivationParams {
  T negative_slope;
  T alpha;
  // Smoothed piecewise-linear term (§2.2):
  //   k² ϕ(z/τ)² s²/τ² = kink_scale · s · exp(-z² inv_sigma2 / s),
  // with τ² = σ² s, ϕ(u)² = exp(-u²) / (2π), and the kink weight k = 1 (relu), 1 - a
  // (leaky_relu), 0 (identity: affine, so its smoothed Hessian is zero too).
  T kink_scale;
  T inv_sigma2;

  template <class U>
  MAPOPT_INLINE ActivationParams<U> as() const {
    return {U(negative_slope), U(alpha), U(kink_scale), U(inv_sigma2)};
  }
};

template <class T>
MAPOPT_INLINE ActivationParams<T> activation_params(const ActivationSpec& spec) {
  constexpr double kTwoPi = 6.283185307179586476925286766559;
  double kink = 0;
  if (spec.kind == Activation::Relu) kink = 1;
  if (spec.kind == Activation::LeakyRelu) kink = 1 - spec.negative_slope;
  const bool smoothed = is_piecewise_linear(spec.kind);
  return {T(spec.negative_slope), T(spec.alpha),
          T(smoothed ? kink * kink / (kTwoPi * spec.sigma * spec.sigma) : 0.0),
          T(smoothed ? 1.0 / (spec.sigma * spec.sigma) : 0.0)};
}

template <Activation A>
struct ActivationFn;

// For each activation: value, derivative, second_derivative (the smooth ones; the table of §2.1).
template <>
struct ActivationFn<Activation::Tanh> {
  template <class T, class M>
  static MAPOPT_INLINE T value(T z, const ActivationParams<T>&) { return M::tanh(z); }
  template <class T, class M>
  static MAPOPT_INLINE T derivative(T z, const ActivationParams<T>&) {
    const T t = M::tanh(z);
    return T(1) - t * t;
  }
  template <class T, class M>
  static MAPOPT_INLINE T second_derivative(T z, const ActivationParams<T>&) {
    const T t = M::tanh(z);
    return T(-2) * t * (T(1) - t * t);
  }
};

template <class T, class M>
MAPOPT_INLINE T logistic(T z) {
  return T(1) / (T(1) + M::exp(T(0) - z));
}

template <>
struct ActivationFn<Activation::Sigmoid> {
  template <class T, class M>
  static MAPOPT_INLINE T value(T z, const ActivationParams<T>&) { return logistic<T, M>(z); }
  template <class T, class M>
  static MAPOPT_INLINE T derivative(T z, const ActivationParams<T>&) {
    const T s = logistic<T, M>(z);
    return s * (T(1) - s);
  }
  template <class T, class M>
  static MAPOPT_INLINE T second_derivative(T z, const ActivationParams<T>&) {
    const T s = logistic<T, M>(z);
    return s * (T(1) - s) * (T(1) - T(2) * s);
  }
};

template <>
struct ActivationFn<Activation::Softplus> {
  // log(1 + e^z) = max(z, 0) + log1p(e^{-|z|}): no overflow for large z.
  template <class T, class M>
  static MAPOPT_INLINE T value(T z, const ActivationParams<T>&) {
    return M::select_le0(z, T(0), z) + M::log1p(M::exp(M::select_le0(z, z, T(0) - z)));
  }
  template <class T, class M>
  static MAPOPT_INLINE T derivative(T z, const ActivationParams<T>&) { return logistic<T, M>(z); }
  template <class T, class M>
  static MAPOPT_INLINE T second_derivative(T z, const ActivationParams<T>&) {
    const T s = logistic<T, M>(z);
    return s * (T(1) - s);
  }
};

template <>
struct ActivationFn<Activation::Silu> {
  template <class T, class M>
  static MAPOPT_INLINE T value(T z, const ActivationParams<T>&) { return z * logistic<T, M>(z); }
  template <class T, class M>
  static MAPOPT_INLINE T derivative(T z, const ActivationParams<T>&) {
    const T s = logistic<T, M>(z);
    return s * (T(1) + z * (T(1) - s));
  }
  template <class T, class M>
  static MAPOPT_INLINE T second_derivative(T z, const ActivationParams<T>&) {
    const T s = logistic<T, M>(z);
    return s * (T(1) - s) * (T(2) + z * (T(1) - T(2) * s));
  }
};

template <>
struct ActivationFn<Activation::Gelu> {
  // z Φ(z), Φ the standard normal cdf, ϕ its pdf.
  template <class T, class M>
  static MAPOPT_INLINE T cdf(T z) {
    return T(0.5f) * (T(1) + M::erf(z * T(0.70710678118654752440)));
  }
  template <class T, class M>
  static MAPOPT_INLINE T pdf(T z) {
    return T(0.39894228040143267794) * M::exp(T(-0.5f) * z * z);
  }
  template <class T, class M>
  static MAPOPT_INLINE T value(T z, const ActivationParams<T>&) { return z * cdf<T, M>(z); }
  template <class T, class M>
  static MAPOPT_INLINE T derivative(T z, const ActivationParams<T>&) {
    return cdf<T, M>(z) + z * pdf<T, M>(z);
  }
  template <class T, class M>
  static MAPOPT_INLINE T second_derivative(T z, const ActivationParams<T>&) {
    return pdf<T, M>(z) * (T(2) - z * z);
  }
};

template <>
struct ActivationFn<Activation::Elu> {
  // At z = 0 the left branch, as torch.nn.functional.elu's gradient takes it.
  template <class T, class M>
  static MAPOPT_INLINE T value(T z, const ActivationParams<T>& p) {
    return M::select_le0(z, p.alpha * (M::exp(z) - T(1)), z);
  }
  template <class T, class M>
  static MAPOPT_INLINE T derivative(T z, const ActivationParams<T>& p) {
    return M::select_le0(z, p.alpha * M::exp(z), T(1));
  }
  template <class T, class M>
  static MAPOPT_INLINE T second_derivative(T z, const ActivationParams<T>& p) {
    return M::select_le0(z, p.alpha * M::exp(z), T(0));
  }
};

// The piecewise-linear ones have no second_derivative: hessian_term smooths them.
template <>
struct ActivationFn<Activation::Relu> {
  template <class T, class M>
  static MAPOPT_INLINE T value(T z, const ActivationParams<T>&) {
    return M::select_le0(z, T(0), z);
  }
  template <class T, class M>
  static MAPOPT_INLINE T derivative(T z, const ActivationParams<T>&) {
    return M::select_le0(z, T(0), T(1));
  }
};

template <>
struct ActivationFn<Activation::LeakyRelu> {
  template <class T, class M>
  static MAPOPT_INLINE T value(T z, const ActivationParams<T>& p) {
    return M::select_le0(z, p.negative_slope * z, z);
  }
  template <class T, class M>
  static MAPOPT_INLINE T derivative(T z, const ActivationParams<T>& p) {
    return M::select_le0(z, p.negative_slope, T(1));
  }
};

template <>
struct ActivationFn<Activation::Identity> {
  template <class T, class M>
  static MAPOPT_INLINE T value(T z, const ActivationParams<T>&) { return z; }
  template <class T, class M>
  static MAPOPT_INLINE T derivative(T, const ActivationParams<T>&) { return T(1); }
};

// ‖∇²f(x)‖_F² of one output element: φ''(z)² s² (§2.1), or for a piecewise-linear activation the
// Gaussian-smoothed value (§2.2). s is ‖w_k‖² (dense) or s_{c,p} (convolution). A unit with s = 0
// is constant in x and scores 0.
template <Activation A, class T, class M>
MAPOPT_INLINE T hessian_term(T z, T s, const ActivationParams<T>& p) {
  if constexpr (is_piecewise_linear(A)) {
    const T smoothed = p.kink_scale * s * M::exp((T(0) - z * z) * p.inv_sigma2 / s);
    return M::select_le0(s, T(0), smoothed);
  } else {
    const T h = ActivationFn<A>::template second_derivative<T, M>(z, p) * s;
    return h * h;
  }
}

// Calls f(std::integral_constant<Activation, A>{}) for the runtime activation a, so kernels are
// compiled once per activation with its math inlined.
template <class F>
inline void dispatch_activation(Activation a, F&& f) {
  switch (a) {
    case Activation::Tanh: f(std::integral_constant<Activation, Activation::Tanh>{}); break;
    case Activation::Sigmoid: f(std::integral_constant<Activation, Activation::Sigmoid>{}); break;
    case Activation::Softplus: f(std::integral_constant<Activation, Activation::Softplus>{}); break;
    case Activation::Silu: f(std::integral_constant<Activation, Activation::Silu>{}); break;
    case Activation::Gelu: f(std::integral_constant<Activation, Activation::Gelu>{}); break;
    case Activation::Elu: f(std::integral_constant<Activation, Activation::Elu>{}); break;
    case Activation::Relu: f(std::integral_constant<Activation, Activation::Relu>{}); break;
    case Activation::LeakyRelu:
      f(std::integral_constant<Activation, Activation::LeakyRelu>{});
      break;
    case Activation::Identity: f(std::integral_constant<Activation, Activation::Identity>{}); break;
  }
}

}  // namespace mapopt
