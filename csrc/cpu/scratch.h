// Buffers a CPU layer call keeps, per thread, for the next call: its packed weights and its
// projection block. Why: these are megabytes that every call would otherwise take fresh from the
// allocator, and glibc hands large freed blocks back to the kernel whenever other work has churned
// the heap (another model, a Python loop of cells), so every call paid ~2 us a page in faults:
// at T = 100, B = 64, H = 512 an LSTM inference call took 4 000-9 000 page faults, 8-18 ms of
// its ~140. oneDNN's RNN primitive keeps its scratchpad for the same reason.
//
// A buffer is kept only up to kScratchKeepBytes per slot (the largest call so far wins); larger
// requests are plain allocations. A slot's buffer is only valid until the next request for that
// slot on the same thread: a layer call requests each slot once, and nothing it returns views one.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstdint>

namespace mapopt::cpu {

enum class Scratch : int { InputWeight, RecurrentWeight, Projection, kSlots };

constexpr int64_t kScratchKeepBytes = int64_t{32} << 20;

// A 1-D tensor of `numel` elements of `options`' dtype, on the CPU.
inline at::Tensor scratch(Scratch slot, int64_t numel, const at::TensorOptions& options) {
  thread_local std::array<at::Tensor, static_cast<int>(Scratch::kSlots)> kept;
  const int64_t bytes = numel * static_cast<int64_t>(options.dtype().itemsize());
  if (bytes > kScratchKeepBytes) return at::empty({numel}, options);
  at::Tensor& buf = kept[static_cast<int>(slot)];
  if (!buf.defined() || buf.numel() < bytes) buf = at::empty({bytes}, options.dtype(at::kByte));
  return buf.narrow(0, 0, bytes).view(options.dtype().toScalarType());
}

}  // namespace mapopt::cpu
