// CPU buffers in transparent huge pages: empty_large for large buffers about to be written in
// full, empty_huge_aligned for buffers kept for many calls.
//
// Why: fresh CPU memory is mapped lazily, one 4 KiB page per first write, and on the machines this
// project is measured on the page faults of a buffer of tens of MB cost as much as the pass that
// fills it (64 MB: 26 ms to allocate and fill, 5.6 ms in 2 MiB pages). So a large CPU buffer asks
// the kernel for transparent huge pages before its first touch; on CUDA, for small buffers and on
// other systems empty_large is at::empty. The recurrent layers' outputs and training buffers do
// not use it (they come from recycled_buffer.h): tens of MB allocated afresh every call, they
// made a call take 2-2.5x its usual time every few calls in huge pages (LSTM training at T = 100,
// B = 64, H = 512: 387-1150 ms over 24 calls, against 433-520 ms in plain pages). Their kept
// buffers are in huge pages too, through empty_huge_aligned (cpu/scratch.h says why). The huge
// page is taken to be 2 MiB, x86-64's with 4 KiB base pages; where it is larger (arm64 kernels with
// 16 or 64 KiB pages) the advice does nothing.
#pragma once

#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace mapopt {

constexpr std::uintptr_t kHugePageBytes = std::uintptr_t{1} << 21;

// Asks the kernel for transparent huge pages over the whole 2 MiB pages inside [p, p + bytes).
// The advice changes no contents and its failure changes nothing.
inline void advise_huge_pages(const void* p, std::size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const auto begin = reinterpret_cast<std::uintptr_t>(p);
  const std::uintptr_t first = (begin + kHugePageBytes - 1) & ~(kHugePageBytes - 1);
  const std::uintptr_t last = (begin + bytes) & ~(kHugePageBytes - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)p, (void)bytes;
#endif
}

inline at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  if (t.device().is_cpu() && t.nbytes() >= 2 * kHugePageBytes) {
    advise_huge_pages(t.data_ptr(), t.nbytes());
  }
  return t;
}

// `bytes` bytes of CPU memory (a 1-D uint8 tensor) that start on a 2 MiB boundary and ask for
// huge pages up to the 2 MiB boundary after their end: for buffers kept for many calls
// (csrc/cpu/scratch.h), which pay the huge pages' zeroing once. 2 MiB more are reserved, untouched.
// The result spans those whole pages (at least `bytes`), so a later request that fits in them
// can reuse it. Without madvise this is at::empty.
inline at::Tensor empty_huge_aligned(int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const auto page = static_cast<int64_t>(kHugePageBytes);
  const int64_t whole = (bytes + page - 1) / page * page;
  const at::Tensor t = at::empty({whole + page}, at::kByte);
  const auto begin = reinterpret_cast<std::uintptr_t>(t.data_ptr());
  const auto skip = static_cast<int64_t>(((begin + kHugePageBytes - 1) & ~(kHugePageBytes - 1)) -
                                         begin);
  // Views of other dtypes need the offset to be a multiple of their size: c10 aligns to 64 bytes.
  TORCH_INTERNAL_ASSERT(skip % 64 == 0, "CPU allocation not 64-byte aligned");
  advise_huge_pages(t.data_ptr<std::uint8_t>() + skip, static_cast<std::size_t>(whole));
  return t.narrow(0, skip, whole);
#else
  return at::empty({bytes}, at::kByte);
#endif
}

}  // namespace mapopt
