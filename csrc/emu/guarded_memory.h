// Guard-page allocations for global memory checks (no ATen here; guarded_allocator.cpp wraps this as a c10 CPU
// allocator). Each allocation is its own mapping: [PROT_NONE page][head slack][data][tail slack < 16][PROT_NONE
// page]. The data starts 16-byte aligned and ends within 15 bytes of the trailing guard page; both slacks hold a
// canary (checked after every launch and at free), fresh data is 0xFF (NaN in fp32/fp16/bf16).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace llemu {

void* guarded_alloc(size_t n);  // never nullptr (n == 0 gives a 0-byte allocation against its guard page)
void guarded_free(void* p);     // p from guarded_alloc or nullptr; a corrupted canary is recorded (guarded_errors)

// If addr lies in a guard page or slack of a live guarded allocation, describes it ("12 bytes past the end of a
// 4096-byte guarded allocation at 0x...") and returns true. Takes a lock; do not call from a signal handler.
bool describe_guarded_address(uintptr_t addr, std::string* out);
// Checks the canaries of every live guarded allocation; returns "" or a description of each corruption (the
// canaries are rewritten so that one corruption is reported once).
std::string check_guarded_canaries();
// Corruptions found when freeing (a deleter cannot throw); also counted as warnings. Clears the list.
std::vector<std::string> take_guarded_errors();
size_t guarded_live_allocations();

// The c10 CPU allocator switch (guarded_allocator.cpp; needs ATen). Returns the previous state.
bool set_guarded_cpu_allocator(bool enabled);
bool guarded_cpu_allocator_enabled();

}  // namespace llemu
