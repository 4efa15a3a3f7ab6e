// at::empty for the recurrent layers' large buffers: their outputs and training workspaces, tens
// of MB a call, allocated afresh every call. On the CPU they come from blocks that earlier such
// buffers left when they were freed.
//
// Why: glibc serves a request over 32 MB, and after other work has churned the heap smaller ones
// too, by fresh pages from the kernel and hands them back when the block is freed, so every call
// paid a page fault and a zeroed page per 4 KiB it wrote. LSTM training at T = 100, B = 64,
// H = 512 (one layer, 2-core EPYC): the forward took 185-198 ms with fresh pages and 152-182 ms
// when glibc was told to keep its heap (MALLOC_MMAP_MAX_=0); scratch.h keeps the buffers that live
// only inside a call, this keeps those a call returns. On CUDA this is at::empty: the caching
// allocator already reuses blocks.
//
// Freed blocks are kept up to kRecycledKeepBytes in all, for any thread, the latest first (a block
// that does not fit evicts the largest kept ones: sizes change when the batch or length does); a
// request takes the smallest kept block that holds it and wastes at most a quarter of it (of that
// size the one freed last), else fresh memory. Requests under kRecycledMinBytes are plain at::empty.
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <cstddef>
#include <iterator>
#include <map>
#include <mutex>
#include <vector>

#if defined(__unix__)
#include <pthread.h>
#endif

namespace mapopt {

constexpr std::size_t kRecycledKeepBytes = std::size_t{256} << 20;
// Smaller blocks cost few faults, and glibc mostly keeps them in its heap.
constexpr std::size_t kRecycledMinBytes = std::size_t{1} << 20;

class RecyclingCpuAllocator final : public c10::Allocator {
 public:
  static RecyclingCpuAllocator& get() {
    // Never destroyed: tensors it made may be freed after static destruction (at exit).
    static auto* allocator = [] {
      auto* a = new RecyclingCpuAllocator();
#if defined(__unix__)
      // A fork while another thread holds the lock would leave it held in the child for good.
      pthread_atfork([] { get().mu_.lock(); }, [] { get().mu_.unlock(); },
                     [] { get().mu_.unlock(); });
#endif
      return a;
    }();
    return *allocator;
  }

  c10::DataPtr allocate(std::size_t bytes) override {
    void* data = nullptr;
    std::size_t size = bytes;
    {
      const std::lock_guard<std::mutex> lock(mu_);
      // Of the best-fitting size, the block freed last: its pages are the likeliest still cached.
      auto it = kept_.lower_bound(bytes);
      if (it != kept_.end()) it = std::prev(kept_.upper_bound(it->first));
      if (it != kept_.end() && it->first <= bytes + bytes / 4) {
        size = it->first;
        data = it->second;
        kept_bytes_ -= size;
        kept_.erase(it);
      }
    }
    if (!data) data = c10::alloc_cpu(size);
    return {data, new Block{data, size}, &release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  struct Block {
    void* data;
    std::size_t bytes;
  };

  static void release(void* context) {
    const Block* block = static_cast<Block*>(context);
    RecyclingCpuAllocator& self = get();
    std::vector<void*> evicted;
    {
      const std::lock_guard<std::mutex> lock(self.mu_);
      if (block->bytes > kRecycledKeepBytes) {
        evicted.push_back(block->data);
      } else {
        while (self.kept_bytes_ + block->bytes > kRecycledKeepBytes) {
          const auto largest = std::prev(self.kept_.end());
          self.kept_bytes_ -= largest->first;
          evicted.push_back(largest->second);
          self.kept_.erase(largest);
        }
        self.kept_.emplace(block->bytes, block->data);
        self.kept_bytes_ += block->bytes;
      }
    }
    for (void* data : evicted) c10::free_cpu(data);
    delete block;
  }

  std::mutex mu_;
  std::multimap<std::size_t, void*> kept_;  // by size
  std::size_t kept_bytes_ = 0;
};

inline at::Tensor empty_recycled(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const std::size_t bytes = c10::multiply_integers(sizes) * options.dtype().itemsize();
  if (!options.device().is_cpu() || bytes < kRecycledMinBytes) return at::empty(sizes, options);
  return at::detail::empty_generic(sizes, &RecyclingCpuAllocator::get(),
                                   c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   options.dtype().toScalarType(), std::nullopt);
}

}  // namespace mapopt
