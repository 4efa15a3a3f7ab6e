// Accuracy of the CPU kernels' own float exp and tanh (csrc/cpu/vec_math.h) against the double
// precision libm results rounded to float, in ulp of the rounded result, over dense sweeps and the
// special values. Built once per SIMD level the machine runs (CMakeLists.txt), since each level
// compiles the same code to other instructions.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <vector>

#include "cpu/vec_math.h"

namespace {

using mapopt::cpu::Vectorized;
constexpr int kLanes = Vectorized<float>::size();

// |got - want| in units of the spacing of floats at want.
double ulps(float got, float want) {
  if (got == want) return 0;
  const float spacing = std::nextafter(std::fabs(want), std::numeric_limits<float>::infinity()) -
                        std::fabs(want);
  return std::fabs(double(got) - double(want)) / spacing;
}

std::vector<float> apply(Vectorized<float> (*fn)(const Vectorized<float>&),
                         const std::vector<float>& x) {
  std::vector<float> y(x.size());
  for (size_t i = 0; i < x.size(); i += kLanes) {
    const int n = static_cast<int>(std::min<size_t>(kLanes, x.size() - i));
    fn(Vectorized<float>::loadu(x.data() + i, n)).store(y.data() + i, n);
  }
  return y;
}

int failures = 0;

// Max ulp error of fn against ref over x; fails above `bound`.
void check(const char* name, Vectorized<float> (*fn)(const Vectorized<float>&),
           double (*ref)(double), const std::vector<float>& x, double bound) {
  const std::vector<float> y = apply(fn, x);
  double worst = 0;
  float at = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const double e = ulps(y[i], static_cast<float>(ref(x[i])));
    if (!(e <= worst)) worst = e, at = x[i];  // a NaN error counts as the worst
  }
  const bool ok = worst <= bound;
  std::printf("%-6s %zu points: max error %.2f ulp at x = %.9g (bound %.1f)  %s\n", name,
              x.size(), worst, at, bound, ok ? "ok" : "FAIL");
  failures += !ok;
}

// Exact results where they are defined: infinities, NaN, signed zero, saturation.
void check_special(const char* name, Vectorized<float> (*fn)(const Vectorized<float>&),
                   const std::vector<float>& x, const std::vector<float>& want) {
  const std::vector<float> y = apply(fn, x);
  for (size_t i = 0; i < x.size(); ++i) {
    const bool ok = std::isnan(want[i]) ? std::isnan(y[i]) : y[i] == want[i];
    if (!ok) {
      std::printf("%-6s x = %g: got %.9g, want %.9g  FAIL\n", name, x[i], y[i], want[i]);
      ++failures;
    }
  }
}

std::vector<float> linear(double lo, double hi, int n) {
  std::vector<float> x;
  for (int i = 0; i <= n; ++i) x.push_back(static_cast<float>(lo + (hi - lo) * i / n));
  return x;
}

// ±[lo, hi] spaced evenly in log scale: the small arguments where relative error shows.
std::vector<float> logarithmic(double lo, double hi, int n) {
  std::vector<float> x;
  for (int i = 0; i <= n; ++i) {
    const float v = static_cast<float>(lo * std::pow(hi / lo, double(i) / n));
    x.push_back(v);
    x.push_back(-v);
  }
  return x;
}

}  // namespace

int main() {
  using mapopt::cpu::exp_f32;
  using mapopt::cpu::tanh_f32;
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::printf("Vectorized<float>: %d lanes\n", kLanes);

  // Down to -104, where e^x is below half the smallest denormal; up to 89, past overflow.
  check("exp", exp_f32, [](double v) { return std::exp(v); }, linear(-104, 89, 3000000), 2);
  check("exp", exp_f32, [](double v) { return std::exp(v); }, logarithmic(1e-30, 104, 200000), 2);
  check_special("exp", exp_f32, {0.f, -0.f, inf, -inf, nan, 200.f, -200.f, 88.8f},
                {1.f, 1.f, inf, 0.f, nan, inf, 0.f, inf});

  check("tanh", tanh_f32, [](double v) { return std::tanh(v); }, linear(-12, 12, 3000000), 2);
  check("tanh", tanh_f32, [](double v) { return std::tanh(v); }, logarithmic(1e-30, 20, 200000), 2);
  check_special("tanh", tanh_f32, {0.f, -0.f, inf, -inf, nan, 50.f, -50.f, 1e30f},
                {0.f, -0.f, 1.f, -1.f, nan, 1.f, -1.f, 1.f});

  if (failures) std::printf("%d FAILED\n", failures);
  return failures ? 1 : 0;
}
