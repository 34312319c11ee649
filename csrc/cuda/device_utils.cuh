// Small device helpers shared by the CUDA kernels (no ATen: device code only).
#pragma once

#include "compat.h"

namespace lladapter::cuda_impl {

constexpr unsigned kFullMask = 0xffffffffu;

// N elements of T as one aligned vector: a single 16-byte load or store when sizeof(T) * N == 16.
template <typename T, int N>
struct alignas(sizeof(T) * N) VecT {
  T v[N];
};

// Sum / maximum over the 32 lanes of a warp (every lane gets the result).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// The maximum that keeps NaN (fmaxf returns the other operand): the online softmax's running max must not drop a
// NaN score, or its row would come out finite where reference.py has NaN.
__device__ __forceinline__ float fmax_keep_nan(float a, float b) { return (a < b || b != b) ? b : a; }

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmax_keep_nan(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

}  // namespace lladapter::cuda_impl
