// Re-asserts the emulator's CUDA_KERNEL_ASSERT after a c10 header that redefined it (see the include order rule in
// emu.h). Deliberately without an include guard: include it again after every such header.
#undef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(cond)                                                                                \
  do {                                                                                                          \
    if (__builtin_expect(!(cond), 0)) ::llemu::detail::kernel_assert_fail(#cond, __FILE__, __LINE__, __func__); \
  } while (0)
