// The CPU layers' matrix products, by our own register-blocked kernel over weights regrouped by
// vectors of hidden units (PackedUnits): the input projection of a block of steps, and each step's
// recurrent product h W_hhᵀ (+ b_hh), which hands every block of gate pre-activations straight to
// the pointwise math while it is in L1.
//
// Why not oneDNN: a step's product is small (B rows), so oneDNN's call through ATen costs about
// 20 us, and its output, a fresh tensor every step, is first-touched memory that glibc keeps handing
// back to the kernel. This kernel makes a product at the same rate as oneDNN (110 GFLOP/s a core on
// Zen 4 at T = 100, B = 64, H = 512), allocates nothing and writes into buffers the layers keep
// between calls (scratch.h), so a layer call touches no fresh memory but its outputs.
#pragma once

#include <ATen/ATen.h>
#include <ATen/ceil_div.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <optional>
#include <utility>

#include "vec_math.h"

namespace mapopt::cpu {

// Vector registers of the SIMD level: a block keeps rows x chunks accumulators, one weight vector
// per gate and the broadcast value of h.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kVectorRegisters = 32;
#else
constexpr int kVectorRegisters = 16;
#endif

template <int chunks>
constexpr int block_rows() {
  return std::max(1, (kVectorRegisters - chunks - 2) / chunks);
}

// Multiply-adds per task below which fewer threads share a step: a smaller task costs less than
// handing it to a thread.
constexpr int64_t kMinStepWork = int64_t{1} << 16;

// A layer weight (chunks*H, K) (W_ih: K = input size, W_hh: K = H) regrouped by vectors of
// hidden units: group g holds, for every k, the weights of units [g L, g L + L) of each gate, as
// `chunks` consecutive vectors (w[g][k][gate][lane], L = Vectorized<scalar_t>::size()); the bias
// likewise b[g][gate][lane]. Units past H (the last group's tail) have zero weights.
struct PackedUnits {
  at::Tensor w;    // (groups, K, chunks, L)
  at::Tensor b;    // (groups, chunks, L), or undefined
  int64_t units;   // H
  int64_t groups() const { return w.size(0); }
  int64_t depth() const { return w.size(1); }
  int64_t chunks() const { return w.size(2); }
};

// (chunks*H, cols) rows regrouped into `packed` (groups, cols, chunks, L) as PackedUnits lays
// them out, units past H zero: one pass, each group's block filled while it is in cache.
template <class scalar_t>
void regroup_units(const at::Tensor& t, int64_t chunks, int64_t H, at::Tensor& packed) {
  constexpr int64_t L = Vectorized<scalar_t>::size();
  const at::Tensor src = t.contiguous();
  const int64_t groups = at::ceil_div(H, L), cols = src.size(1);
  const scalar_t* from = src.const_data_ptr<scalar_t>();
  scalar_t* to = packed.data_ptr<scalar_t>();
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      for (int64_t c = 0; c < chunks; ++c) {
        for (int64_t lane = 0; lane < L; ++lane) {
          const int64_t unit = g * L + lane;
          const scalar_t* row = unit < H ? from + (c * H + unit) * cols : nullptr;
          scalar_t* dst = to + (g * cols * chunks + c) * L + lane;
          for (int64_t k = 0; k < cols; ++k) dst[k * chunks * L] = row ? row[k] : scalar_t(0);
        }
      }
    }
  });
}

// w (chunks*H, K) and b (chunks*H) packed into `storage` (at least packed_units_size elements);
// the result views it.
template <class scalar_t>
int64_t packed_units_size(int64_t chunks, int64_t H, int64_t K) {
  constexpr int64_t L = Vectorized<scalar_t>::size();
  return at::ceil_div(H, L) * (K + 1) * chunks * L;
}

template <class scalar_t>
PackedUnits pack_units(const at::Tensor& w, const std::optional<at::Tensor>& b, int64_t chunks,
                       const at::Tensor& storage) {
  constexpr int64_t L = Vectorized<scalar_t>::size();
  const int64_t H = w.size(0) / chunks, K = w.size(1), groups = at::ceil_div(H, L);
  const int64_t w_size = groups * K * chunks * L;
  PackedUnits p;
  p.units = H;
  p.w = storage.narrow(0, 0, w_size).view({groups, K, chunks, L});
  regroup_units<scalar_t>(w, chunks, H, p.w);
  if (b) {
    p.b = storage.narrow(0, w_size, groups * chunks * L).view({groups, 1, chunks, L});
    regroup_units<scalar_t>(b->reshape({chunks * H, 1}), chunks, H, p.b);
    p.b = p.b.view({groups, chunks, L});
  }
  return p;
}

// out[r][c][lane] = b[c][lane] + sum_k h[r][k] w[k][c][lane] for R rows of h (row stride ldh)
// against one group's weights; out holds R * C vectors.
template <int C, int R, class scalar_t>
void product_block(const scalar_t* h, int64_t ldh, const scalar_t* w, const scalar_t* b,
                   int64_t K, scalar_t* out) {
  using V = Vectorized<scalar_t>;
  constexpr int L = V::size();
  V acc[R][C];
  for (int c = 0; c < C; ++c) {
    const V init = b ? V::loadu(b + c * L) : V(scalar_t(0));
    for (int r = 0; r < R; ++r) acc[r][c] = init;
  }
  for (int64_t k = 0; k < K; ++k) {
    V wk[C];
    for (int c = 0; c < C; ++c) wk[c] = V::loadu(w + (k * C + c) * L);
    for (int r = 0; r < R; ++r) {
      const V a(h[r * ldh + k]);
      for (int c = 0; c < C; ++c) acc[r][c] = at::vec::fmadd(a, wk[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) acc[r][c].store(out + (r * C + c) * L);
  }
}

// product_block for a run-time row count 1 <= rows <= block_rows<C>().
template <int C, class scalar_t, int... R>
void product_rows(int rows, const scalar_t* h, int64_t ldh, const scalar_t* w, const scalar_t* b,
                  int64_t K, scalar_t* out, std::integer_sequence<int, R...>) {
  using Fn = void (*)(const scalar_t*, int64_t, const scalar_t*, const scalar_t*, int64_t,
                      scalar_t*);
  static constexpr Fn kByRows[] = {&product_block<C, R + 1, scalar_t>...};
  kByRows[rows - 1](h, ldh, w, b, K, out);
}

// For the (n, K) rows x: the product x Wᵀ + b of a packed weight, one group of units and a block
// of rows at a time, split over threads by groups; after each block, fn(row, j0, j1, p) for each
// of its rows, where units [j0, j1) are the group's and gate c of unit j is at p[c * L + j - j0].
template <int C, class scalar_t, class F>
void for_each_product_row(const PackedUnits& pw, const at::Tensor& x, const F& fn) {
  using V = Vectorized<scalar_t>;
  constexpr int L = V::size();
  constexpr int MR = block_rows<C>();
  TORCH_INTERNAL_ASSERT(pw.chunks() == C && x.size(1) == pw.depth());
  const at::Tensor xc = x.contiguous();
  const int64_t n = xc.size(0), K = pw.depth(), H = pw.units;
  const scalar_t* xp = xc.const_data_ptr<scalar_t>();
  const scalar_t* wp = pw.w.const_data_ptr<scalar_t>();
  const scalar_t* bp = pw.b.defined() ? pw.b.const_data_ptr<scalar_t>() : nullptr;
  // Threads take groups one at a time from a shared counter rather than a fixed share each: on
  // a shared machine one thread is often held up for part of a step, and with fixed shares the
  // others would wait for it at the step's end.
  const int64_t groups = pw.groups();
  const int64_t grain = std::max<int64_t>(1, kMinStepWork / std::max<int64_t>(1, n * K * C * L));
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), at::ceil_div(groups, grain));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    alignas(64) scalar_t block[MR * C * L];
    for (int64_t g; (g = next.fetch_add(1, std::memory_order_relaxed)) < groups;) {
      const scalar_t* wg = wp + g * K * C * L;
      const scalar_t* bg = bp ? bp + g * C * L : nullptr;
      const int64_t j0 = g * L, j1 = std::min(H, j0 + L);
      // Blocks of at most MR rows, as even as they come (8 rows: 4 + 4, not 6 + 2): a block of
      // few rows loads a weight vector for few multiply-adds.
      const int64_t blocks = at::ceil_div<int64_t>(n, MR);
      for (int64_t i = 0, m = 0; i < blocks; ++i) {
        const int rows = static_cast<int>(at::ceil_div<int64_t>(n - m, blocks - i));
        product_rows<C>(rows, xp + m * K, K, wg, bg, K, block,
                        std::make_integer_sequence<int, MR>{});
        for (int r = 0; r < rows; ++r) fn(m + r, j0, j1, block + r * C * L);
        m += rows;
      }
    }
  });
}

}  // namespace mapopt::cpu
