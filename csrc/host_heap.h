// The host heap's C++ side (lladapter_ext/host_heap.py owns the policy and calls this through _C).
#pragma once

namespace lladapter {

// Makes an exact-fit allocator torch's CPU allocator for the rest of the process (c10::SetCPUAllocator; tensors
// allocated before keep their own deleter). torch's default asks posix_memalign for 64-byte alignment, and glibc
// serves that from a block of the size plus the alignment plus its minimum chunk, trimming the rest off: a freed
// block is then too small to serve the next request of the same size, and a training step's same-sized
// temporaries, each freed between blocks the graph keeps, leave holes that grow the heap instead of being reused
// (host_heap.keep_freed_heap). This allocator asks plain malloc for the size plus 72 bytes and aligns inside the
// block, so a freed block fits the next request of its size exactly. Returns false when it was already installed.
bool install_exact_fit_allocator();

// Whether install_exact_fit_allocator() has run in this process.
bool exact_fit_allocator_installed();

}  // namespace lladapter
