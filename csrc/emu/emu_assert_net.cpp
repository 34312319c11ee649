// Safety net for the include-order rule of emu.h: if a c10 header included after emu.h brought back c10's
// CUDA_KERNEL_ASSERT (or kernel code uses plain assert()), the failing check calls glibc's __assert_fail, which
// would abort the whole process. This hidden definition takes its place inside the library that links this file:
// on an emulated thread the failure becomes a KernelError ([kernel-assert]); anywhere else it behaves as glibc's
// (message on stderr, abort()). Deliberately no <assert.h> here: the declaration below must be the only one.
#include <cstdio>
#include <cstdlib>

namespace llemu::detail {
bool in_fiber();
[[noreturn]] void assert_fail_in_fiber(const char* msg);
}  // namespace llemu::detail

extern "C" __attribute__((visibility("hidden"), noreturn)) void __assert_fail(const char* assertion, const char* file,
                                                                              unsigned int line,
                                                                              const char* function) noexcept {
  if (llemu::detail::in_fiber()) {
    char buf[1024];
    std::snprintf(buf, sizeof buf, "assertion `%s' failed in %s at %s:%u (via __assert_fail)", assertion,
                  function ? function : "?", file ? file : "?", line);
    llemu::detail::assert_fail_in_fiber(buf);
  }
  std::fprintf(stderr, "%s:%u: %s: Assertion `%s' failed.\n", file ? file : "?", line, function ? function : "?",
               assertion);
  std::abort();
}
