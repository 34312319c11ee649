// The guard-page CPU allocator for torch tensors (c10::SetCPUAllocator) used while emulated kernels run: every
// CPU allocation ends against a PROT_NONE page (see guarded_memory.h), so an out-of-bounds access of a kernel
// faults at once and the emulator reports it; fresh memory is 0xFF (NaN), so unwritten outputs show.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <mutex>

#include "guarded_memory.h"

namespace llemu {
namespace {

void guarded_delete(void* p) { guarded_free(p); }

struct GuardedCPUAllocator final : public c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    if (n == 0) return {nullptr, nullptr, &guarded_delete, c10::Device(c10::DeviceType::CPU)};
    void* p = guarded_alloc(n);
    return {p, p, &guarded_delete, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &guarded_delete; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }
};

// c10 keeps the allocator with the highest priority set so far; we always set ours and the previous one with this
// priority, so enable/disable can go back and forth (and nothing of lower priority overrides us while enabled).
constexpr uint8_t kPriority = 200;

std::mutex g_mu;
GuardedCPUAllocator* g_alloc = nullptr;
c10::Allocator* g_prev = nullptr;
bool g_enabled = false;

}  // namespace

bool set_guarded_cpu_allocator(bool enabled) {
  std::lock_guard<std::mutex> lk(g_mu);
  const bool was = g_enabled;
  if (enabled == was) return was;
  if (enabled) {
    if (g_alloc == nullptr) g_alloc = new GuardedCPUAllocator();  // never freed: live tensors keep its deleter
    g_prev = c10::GetCPUAllocator();
    c10::SetCPUAllocator(g_alloc, kPriority);
    g_enabled = c10::GetCPUAllocator() == g_alloc;
    if (!g_enabled) throw std::runtime_error("llemu: c10::SetCPUAllocator did not take the guarded allocator");
  } else {
    c10::SetCPUAllocator(g_prev, kPriority);
    g_enabled = false;
  }
  return was;
}

bool guarded_cpu_allocator_enabled() {
  std::lock_guard<std::mutex> lk(g_mu);
  return g_enabled;
}

}  // namespace llemu
