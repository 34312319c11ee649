// One source, two compilers: the switch that lets csrc/cuda compile under nvcc (the real GPU build) and under the
// host C++ compiler with -DLLADAPTER_EMU, against the SIMT emulator in csrc/emu (docs/emulator.md). Kernels use
// only what this header provides for the things the two builds spell differently:
//   LL_SHARED(type, name, dims)            a block's static shared array  (__shared__ type name dims;)
//   LL_DYNAMIC_SHARED(type, name, align)   the launch's dynamic shared memory (extern __shared__ ... name[];)
//   LL_LAUNCH(grid, block, smem, stream, kernel)(args...)
//                                          kernel<<<grid, block, smem, stream>>>(args...); the kernel comes last
//                                          so that template commas need no parentheses
//   LL_MMA_CODE                            1 where tensor-core (wmma) code is compiled: nvcc's device pass for
//                                          sm_80+, and the emulator; 0 in nvcc's host pass and older archs
//   LL_MMA_DECLS                           1 where the wmma helpers must be declared (also nvcc's host pass)
// Host-side launch and dispatch code uses compat_host.h. No ATen here: device code only.
#pragma once

#ifdef LLADAPTER_EMU

// c10 defines CUDA_KERNEL_ASSERT for host code; the emulator's (a Python error naming kernel, block and thread)
// replaces it, so c10's definition must come first whatever order a file includes its headers in.
#include <c10/macros/Macros.h>

#include "../emu/emu.h"

// The block's instance of the array, keyed by a static local unique to the declaration and the instantiation.
#define LL_SHARED(type, name, dims)                           \
  type(&name) dims = ::llemu::static_shared<type dims>(       \
      [] {                                                    \
        static char ll_shared_site_key;                       \
        return static_cast<const void*>(&ll_shared_site_key); \
      }(),                                                    \
      #name)
#define LL_DYNAMIC_SHARED(type, name, align) type* const name = static_cast<type*>(::llemu::dynamic_shared(align))
#define LL_LAUNCH(grid, block, smem, stream, ...) \
  ::llemu::make_launcher(#__VA_ARGS__, __FILE__, __LINE__, grid, block, smem, stream, __VA_ARGS__)
#define LL_MMA_CODE 1
#define LL_MMA_DECLS 1

#else  // nvcc

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#define LL_SHARED(type, name, dims) __shared__ type name dims
#define LL_DYNAMIC_SHARED(type, name, align) \
  extern __shared__ __align__(align)         \
  type name[]
#define LL_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define LL_MMA_CODE 1
#else
#define LL_MMA_CODE 0
#endif
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define LL_MMA_DECLS 1
#else
#define LL_MMA_DECLS 0
#endif

#endif  // LLADAPTER_EMU
