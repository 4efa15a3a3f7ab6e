// Buffers a CPU layer call keeps, per thread, for the next call: its packed weights, its
// projection block and the backward's gate gradients over all steps. Why: these are megabytes
// that every call would otherwise take fresh from the allocator, and glibc hands large freed
// blocks back to the kernel whenever other work has churned the heap (another model, a Python
// loop of cells), so every call paid ~2 us a page in faults: at T = 100, B = 64, H = 512 an LSTM
// inference call took 4 000-9 000 page faults, 8-18 ms of its ~140; the backward of LSTM training
// at the same size took 270-285 ms with fresh gate gradients (52 MB), 228-235 ms with kept ones.
// oneDNN's RNN primitive keeps its scratchpad for the same reason. (Buffers a call returns come
// from recycled_buffer.h instead.)
//
// Buffers of kScratchHugeMinBytes and more are in whole 2 MiB pages (large_buffer.h): the packed
// weights from H of about 256 up, and the projection block where whole steps fill its 512 KiB
// (the LSTM at B = 64, H = 512, not the GRU there, whose block holds one 384 KiB step). Why: in
// 4 KiB pages, LSTM inference at T = 100, B = 64, H = 512 ran at one of two speeds, set per
// process: 10 processes of 15 at 1.14-1.24x the matrix-product floor (median 1.17; nn.LSTM/native
// 0.92-1.09, median 0.99). In 2 MiB pages 5 of 23 were (median 1.09; nn.LSTM/native 0.97-1.21,
// median 1.07). The packed weights are streamed through every step and the projection block
// fills half a core's L2, so a likely cause is where 4 KiB pages fall in the physically indexed
// L2 (this machine's virtualised CPU has no counters to show it). (LSTM inference has since
// stopped making projection blocks: gated_layers.h.)
//
// A buffer is kept only up to kScratchKeepBytes per slot (the largest call so far wins; 96 MiB
// holds the gate gradients at that size: the LSTM's 50 MiB, the GRU's 75 MiB); larger requests
// are plain allocations. A slot's buffer is only valid until the next request for that slot on the
// same thread: a layer call requests each slot once, and nothing it returns views one.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstdint>

#include "../large_buffer.h"

namespace mapopt::cpu {

enum class Scratch : int { InputWeight, RecurrentWeight, Projection, StepGrads, kSlots };

constexpr int64_t kScratchKeepBytes = int64_t{96} << 20;
constexpr int64_t kScratchHugeMinBytes = int64_t{512} << 10;

// A layer's input projection is made in blocks of at most this many bytes (csrc/gated_layers.h,
// seq::Projection), each in the Projection slot: small enough that the block and the input rows it
// is made from stay in a core's L2 while every group of units passes over them (one LSTM thread at
// B = 64, H = 128: 4 MB blocks 21-24 ms, 512 KB 19-21 ms; at H = 512, where a block is one step,
// no change). The benchmarks' matrix-product floor makes its projection in the same blocks
// (mapopt_native._C.cpu_projection_block_bytes).
constexpr int64_t kProjectionBlockBytes = int64_t{512} << 10;

// A 1-D tensor of `numel` elements of `options`' dtype, on the CPU.
inline at::Tensor scratch(Scratch slot, int64_t numel, const at::TensorOptions& options) {
  thread_local std::array<at::Tensor, static_cast<int>(Scratch::kSlots)> kept;
  const int64_t bytes = numel * static_cast<int64_t>(options.dtype().itemsize());
  if (bytes > kScratchKeepBytes) return at::empty({numel}, options);
  at::Tensor& buf = kept[static_cast<int>(slot)];
  if (!buf.defined() || buf.numel() < bytes) {
    buf = bytes >= kScratchHugeMinBytes ? empty_huge_aligned(bytes) : at::empty({bytes}, at::kByte);
  }
  return buf.narrow(0, 0, bytes).view(options.dtype().toScalarType());
}

}  // namespace mapopt::cpu
