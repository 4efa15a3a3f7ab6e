// CPU helpers: the vectorised math policy for csrc/common's templates, partial loads/stores, and
// a parallel loop over (row, column range) segments of a (rows, H) problem.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>

namespace mapopt::cpu {

using at::vec::Vectorized;

// float tanh of our own. Why: the gate math of a recurrent step takes a few tanh per element, and
// SLEEF's 1-ulp tanh behind Vectorized costs 24 ns per 16 floats on this project's Zen 4 machines
// (its exp 5 ns): a third of an LSTM layer's time above its matrix products (bench_rnn.py,
// T = 100, B = 64, H = 512). This one is within 1 ulp too (tests/cpp/test_vec_math.cpp), at
// 10 ns. float64 keeps SLEEF.
inline Vectorized<float> tanh_f32(const Vectorized<float>& x) {
  using V = Vectorized<float>;
  const V a = x.abs();
  // |x| >= 0.625: 1 - 2 / (e^{2|x|} + 1), without cancellation since the result is above 0.55.
  V big = V(1.f) - V(2.f) / ((a + a).exp() + V(1.f));
  big = V::blendv(big, V(0.f) - big, x < V(0.f));
  // |x| < 0.625: x + x^3 P(x^2), P fitted by least squares to (tanh(x) - x) / x^3 (relative error
  // 0.04 ulp before rounding).
  const V u = x * x;
  V p = at::vec::fmadd(u, V(-0.005691985599696636f), V(0.020626291632652283f));
  p = at::vec::fmadd(p, u, V(-0.05373531952500343f));
  p = at::vec::fmadd(p, u, V(0.13331381976604462f));
  p = at::vec::fmadd(p, u, V(-0.3333328068256378f));
  const V small = at::vec::fmadd(x * u, p, x);
  return V::blendv(big, small, a < V(0.625f));
}

// exp / sin / cos / tanh / erf / log1p of a SIMD vector: SLEEF under ATen's Vectorized, except
// float tanh (above).
struct VecMath {
  template <class V>
  static V exp(const V& x) { return x.exp(); }
  template <class V>
  static V sin(const V& x) { return x.sin(); }
  template <class V>
  static V cos(const V& x) { return x.cos(); }
  template <class V>
  static V tanh(const V& x) { return x.tanh(); }
  static Vectorized<float> tanh(const Vectorized<float>& x) { return tanh_f32(x); }
  template <class V>
  static V erf(const V& x) { return x.erf(); }
  template <class V>
  static V log1p(const V& x) { return x.log1p(); }
  // c <= 0 ? a : b per lane (a NaN c selects b)
  template <class V>
  static V select_le0(const V& c, const V& a, const V& b) { return V::blendv(b, a, c <= V(0)); }
};

// The first n (<= Vectorized::size()) elements at p; the rest of the vector is zero.
template <class scalar_t>
inline Vectorized<scalar_t> load(const scalar_t* p, int64_t n) {
  return n == Vectorized<scalar_t>::size() ? Vectorized<scalar_t>::loadu(p)
                                           : Vectorized<scalar_t>::loadu(p, n);
}

template <class scalar_t>
inline void store(const Vectorized<scalar_t>& v, scalar_t* p, int64_t n) {
  v.store(p, static_cast<int>(n));
}

// The rows of a 2-D tensor with unit column stride, resolved once per kernel call: rows[b] is
// row b's first element, or null for an undefined tensor (an absent input or output).
template <class T>
struct Rows {
  T* first = nullptr;
  int64_t stride = 0;
  T* operator[](int64_t b) const { return first ? first + b * stride : nullptr; }
};

template <class scalar_t>
inline Rows<const scalar_t> rows_in(const at::Tensor& t) {
  if (!t.defined()) return {};
  return {t.const_data_ptr<scalar_t>(), t.stride(0)};
}

template <class scalar_t>
inline Rows<scalar_t> rows_out(const at::Tensor& t) {
  if (!t.defined()) return {};
  return {t.data_ptr<scalar_t>(), t.stride(0)};
}

// Elements per task: the gate math costs tens of flops an element, so smaller than ATen's
// default grain for a plain add.
constexpr int64_t kPointwiseGrain = 4096;

// Calls fn(row, j0, j1) over the elements [0, rows*H) split across threads, so a single long
// row (batch 1, large H) still runs in parallel.
template <class F>
inline void parallel_segments(int64_t rows, int64_t H, const F& fn) {
  at::parallel_for(0, rows * H, kPointwiseGrain, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end;) {
      const int64_t row = e / H;
      const int64_t j0 = e - row * H;
      const int64_t j1 = std::min(H, j0 + (end - e));
      fn(row, j0, j1);
      e += j1 - j0;
    }
  });
}

}  // namespace mapopt::cpu
