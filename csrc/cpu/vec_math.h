// CPU helpers: the vectorised math policy for csrc/common's templates, partial loads/stores, and
// a parallel loop over (row, column range) segments of a (rows, H) problem.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>

namespace mapopt::cpu {

using at::vec::Vectorized;

// exp / sin / cos / tanh / erf / log1p of a SIMD vector (SLEEF under ATen's Vectorized).
struct VecMath {
  template <class V>
  static V exp(const V& x) { return x.exp(); }
  template <class V>
  static V sin(const V& x) { return x.sin(); }
  template <class V>
  static V cos(const V& x) { return x.cos(); }
  template <class V>
  static V tanh(const V& x) { return x.tanh(); }
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

// Row b of a 2-D tensor with unit column stride, to read (null when t is undefined: an absent
// input) or to write.
template <class scalar_t>
inline const scalar_t* row_in(const at::Tensor& t, int64_t b) {
  return t.defined() ? t.const_data_ptr<scalar_t>() + b * t.stride(0) : nullptr;
}

template <class scalar_t>
inline scalar_t* row_out(const at::Tensor& t, int64_t b) {
  return t.data_ptr<scalar_t>() + b * t.stride(0);
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
