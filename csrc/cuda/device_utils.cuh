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

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

}  // namespace lladapter::cuda_impl
