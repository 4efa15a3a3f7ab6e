// at::empty for large buffers that are about to be written in full.
//
// Why: fresh CPU memory is mapped lazily, one 4 KiB page per first write, and on the machines this
// project is measured on the page faults of a buffer of tens of MB cost as much as the pass that
// fills it (64 MB: 26 ms to allocate and fill, 5.6 ms in 2 MiB pages). So a large CPU buffer asks
// the kernel for transparent huge pages before its first touch. The advice changes no contents and
// its failure changes nothing; on CUDA, for small buffers and on other systems this is at::empty.
// The recurrent layers do not use it (their buffers come from recycled_buffer.h): their training
// buffers, tens of MB allocated afresh every call, made a call take 2-2.5x its usual time every
// few calls in huge pages (LSTM training at
// T = 100, B = 64, H = 512: 387-1150 ms over 24 calls, against 433-520 ms in plain pages).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace mapopt {

inline at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr std::uintptr_t kHugePage = std::uintptr_t{1} << 21;
  const std::size_t bytes = t.nbytes();
  if (t.device().is_cpu() && bytes >= 2 * kHugePage) {
    const auto begin = reinterpret_cast<std::uintptr_t>(t.data_ptr());
    const std::uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
    const std::uintptr_t last = (begin + bytes) & ~(kHugePage - 1);
    if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
  return t;
}

}  // namespace mapopt
