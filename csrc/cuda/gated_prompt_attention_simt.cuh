// Device helpers of the SIMT attention kernels (gated_prompt_attention.cu) and the split-K decode kernels
// (gated_prompt_attention_decode.cu): one warp per query row, lanes over keys or output columns, fp32 math.
#pragma once

#include <cmath>
#include <cstdint>

#include "../gated_prompt_attention.h"
#include "compat.h"
#include "device_utils.cuh"

namespace lladapter::cuda_impl {

constexpr int kWarps = 4;  // independent warps per block of the SIMT kernels (warp per work item)

// Blocks of kWarps warps for one warp per work item.
inline unsigned blocks_for(int64_t warps) { return static_cast<unsigned>((warps + kWarps - 1) / kWarps); }

__device__ __forceinline__ int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }

template <typename T>
__device__ __forceinline__ float dot_row(const float* __restrict__ a, const T* __restrict__ b, int64_t d) {
  float s = 0.f;
  for (int64_t c = 0; c < d; ++c) s = fmaf(a[c], static_cast<float>(b[c]), s);
  return s;
}

template <typename T>
__device__ __forceinline__ float dot_rows(const T* __restrict__ a, const float* __restrict__ b, int64_t d) {
  float s = 0.f;
  for (int64_t c = 0; c < d; ++c) s = fmaf(static_cast<float>(a[c]), b[c], s);
  return s;
}

// Word keys allowed for query i of batch b: [lo, hi). kv_start is [B] or, with g.kv_per_query, [B, Tq].
__device__ __forceinline__ void word_range(const GatedPromptAttentionProblem& g, const int64_t* kv_start, int64_t b,
                                           int64_t i, int64_t& lo, int64_t& hi) {
  lo = kv_start ? min(max(kv_start[g.kv_per_query ? b * g.Tq + i : b], int64_t(0)), g.Tk) : 0;
  hi = g.causal ? min(g.Tk, i + g.Tk - g.Tq + 1) : g.Tk;
}

// Online softmax of one scaled query row (qs, shared memory) over keys [lo, hi) with row stride `stride`.
template <typename T, int NT>
__device__ void attend_warp(const float* qs, const T* __restrict__ kb, const T* __restrict__ vb, int64_t stride,
                            int64_t lo, int64_t hi, int64_t d, float& m, float& l, float (&acc)[NT], int lane) {
  for (int64_t j0 = lo; j0 < hi; j0 += 32) {
    const int64_t j = j0 + lane;
    const bool valid = j < hi;
    const float s = valid ? dot_row(qs, kb + j * stride, d) : -INFINITY;
    const float m_new = fmax_keep_nan(m, warp_max(s));  // -inf only if every key scores -inf: then NaN, as softmax
    const float alpha = expf(m - m_new);                // 0 on the first chunk (m = -inf)
    const float p = valid ? expf(s - m_new) : 0.f;
    l = l * alpha + warp_sum(p);
#pragma unroll
    for (int t = 0; t < NT; ++t) acc[t] *= alpha;
    const int n = static_cast<int>(min_i64(32, hi - j0));
    for (int jj = 0; jj < n; ++jj) {
      const float pj = __shfl_sync(kFullMask, p, jj);
      const T* vr = vb + (j0 + jj) * stride;
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        const int64_t c = lane + 32 * t;
        if (c < d) acc[t] = fmaf(pj, static_cast<float>(vr[c]), acc[t]);
      }
    }
    m = m_new;
  }
}

}  // namespace lladapter::cuda_impl
