// CUDA kernels of the distillation ops (MATH.md §3) and their registration. kd_loss forward: one
// block per row, each thread accumulating its strided share of the row online, combined in shared
// memory; backward: one thread per element. half / bfloat16 are computed in float.
// mapping_distance: one launch over a table of fixed-size chunks of every pair.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "../common/distill.h"
#include "../distill.h"

namespace mapopt::cuda {
namespace {

// Elements a thread loads per online group (strided by the block size, so loads coalesce).
constexpr int kGroup = 4;
constexpr int kMaxThreads = 512;
// Threads of the element-wise and chunk kernels.
constexpr int kThreads = 256;

template <class F>
void dispatch(const at::Tensor& t, const F& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(),
                                  "mapopt_native distill", [&] { fn(scalar_t{}); });
}

// Threads per row: a power of two (for the tree reduction), enough for kGroup elements each.
int row_threads(int64_t C) {
  int threads = 32;
  while (threads < kMaxThreads && threads * kGroup < C) threads *= 2;
  return threads;
}

// An index outside [0, C) that is not ignore_index: checking targets on the host would
// synchronise every call, so such a row gets a NaN loss and gradient instead.
__device__ inline bool bad_target(int64_t y, int64_t C) { return y < 0 || y >= C; }

template <class scalar_t>
__global__ void kd_fwd_kernel(int64_t C, const scalar_t* __restrict__ s,
                              const scalar_t* __restrict__ t, const int64_t* __restrict__ y,
                              int64_t ignore_index, KdParams<at::opmath_type<scalar_t>> k,
                              at::opmath_type<scalar_t>* __restrict__ loss,
                              at::opmath_type<scalar_t>* __restrict__ stats) {
  using acc_t = at::opmath_type<scalar_t>;
  using M = DistillScalarMath;
  using State = KdRowState<acc_t, M>;
  extern __shared__ __align__(16) unsigned char smem[];
  State* shared = reinterpret_cast<State*>(smem);

  const int64_t b = blockIdx.x;
  const scalar_t* sb = s + b * C;
  const scalar_t* tb = t + b * C;
  acc_t* stb = stats + b * kKdRowStats;
  const int64_t yb = y ? y[b] : -1;
  if (y && yb == ignore_index) {  // MATH.md §3: no loss, no gradient, not counted
    if (threadIdx.x < kKdRowStats) stb[threadIdx.x] = acc_t(0);
    if (threadIdx.x == 0) loss[b] = acc_t(0);
    return;
  }
  State st;
  st.reset(std::numeric_limits<acc_t>::lowest());
  for (int64_t j0 = threadIdx.x; j0 < C; j0 += int64_t(kGroup) * blockDim.x) {
    acc_t xs[kGroup], xt[kGroup];
    int n = 0;
    for (int i = 0; i < kGroup; ++i) {
      const int64_t j = j0 + int64_t(i) * blockDim.x;
      if (j < C) {
        xs[n] = static_cast<acc_t>(sb[j]);
        xt[n] = static_cast<acc_t>(tb[j]);
        ++n;
      }
    }
    st.template add_group<kGroup>(xs, xt, n, k);
  }
  shared[threadIdx.x] = st;
  __syncthreads();
  for (unsigned stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) shared[threadIdx.x].combine(shared[threadIdx.x + stride]);
    __syncthreads();
  }
  if (threadIdx.x != 0) return;
  const KdRowTotals<acc_t> r = kd_finish(shared[0], k);
  const bool bad = k.ce && bad_target(yb, C);
  const acc_t target_term = k.ce && !bad ? k.ce_weight * static_cast<acc_t>(sb[yb]) : acc_t(0);
  loss[b] = bad ? static_cast<acc_t>(NAN) : r.loss - target_term;
  stb[0] = r.lse_s, stb[1] = r.lse_q, stb[2] = r.lse_p;
}

template <class scalar_t>
__global__ void kd_bwd_kernel(int64_t n, int64_t C,
                              const at::opmath_type<scalar_t>* __restrict__ grad_loss,
                              const scalar_t* __restrict__ s, const scalar_t* __restrict__ t,
                              const int64_t* __restrict__ y, int64_t ignore_index,
                              const at::opmath_type<scalar_t>* __restrict__ stats,
                              KdParams<at::opmath_type<scalar_t>> k, scalar_t* __restrict__ grad) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t b = e / C, j = e - b * C;
    const int64_t yb = y ? y[b] : -1;
    if (y && yb == ignore_index) {
      grad[e] = scalar_t(0);
      continue;
    }
    const acc_t* stb = stats + b * kKdRowStats;
    const KdRowTotals<acc_t> r{stb[0], stb[1], stb[2], acc_t(0)};
    acc_t g = kd_grad<acc_t, DistillScalarMath>(static_cast<acc_t>(s[e]),
                                                static_cast<acc_t>(t[e]), r, k);
    if (k.ce && j == yb) g -= k.ce_weight;  // the one-hot term of the CE gradient
    const bool bad = k.ce && bad_target(yb, C);
    grad[e] = bad ? static_cast<acc_t>(NAN) : grad_loss[b] * g;
  }
}

// One chunk of one pair of mapping_distance: elements [begin, end) of students[pair] (and its
// teacher, and its gradient in the backward).
struct DeviceChunk {
  const void* s;
  const void* t;
  void* g;
  int64_t begin, end, pair;
  double inv_batch;  // 1/B_j, 0 for an empty batch
};

constexpr int64_t kChunk = 32768;

// The chunk table of every pair, copied to the device in one transfer (pinned, asynchronous).
at::Tensor chunk_table(const std::vector<at::Tensor>& students,
                       const std::vector<at::Tensor>& teachers,
                       const std::vector<at::Tensor>* grads, int64_t& count) {
  std::vector<DeviceChunk> chunks;
  for (size_t j = 0; j < students.size(); ++j) {
    const int64_t n = students[j].numel();
    const double inv_batch = students[j].size(0) > 0 ? 1.0 / students[j].size(0) : 0.0;
    for (int64_t e = 0; e < n; e += kChunk) {
      chunks.push_back({students[j].const_data_ptr(), teachers[j].const_data_ptr(),
                        grads ? (*grads)[j].data_ptr() : nullptr, e, std::min(n, e + kChunk),
                        static_cast<int64_t>(j), inv_batch});
    }
  }
  count = static_cast<int64_t>(chunks.size());
  const int64_t bytes = count * static_cast<int64_t>(sizeof(DeviceChunk));
  at::Tensor host = at::empty({bytes}, at::TensorOptions(at::kByte).pinned_memory(true));
  if (bytes) std::memcpy(host.data_ptr(), chunks.data(), bytes);
  return host.to(host.options().device(students[0].device()), /*non_blocking=*/true);
}

template <class scalar_t, class acc_t>
__global__ void mapping_distance_fwd_kernel(const DeviceChunk* __restrict__ chunks,
                                            acc_t* __restrict__ sums) {
  __shared__ acc_t partial[kThreads];
  const DeviceChunk ch = chunks[blockIdx.x];
  const scalar_t* s = static_cast<const scalar_t*>(ch.s);
  const scalar_t* t = static_cast<const scalar_t*>(ch.t);
  acc_t acc(0);
  for (int64_t e = ch.begin + threadIdx.x; e < ch.end; e += blockDim.x) {
    const acc_t d = static_cast<acc_t>(s[e]) - static_cast<acc_t>(t[e]);
    acc += d * d;
  }
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (unsigned stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) atomicAdd(sums + ch.pair, partial[0] * static_cast<acc_t>(ch.inv_batch));
}

template <class scalar_t, class acc_t>
__global__ void mapping_distance_bwd_kernel(const DeviceChunk* __restrict__ chunks,
                                            const acc_t* __restrict__ grad_distances) {
  const DeviceChunk ch = chunks[blockIdx.x];
  const scalar_t* s = static_cast<const scalar_t*>(ch.s);
  const scalar_t* t = static_cast<const scalar_t*>(ch.t);
  scalar_t* g = static_cast<scalar_t*>(ch.g);
  // ∂D_j/∂s = 2 (s - t) / B_j (MATH.md §3), times the incoming gradient of D_j.
  const acc_t scale = static_cast<acc_t>(2 * ch.inv_batch) * grad_distances[ch.pair];
  for (int64_t e = ch.begin + threadIdx.x; e < ch.end; e += blockDim.x) {
    g[e] = scale * (static_cast<acc_t>(s[e]) - static_cast<acc_t>(t[e]));
  }
}

struct CudaDistillKernels {
  static void kd_loss_fwd_rows(const at::Tensor& s, const at::Tensor& t, const at::Tensor& y,
                               Distance d, double alpha, double temperature,
                               int64_t ignore_index, const at::Tensor& loss,
                               const at::Tensor& stats) {
    const int64_t N = s.size(0), C = s.size(1);
    if (N == 0) return;
    TORCH_CHECK(N <= std::numeric_limits<int32_t>::max(), "kd_loss: at most 2^31 - 1 rows, got ",
                N);
    dispatch(s, [&](auto tag) {
      using scalar_t = decltype(tag);
      using acc_t = at::opmath_type<scalar_t>;
      const auto k = KdParams<acc_t>::make(d, y.defined(), alpha, temperature);
      const int threads = row_threads(C);
      const size_t smem = threads * sizeof(KdRowState<acc_t, DistillScalarMath>);
      kd_fwd_kernel<scalar_t><<<static_cast<unsigned>(N), threads, smem,
                                at::cuda::getCurrentCUDAStream()>>>(
          C, s.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(),
          y.defined() ? y.const_data_ptr<int64_t>() : nullptr, ignore_index, k,
          loss.data_ptr<acc_t>(), stats.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void kd_loss_bwd_rows(const at::Tensor& grad_loss, const at::Tensor& s,
                               const at::Tensor& t, const at::Tensor& y, const at::Tensor& stats,
                               Distance d, double alpha, double temperature,
                               int64_t ignore_index, const at::Tensor& grad) {
    const int64_t n = s.numel();
    if (n == 0) return;
    dispatch(s, [&](auto tag) {
      using scalar_t = decltype(tag);
      using acc_t = at::opmath_type<scalar_t>;
      const auto k = KdParams<acc_t>::make(d, y.defined(), alpha, temperature);
      const int64_t max_blocks =
          static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 16;
      const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads,
                                               max_blocks);
      kd_bwd_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0,
                                at::cuda::getCurrentCUDAStream()>>>(
          n, s.size(1), grad_loss.const_data_ptr<acc_t>(), s.const_data_ptr<scalar_t>(),
          t.const_data_ptr<scalar_t>(), y.defined() ? y.const_data_ptr<int64_t>() : nullptr,
          ignore_index, stats.const_data_ptr<acc_t>(), k, grad.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void mapping_distance_fwd(const std::vector<at::Tensor>& students,
                                   const std::vector<at::Tensor>& teachers, const at::Tensor& out) {
    int64_t count = 0;
    const at::Tensor table = chunk_table(students, teachers, nullptr, count);
    out.zero_();  // the chunks' partial sums are added to it
    if (count == 0) return;
    dispatch(students[0], [&](auto tag) {
      using scalar_t = decltype(tag);
      using acc_t = at::opmath_type<scalar_t>;
      mapping_distance_fwd_kernel<scalar_t, acc_t>
          <<<static_cast<unsigned>(count), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              reinterpret_cast<const DeviceChunk*>(table.const_data_ptr()),
              out.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void mapping_distance_bwd(const at::Tensor& grad_distances,
                                   const std::vector<at::Tensor>& students,
                                   const std::vector<at::Tensor>& teachers,
                                   const std::vector<at::Tensor>& grads) {
    int64_t count = 0;
    const at::Tensor table = chunk_table(students, teachers, &grads, count);
    if (count == 0) return;
    dispatch(students[0], [&](auto tag) {
      using scalar_t = decltype(tag);
      using acc_t = at::opmath_type<scalar_t>;
      mapping_distance_bwd_kernel<scalar_t, acc_t>
          <<<static_cast<unsigned>(count), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              reinterpret_cast<const DeviceChunk*>(table.const_data_ptr()),
              grad_distances.const_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
};

}  // namespace
}  // namespace mapopt::cuda

TORCH_LIBRARY_IMPL(mapopt_native, CUDA, m) {
  mapopt::register_distill_ops<mapopt::cuda::CudaDistillKernels>(m);
}
