// Elementary functions for one scalar (float or double), callable from host and device code.
// The math headers (gates.h, cells.h, activations.h) are templates over a value type T and a policy M that
// supplies exp / sin / cos / tanh: this policy for scalars (CUDA kernels), a vectorised one for the
// CPU kernels (cpu/vec_math.h). Torch-free.
#pragma once

#include <cmath>

#include "macros.h"

namespace mapopt {

struct ScalarMath {
  static MAPOPT_INLINE float exp(float x) { return ::expf(x); }
  static MAPOPT_INLINE double exp(double x) { return ::exp(x); }
  static MAPOPT_INLINE float sin(float x) { return ::sinf(x); }
  static MAPOPT_INLINE double sin(double x) { return ::sin(x); }
  static MAPOPT_INLINE float cos(float x) { return ::cosf(x); }
  static MAPOPT_INLINE double cos(double x) { return ::cos(x); }
  static MAPOPT_INLINE float tanh(float x) { return ::tanhf(x); }
  static MAPOPT_INLINE double tanh(double x) { return ::tanh(x); }
  static MAPOPT_INLINE float erf(float x) { return ::erff(x); }
  static MAPOPT_INLINE double erf(double x) { return ::erf(x); }
  static MAPOPT_INLINE float log1p(float x) { return ::log1pf(x); }
  static MAPOPT_INLINE double log1p(double x) { return ::log1p(x); }
  // c <= 0 ? a : b (a NaN c selects b)
  template <class T>
  static MAPOPT_INLINE T select_le0(T c, T a, T b) { return c <= T(0) ? a : b; }
};

}  // namespace mapopt
