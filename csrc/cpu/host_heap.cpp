// The exact-fit CPU allocator (csrc/host_heap.h says why). Same contract as torch's DefaultCPUAllocator: 64-byte
// aligned data, nullptr for zero bytes, allocations reported to the profiler (profile_memory), OutOfMemoryError when
// malloc fails.
#include "host_heap.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <limits>

namespace lladapter {

namespace {

constexpr std::size_t kAlignment = 64;  // c10::gAlignment: what vectorised kernels may assume of a CPU tensor
// malloc's block holds the data, the pointer it returned (stored just below the data, for free) and the padding up
// to the alignment: at most sizeof(void*) + kAlignment - 1 bytes before the data.
constexpr std::size_t kOverhead = sizeof(void*) + kAlignment;

void free_block(void* data) {
  if (data == nullptr) {
    return;
  }
  c10::profiledCPUMemoryReporter().Delete(data);
  std::free(static_cast<void**>(data)[-1]);
}

struct ExactFitAllocator final : c10::Allocator {
  c10::DataPtr allocate(std::size_t nbytes) override {
    const c10::Device cpu(c10::DeviceType::CPU);
    if (nbytes == 0) {
      return {nullptr, nullptr, &free_block, cpu};
    }
    void* block =
        nbytes <= std::numeric_limits<std::size_t>::max() - kOverhead ? std::malloc(nbytes + kOverhead) : nullptr;
    if (block == nullptr) {
      c10::profiledCPUMemoryReporter().OutOfMemory(nbytes);
      TORCH_CHECK_WITH(OutOfMemoryError, false,
                       "lladapter host heap (exact-fit CPU allocator): not enough memory: ", "you tried to allocate ",
                       nbytes, " bytes.");
    }
    const auto start = reinterpret_cast<std::uintptr_t>(block) + sizeof(void*);
    void* data = reinterpret_cast<void*>((start + kAlignment - 1) & ~static_cast<std::uintptr_t>(kAlignment - 1));
    static_cast<void**>(data)[-1] = block;
    c10::profiledCPUMemoryReporter().New(data, nbytes);
    return {data, data, &free_block, cpu};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &free_block; }

  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }
};

ExactFitAllocator g_allocator;  // (lives as long as the process: every storage it allocated points to it)
std::atomic<bool> g_installed{false};

}  // namespace

bool install_exact_fit_allocator() {
  if (g_installed.exchange(true)) {
    return false;
  }
  // Priority above the default's (0), so that the choice holds; an allocator someone registered with a higher
  // priority still wins.
  c10::SetCPUAllocator(&g_allocator, /*priority=*/1);
  return true;
}

bool exact_fit_allocator_installed() { return g_installed.load(); }

}  // namespace lladapter
