// The CPU layers' matrix products, by our own register-blocked kernel over weights regrouped by
// vectors of hidden units (PackedUnits): the input projection of a block of steps, each step's
// recurrent product h W_hhᵀ (+ b_hh; in LSTM inference summed with the step's projection), which
// hands every block of gate pre-activations straight to the pointwise math while it is in L1, and
// the backward's step product d W_hh (by columns).
//
// Why not oneDNN: a step's product is small (B rows), so oneDNN's call through ATen costs about
// 20 us, and its output, a fresh tensor every step, is first-touched memory that glibc keeps handing
// back to the kernel. This kernel makes a product at the same rate as oneDNN (110 GFLOP/s a core on
// Zen 4 at T = 100, B = 64, H = 512), allocates nothing and writes into buffers the layers keep
// between calls (scratch.h, recycled_buffer.h), so a layer call touches no fresh memory.
#pragma once

#include <ATen/ATen.h>
#include <ATen/ceil_div.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

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
// By columns instead (a plain product: the backward's d W_hh), a weight (M, K) is regrouped by
// runs of chunks*L output columns: group g's vector c holds columns (g chunks + c) L + lane.
struct PackedUnits {
  at::Tensor w;       // (groups, K, chunks, L)
  at::Tensor b;       // (groups, chunks, L), or undefined
  int64_t units = 0;  // H (by columns: M)
  int64_t span = 0;   // units of a group: L (by columns: chunks L)
  int64_t groups() const { return w.size(0); }
  int64_t depth() const { return w.size(1); }
  int64_t chunks() const { return w.size(2); }
};

template <class scalar_t>
int64_t packed_span(int64_t chunks, bool by_columns) {
  return (by_columns ? chunks : 1) * Vectorized<scalar_t>::size();
}

// Elements of the storage pack_units needs for a (chunks*H, K) weight and its bias (by columns:
// (M, K) with units = M).
template <class scalar_t>
int64_t packed_units_size(int64_t chunks, int64_t units, int64_t K, bool by_columns) {
  return at::ceil_div(units, packed_span<scalar_t>(chunks, by_columns)) * (K + 1) * chunks *
         Vectorized<scalar_t>::size();
}

// Elements below which regroup_units runs on the calling thread: a parallel region costs more
// than regrouping a small weight.
constexpr int64_t kRegroupGrain = int64_t{1} << 16;

// The rows of t (any strides: a transposed weight is read in place) regrouped into `packed`
// (groups, cols, chunks, L) as PackedUnits lays them out, units past the last zero. Vector c of
// group g takes L consecutive rows of t, so each is a transposed (L, cols) tile: ATen's SIMD
// transpose when t's rows are contiguous (W), else a strided copy (contiguous runs for a Wᵀ).
template <class scalar_t>
void regroup_units(const at::Tensor& t, int64_t chunks, int64_t units, bool by_columns,
                   at::Tensor& packed) {
  constexpr int64_t L = Vectorized<scalar_t>::size();
  const int64_t groups = packed.size(0), cols = t.size(1), width = chunks * L;
  const int64_t s0 = t.stride(0), s1 = t.stride(1);
  const scalar_t* from = t.const_data_ptr<scalar_t>();
  scalar_t* to = packed.data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, kRegroupGrain / std::max<int64_t>(1, cols * width));
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      for (int64_t c = 0; c < chunks; ++c) {
        // Units (by columns: columns) [u0, u0 + m) of vector c are rows [row0, row0 + m) of t.
        const int64_t u0 = by_columns ? (g * chunks + c) * L : g * L;
        const int64_t m = std::clamp<int64_t>(units - u0, 0, L);
        const int64_t row0 = by_columns ? u0 : c * units + u0;
        scalar_t* dst = to + g * cols * width + c * L;  // (k, lane) at dst[k width + lane]
        if (m < L) {
          for (int64_t k = 0; k < cols; ++k) std::fill_n(dst + k * width + m, L - m, scalar_t(0));
        }
        if (m == 0) continue;
        const scalar_t* src = from + row0 * s0;  // (lane, k) at src[lane s0 + k s1]
        if (s1 == 1) {
          at::vec::transpose_mxn<scalar_t>(src, s0, dst, width, static_cast<int>(m),
                                           static_cast<int>(cols));
        } else {
          for (int64_t k = 0; k < cols; ++k) {
            for (int64_t lane = 0; lane < m; ++lane) {
              dst[k * width + lane] = src[lane * s0 + k * s1];
            }
          }
        }
      }
    }
  });
}

// w and b packed into `storage` (at least packed_units_size elements); the result views it.
template <class scalar_t>
PackedUnits pack_units(const at::Tensor& w, const std::optional<at::Tensor>& b, int64_t chunks,
                       bool by_columns, const at::Tensor& storage) {
  constexpr int64_t L = Vectorized<scalar_t>::size();
  PackedUnits p;
  p.units = by_columns ? w.size(0) : w.size(0) / chunks;
  p.span = packed_span<scalar_t>(chunks, by_columns);
  const int64_t K = w.size(1), groups = at::ceil_div(p.units, p.span);
  const int64_t w_size = groups * K * chunks * L;
  p.w = storage.narrow(0, 0, w_size).view({groups, K, chunks, L});
  regroup_units<scalar_t>(w, chunks, p.units, by_columns, p.w);
  if (b) {
    p.b = storage.narrow(0, w_size, groups * chunks * L).view({groups, 1, chunks, L});
    regroup_units<scalar_t>(b->view({-1, 1}), chunks, p.units, by_columns, p.b);
    p.b = p.b.view({groups, chunks, L});
  }
  return p;
}

// out[r][c][lane] = init[r][c][lane] + sum_k h[r][k] w[k][c][lane] for R rows of h (row stride
// ldh) against one group's weights, where init is out itself when `partial` (a sum over an earlier
// range of k), else the bias b[c][lane] (zero if b is null); out holds R * C vectors.
template <int C, int R, class scalar_t>
void product_block(const scalar_t* h, int64_t ldh, const scalar_t* w, const scalar_t* b,
                   bool partial, int64_t K, scalar_t* out) {
  using V = Vectorized<scalar_t>;
  constexpr int L = V::size();
  V acc[R][C];
  for (int c = 0; c < C; ++c) {
    const V bias = b ? V::loadu(b + c * L) : V(scalar_t(0));
    for (int r = 0; r < R; ++r) acc[r][c] = partial ? V::loadu(out + (r * C + c) * L) : bias;
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
                  bool partial, int64_t K, scalar_t* out, std::integer_sequence<int, R...>) {
  using Fn = void (*)(const scalar_t*, int64_t, const scalar_t*, const scalar_t*, bool, int64_t,
                      scalar_t*);
  static constexpr Fn kByRows[] = {&product_block<C, R + 1, scalar_t>...};
  kByRows[rows - 1](h, ldh, w, b, partial, K, out);
}

// Weight rows (k) of a group taken at once: a group's slice of at most 128 KiB stays in L2 while
// every block of rows uses it. Longer products (the backward's K = 4H) run in slices, each block's
// sums kept between them.
template <int C, class scalar_t>
constexpr int64_t depth_slice() {
  return std::max<int64_t>(1, (int64_t{128} << 10) /
                                  (C * Vectorized<scalar_t>::size() * int64_t(sizeof(scalar_t))));
}

// For the (n, K) rows x: the product x Wᵀ + b of a packed weight, plus, where `ph` is given, the
// (n, K') rows h times another weight packed alike and without a bias (an LSTM inference step:
// its input projection and its recurrent product summed in one pass), one group of units and a
// block of rows at a time, split over threads by groups; after each block's last term, fn(row,
// j0, j1, p) for each of its rows, where units [j0, j1) are the group's and gate c of unit j is at
// p[c * L + j - j0] (by columns: column j at p[j - j0]). Rows may have any row stride.
template <int C, class scalar_t, class F>
void for_each_summed_product_row(const PackedUnits& pw, const at::Tensor& x,
                                 const PackedUnits* ph, const at::Tensor& h, const F& fn) {
  using V = Vectorized<scalar_t>;
  constexpr int L = V::size();
  constexpr int MR = block_rows<C>();
  TORCH_INTERNAL_ASSERT(pw.chunks() == C && x.size(1) == pw.depth());
  TORCH_INTERNAL_ASSERT(!ph || (ph->chunks() == C && ph->groups() == pw.groups() &&
                                !ph->b.defined() && h.size(0) == x.size(0) &&
                                h.size(1) == ph->depth()));
  const auto unit_columns = [](const at::Tensor& t) {
    return t.stride(1) == 1 ? t : t.contiguous();
  };
  // The terms of the sum: rows (row stride ld, depth K) and the packed weight of all groups.
  struct Term {
    const scalar_t* rows;
    int64_t ld, K;
    const scalar_t* w;
  };
  const at::Tensor xc = unit_columns(x);
  const at::Tensor hc = ph ? unit_columns(h) : at::Tensor();
  Term terms[2];
  int nterms = 0;
  terms[nterms++] = {xc.const_data_ptr<scalar_t>(), xc.stride(0), pw.depth(),
                     pw.w.const_data_ptr<scalar_t>()};
  if (ph) {
    terms[nterms++] = {hc.const_data_ptr<scalar_t>(), hc.stride(0), ph->depth(),
                       ph->w.const_data_ptr<scalar_t>()};
  }
  const int64_t n = xc.size(0), H = pw.units;
  const scalar_t* bp = pw.b.defined() ? pw.b.const_data_ptr<scalar_t>() : nullptr;
  if (n == 0 || pw.groups() == 0) return;
  // Tasks are a group of units and a range of rows; threads take them one at a time from a shared
  // counter rather than a fixed share each: on a shared machine one thread is often held up for
  // part of a step, and with fixed shares the others would wait for it at the step's end. Rows
  // are split only where there are too few groups to go round the threads (each part reads the
  // group's weights again).
  const int64_t groups = pw.groups(), blocks = at::ceil_div<int64_t>(n, MR);
  const int64_t threads = at::get_num_threads();
  const int64_t parts = std::clamp<int64_t>(at::ceil_div(2 * threads, groups), 1, blocks);
  const int64_t tasks = groups * parts;
  int64_t depth_all = 0;
  for (int t = 0; t < nterms; ++t) depth_all += terms[t].K;
  const int64_t task_work = std::max<int64_t>(1, n * depth_all * C * L / parts);
  const int64_t grain = std::max<int64_t>(1, kMinStepWork / task_work);
  const int64_t workers = std::min<int64_t>(threads, at::ceil_div(tasks, grain));
  // A term deeper than KS runs in slices, each over all of a task's rows, every row's sums kept
  // between them; otherwise each block of rows takes every term in turn, its sums in registers
  // and one small buffer (at H = 128 a few percent faster than term by term).
  constexpr int64_t KS = depth_slice<C, scalar_t>();
  bool sliced = false;
  for (int t = 0; t < nterms; ++t) sliced = sliced || terms[t].K > KS;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    // The sums of a block of rows; of every row when the product runs in slices.
    std::vector<V> sums(static_cast<size_t>((sliced ? n : MR) * C));
    scalar_t* buf = reinterpret_cast<scalar_t*>(sums.data());
    for (int64_t task; (task = next.fetch_add(1, std::memory_order_relaxed)) < tasks;) {
      const int64_t g = task / parts, part = task % parts;
      const scalar_t* bg = bp ? bp + g * C * L : nullptr;
      const int64_t j0 = g * pw.span, j1 = std::min(H, j0 + pw.span);
      // This part's blocks of at most MR rows, as even as they come (8 rows: 4 + 4, not 6 + 2):
      // a block of few rows loads a weight vector for few multiply-adds.
      const int64_t b0 = blocks * part / parts, b1 = blocks * (part + 1) / parts;
      const int64_t m0 = n * b0 / blocks, m1 = n * b1 / blocks;
      // Rows [m, m + rows) times depth [k0, k0 + depth) of term t, added to the block's sums
      // (the bias starts them), then handed to fn after the last slice of the last term.
      const auto slice = [&](int64_t m, int rows, int t, int64_t k0, int64_t depth) {
        const Term& term = terms[t];
        scalar_t* block = buf + (sliced ? m : 0) * C * L;
        product_rows<C>(rows, term.rows + m * term.ld + k0, term.ld,
                        term.w + (g * term.K + k0) * C * L, bg, t > 0 || k0 > 0, depth, block,
                        std::make_integer_sequence<int, MR>{});
        if (t == nterms - 1 && k0 + depth == term.K) {
          for (int r = 0; r < rows; ++r) fn(m + r, j0, j1, block + r * C * L);
        }
      };
      const auto block_rows_at = [&](int64_t i, int64_t m) {
        return static_cast<int>(at::ceil_div<int64_t>(m1 - m, b1 - i));
      };
      if (sliced) {
        for (int t = 0; t < nterms; ++t) {
          // At least one slice, so that a term of depth 0 (an input size of 0) still starts the
          // sums with the bias.
          for (int64_t k0 = 0; k0 == 0 || k0 < terms[t].K; k0 += KS) {
            for (int64_t i = b0, m = m0; i < b1; m += block_rows_at(i, m), ++i) {
              slice(m, block_rows_at(i, m), t, k0, std::min(KS, terms[t].K - k0));
            }
          }
        }
      } else {
        for (int64_t i = b0, m = m0; i < b1; m += block_rows_at(i, m), ++i) {
          for (int t = 0; t < nterms; ++t) slice(m, block_rows_at(i, m), t, 0, terms[t].K);
        }
      }
    }
  });
}

// The product x Wᵀ + b alone (for_each_summed_product_row without the second term).
template <int C, class scalar_t, class F>
void for_each_product_row(const PackedUnits& pw, const at::Tensor& x, const F& fn) {
  for_each_summed_product_row<C, scalar_t>(pw, x, nullptr, at::Tensor(), fn);
}

}  // namespace mapopt::cpu
