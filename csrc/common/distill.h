// The per-row math of the distillation loss (MATH.md §3), written once for the CPU kernels
// (V = at::vec::Vectorized lanes, or a scalar for row tails) and the CUDA kernels (V = float or
// double per thread). Torch-free.
//
// The forward reads a row once, accumulating its softmax normalisers online (running max and
// sum, rescaled when the max grows), and keeps their logs (KdRowTotals, 3 numbers a row); the
// backward reads the row once more to write the gradient from them.
#pragma once

#include <cmath>

#include "macros.h"
#include "scalar_math.h"

namespace mapopt {

enum class Distance : int { kL2 = 0, kKL = 1 };
constexpr int kNumDistances = 2;
constexpr const char* kDistanceNames[kNumDistances] = {"l2", "kl"};

// ScalarMath plus what the online softmax needs: a NaN-propagating max, and log.
struct DistillScalarMath : ScalarMath {
  template <class T>
  static MAPOPT_INLINE T max(T a, T b) { return (a > b || a != a) ? a : b; }
  static MAPOPT_INLINE float log(float x) { return ::logf(x); }
  static MAPOPT_INLINE double log(double x) { return ::log(x); }
};

// Running log-sum-exp of a stream of values, lane-wise: m is at least every value seen, z is
// Σ exp(x - m). Starting from m = lowest finite (not -inf) keeps exp(m_old - m_new) free of
// -inf - -inf.
template <class V, class M>
struct OnlineLse {
  V m, z;

  MAPOPT_INLINE void reset(const V& lowest) {
    m = lowest;
    z = V(0);
  }
  // Before adding values that are all <= group_max; returns the factor old sums were scaled by.
  MAPOPT_INLINE V raise(const V& group_max) {
    const V new_m = M::max(m, group_max);
    const V r = M::exp(m - new_m);
    z = z * r;
    m = new_m;
    return r;
  }
  MAPOPT_INLINE V add(const V& x) {
    const V e = M::exp(x - m);
    z = z + e;
    return e;
  }
  // Scalar states only (thread / lane combination).
  MAPOPT_INLINE void combine(const OnlineLse& o) {
    const V new_m = M::max(m, o.m);
    z = z * M::exp(m - new_m) + o.z * M::exp(o.m - new_m);
    m = new_m;
  }
  MAPOPT_INLINE V log_sum_exp() const { return m + M::log(z); }
};

// What one call computes, per row b: L_b = ce_weight·CE_b + dist_weight·D_b (MATH.md §3;
// ce_weight = 1 - α and dist_weight = α with a target, 0 and 1 without one).
template <class T>
struct KdParams {
  Distance distance;
  bool ce;           // ce_weight != 0: the softmax of s is needed
  bool share;        // KL at T = 1: softmax(s/T) is softmax(s), accumulated once
  T ce_weight, dist_weight, temperature, inv_temperature;

  static MAPOPT_INLINE KdParams make(Distance d, bool has_target, double alpha, double temp) {
    KdParams k;
    k.distance = d;
    k.ce_weight = static_cast<T>(has_target ? 1.0 - alpha : 0.0);
    k.dist_weight = static_cast<T>(has_target ? alpha : 1.0);
    k.ce = k.ce_weight != T(0);
    k.share = d == Distance::kKL && k.ce && temp == 1.0;
    k.temperature = static_cast<T>(temp);
    k.inv_temperature = static_cast<T>(1.0 / temp);
    return k;
  }
};

// The running sums of one row (or one lane / thread's share of it).
template <class V, class M>
struct KdRowState {
  OnlineLse<V, M> s;     // softmax(s): CE
  OnlineLse<V, M> q, p;  // softmax(s/T), softmax(t/T): KL
  V cross;               // Σ exp(t/T - p.m) (t - s)/T, kept relative to p.m
  V sq;                  // Σ (s - t)²: l2

  MAPOPT_INLINE void reset(const V& lowest) {
    s.reset(lowest);
    q.reset(lowest);
    p.reset(lowest);
    cross = V(0);
    sq = V(0);
  }

  // Adds n <= G values of student (xs) and teacher (xt) logits: each normaliser is raised once
  // per group, so an element costs one exp per softmax.
  template <int G, class T>
  MAPOPT_INLINE void add_group(const V* xs, const V* xt, int n, const KdParams<T>& k) {
    if (k.ce) {
      V mx = xs[0];
      for (int i = 1; i < n; ++i) mx = M::max(mx, xs[i]);
      s.raise(mx);
      for (int i = 0; i < n; ++i) s.add(xs[i]);
    }
    if (k.distance == Distance::kL2) {
      for (int i = 0; i < n; ++i) {
        const V d = xs[i] - xt[i];
        sq = sq + d * d;
      }
      return;
    }
    const V it(k.inv_temperature);
    V ss[G], ts[G];
    for (int i = 0; i < n; ++i) {
      ss[i] = xs[i] * it;
      ts[i] = xt[i] * it;
    }
    V mq = ss[0], mp = ts[0];
    for (int i = 1; i < n; ++i) {
      mq = M::max(mq, ss[i]);
      mp = M::max(mp, ts[i]);
    }
    if (!k.share) {
      q.raise(mq);
      for (int i = 0; i < n; ++i) q.add(ss[i]);
    }
    cross = cross * p.raise(mp);
    for (int i = 0; i < n; ++i) cross = cross + p.add(ts[i]) * (ts[i] - ss[i]);
  }

  // Moves each softmax's running sums to a new reference max (>= the current one).
  MAPOPT_INLINE void rebase(const V& ms, const V& mq, const V& mp) {
    s.raise(ms);
    q.raise(mq);
    cross = cross * p.raise(mp);
  }

  // Scalar states only.
  MAPOPT_INLINE void combine(const KdRowState& o) {
    s.combine(o.s);
    q.combine(o.q);
    const V new_m = M::max(p.m, o.p.m);
    cross = cross * M::exp(p.m - new_m) + o.cross * M::exp(o.p.m - new_m);
    p.combine(o.p);
    sq = sq + o.sq;
  }
};

// A finished row: its loss (before the target term) and the log-normalisers the gradient needs
// (the kKdRowStats numbers the forward op saves per row, in this order).
template <class T>
struct KdRowTotals {
  T lse_s, lse_q, lse_p;
  T loss;  // ce_weight·lse_s + dist_weight·D_b; the caller subtracts ce_weight·s_y
};
constexpr int kKdRowStats = 3;

template <class T, class M>
MAPOPT_INLINE KdRowTotals<T> kd_finish(const KdRowState<T, M>& st, const KdParams<T>& k) {
  KdRowTotals<T> r;
  r.lse_s = k.ce ? st.s.log_sum_exp() : T(0);
  r.loss = k.ce_weight * r.lse_s;
  if (k.distance == Distance::kL2) {
    r.lse_q = r.lse_p = T(0);
    r.loss += k.dist_weight * st.sq;
    return r;
  }
  // T² Σ p (log p - log q) = T² (Σ p (t - s)/T - lse(t/T) + lse(s/T)), since Σ p = 1.
  r.lse_q = k.share ? r.lse_s : st.q.log_sum_exp();
  r.lse_p = st.p.log_sum_exp();
  const T kl = st.cross / st.p.z - r.lse_p + r.lse_q;
  r.loss += k.dist_weight * k.temperature * k.temperature * kl;
  return r;
}

// ∂L_b/∂s_j without the one-hot term (the caller subtracts ce_weight at j = y):
// ce_weight·softmax(s)_j + dist_weight·(2(s - t) or T(q - p)).
template <class V, class M, class T>
MAPOPT_INLINE V kd_grad(const V& xs, const V& xt, const KdRowTotals<T>& r, const KdParams<T>& k) {
  V g(0), soft_s(0);
  if (k.ce) {
    soft_s = M::exp(xs - V(r.lse_s));
    g = V(k.ce_weight) * soft_s;
  }
  if (k.distance == Distance::kL2) return g + V(T(2) * k.dist_weight) * (xs - xt);
  const V it(k.inv_temperature);
  const V q = k.share ? soft_s : M::exp(xs * it - V(r.lse_q));
  return g + V(k.dist_weight * k.temperature) * (q - M::exp(xt * it - V(r.lse_p)));
}

}  // namespace mapopt
