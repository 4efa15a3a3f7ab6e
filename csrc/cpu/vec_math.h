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

// float exp and tanh of our own, inline. Why: the gate math of a recurrent step takes five
// exp / tanh per unit, and SLEEF's functions behind Vectorized are calls, around which every live
// vector register is spilled; SLEEF's tanh also costs 24 ns per 16 floats on this project's Zen 4
// machines. These inline into the unit's math: an LSTM unit's forward takes 25 instead of 51 ns per
// 16 units in a hot loop (tests/cpp/test_vec_math.cpp checks both within 2 ulp of libm at every
// SIMD level).

// v 2^n for n a float holding an integer in [-150, 130]: one scalef on AVX-512 (which rounds a
// denormal result once); elsewhere a product by two powers of two, each a normal float.
inline Vectorized<float> times_pow2(const Vectorized<float>& v, const Vectorized<float>& n) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_scalef_ps(v, n);
#else
  using I = Vectorized<int32_t>;
  const I ni = at::vec::convert_to_int_of_same_size(n);
  const I n1 = ni >> I(1);
  const auto pow2 = [](const I& k) { return at::vec::cast<float>((k + I(127)) << I(23)); };
  return v * pow2(n1) * pow2(ni - n1);
#endif
}

// For y (NaN or in [-104, 89]): n and r with y = n ln 2 + r, |r| <= ln(2)/2 (ln 2 in two parts,
// so r is exact), and e^r - 1 by its Taylor polynomial of degree 7 (truncation 0.05 ulp); e^y is
// times_pow2(1 + (e^r - 1), n).
struct ExpParts {
  Vectorized<float> em1_r, n;
};

inline ExpParts exp_parts(const Vectorized<float>& y) {
  using V = Vectorized<float>;
  const V n = (y * V(1.44269504088896341f)).round();
  V r = at::vec::fmadd(n, V(-0.693145751953125f), y);
  r = at::vec::fmadd(n, V(-1.42860682030941723e-6f), r);
  V p = at::vec::fmadd(r, V(1.f / 5040), V(1.f / 720));
  p = at::vec::fmadd(p, r, V(1.f / 120));
  p = at::vec::fmadd(p, r, V(1.f / 24));
  p = at::vec::fmadd(p, r, V(1.f / 6));
  p = at::vec::fmadd(p, r, V(0.5f));
  // r + r^2 (1/2 + ...), the small term rounded apart: within about half an ulp.
  return {at::vec::fmadd(p * r, r, r), n};
}

// e^x; NaN stays NaN, below -104 the result is 0, above 89 infinity. The clamps keep NaN (ATen's
// clamp puts x second in the SIMD min / max, which return their second operand on NaN).
inline Vectorized<float> exp_f32(const Vectorized<float>& x) {
  using V = Vectorized<float>;
  const ExpParts e = exp_parts(at::vec::clamp(x, V(-104.f), V(89.f)));
  return times_pow2(e.em1_r + V(1.f), e.n);
}

// tanh|x| = m / (m + 2) with m = e^{2|x|} - 1 = 2^n (e^r - 1) + (2^n - 1), which has no
// cancellation near 0; |x| is clamped to 9.1, where tanh rounds to 1. The sign is x's.
inline Vectorized<float> tanh_f32(const Vectorized<float>& x) {
  using V = Vectorized<float>;
  const V a = at::vec::clamp_max(x.abs(), V(9.1f));
  const ExpParts e = exp_parts(a + a);
  const V s = times_pow2(V(1.f), e.n);
  const V m = at::vec::fmadd(s, e.em1_r, s - V(1.f));
  return (m / (m + V(2.f))) | (x & V(-0.f));
}

// exp / sin / cos / tanh / erf / log1p of a SIMD vector: SLEEF under ATen's Vectorized, except
// float exp and tanh (above).
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
  static Vectorized<float> exp(const Vectorized<float>& x) { return exp_f32(x); }
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
