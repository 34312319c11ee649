// Gated prompt attention, CUDA kernels (forward and backward). NOTE: written without a GPU; it compiles here
// but has never run (see docs/attention.md). Correctness first: SIMT (no tensor cores), fp32 accumulation,
// the same passes and the same masking rules as the CPU kernel (csrc/cpu/prompt_attention.cpp).
//
// Layout of the work (one warp = one work item, kWarps independent warps per block, no block-wide sync):
//  forward   warp per query row (b, h, i); keys in chunks of 32, lane j scores key j0 + j against the scaled
//            query row held in shared memory; one online-softmax update per chunk; lanes own output columns
//            c = lane + 32 t. The prompt branch is a second online softmax over the K prompt keys in the same
//            warp; out = word + phi(g_h) * prompt is written once.
//  backward  pre:  warp per row: D_word = dout.out - phi * D_prompt, D_prompt = dout.prompt_out (recomputed)
//            dq:   warp per row: word keys then prompt keys, dS = factor * P * (dP - D)
//            dkv:  warp per word key (b, hkv, j): loops over the rows of the heads of its group, 32 rows at a
//                  time (lane r scores row i0 + r), accumulates dk, dv for its key in registers: no atomics
//            dpkv: warp per (row chunk, prompt batch, hkv, prompt key): fp32 partials per chunk, summed over
//                  chunks in order by at::sum (deterministic)
//            dgate = phi'(g) * sum_{b,i} D_prompt via at::sum.
//            bf16/fp16 on sm_80+ (prompt_attention_mma.h): tensor-core kernels replace dq and dkv.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>

#include "../prompt_attention.h"
#include "prompt_attention_mma.h"

namespace lladapter::cuda_impl {
namespace {

constexpr int kWarps = 4;                 // independent warps per block
constexpr unsigned kFull = 0xffffffffu;
constexpr int64_t kPromptRowChunk = 512;  // query rows per warp in the prompt-gradient kernel

struct Geo {
  int64_t B, Tq, Tk, H, Hkv, d, K, Bp, rep;
  bool causal, has_prompt;
  float scale;
  bool kv_per_query;  // kv_start is [B, Tq] (one start per query: packed sequences), else [B] (left padding)
};

__device__ __forceinline__ int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

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
__device__ __forceinline__ void word_range(const Geo& g, const int64_t* kv_start, int64_t b, int64_t i, int64_t& lo,
                                           int64_t& hi) {
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
    const float m_new = fmaxf(m, warp_max(s));  // finite: lane 0 is always valid
    const float alpha = expf(m - m_new);       // 0 on the first chunk (m = -inf)
    const float p = valid ? expf(s - m_new) : 0.f;
    l = l * alpha + warp_sum(p);
#pragma unroll
    for (int t = 0; t < NT; ++t) acc[t] *= alpha;
    const int n = static_cast<int>(min_i64(32, hi - j0));
    for (int jj = 0; jj < n; ++jj) {
      const float pj = __shfl_sync(kFull, p, jj);
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

template <typename T, int DMAX>
__global__ void gpa_fwd_kernel(Geo g, const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                               const T* __restrict__ pk, const T* __restrict__ pv, const int64_t* __restrict__ kv_start,
                               const float* __restrict__ phi, T* __restrict__ out, float* __restrict__ lse,
                               float* __restrict__ plse) {
  constexpr int NT = DMAX / 32;
  __shared__ float qs_all[kWarps][DMAX];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp;  // (b, h, i) with i fastest
  if (row >= g.B * g.H * g.Tq) return;  // whole warps leave; no block-wide synchronisation below
  const int64_t i = row % g.Tq, h = (row / g.Tq) % g.H, b = row / (g.Tq * g.H), hkv = h / g.rep;
  float* qs = qs_all[warp];
  const T* qr = q + ((b * g.Tq + i) * g.H + h) * g.d;
  for (int64_t c = lane; c < DMAX; c += 32) qs[c] = c < g.d ? static_cast<float>(qr[c]) * g.scale : 0.f;
  __syncwarp();
  const int64_t stride = g.Hkv * g.d;
  float acc[NT], m = -INFINITY, l = 0.f;
#pragma unroll
  for (int t = 0; t < NT; ++t) acc[t] = 0.f;
  int64_t lo, hi;
  word_range(g, kv_start, b, i, lo, hi);
  attend_warp<T, NT>(qs, k + (b * g.Tk * g.Hkv + hkv) * g.d, v + (b * g.Tk * g.Hkv + hkv) * g.d, stride, lo, hi,
                     g.d, m, l, acc, lane);
  const int64_t si = (b * g.H + h) * g.Tq + i;
  const float inv = l > 0.f ? 1.f / l : 0.f;  // no allowed word key: the word branch gives 0
#pragma unroll
  for (int t = 0; t < NT; ++t) acc[t] *= inv;
  if (lane == 0) lse[si] = l > 0.f ? m + logf(l) : -INFINITY;
  if (g.has_prompt) {
    float pacc[NT], pm = -INFINITY, pl = 0.f;
#pragma unroll
    for (int t = 0; t < NT; ++t) pacc[t] = 0.f;
    const int64_t poff = ((g.Bp == 1 ? 0 : b) * g.K * g.Hkv + hkv) * g.d;
    attend_warp<T, NT>(qs, pk + poff, pv + poff, stride, 0, g.K, g.d, pm, pl, pacc, lane);
    const float w = phi[h] / pl;
#pragma unroll
    for (int t = 0; t < NT; ++t) acc[t] = fmaf(w, pacc[t], acc[t]);
    if (lane == 0) plse[si] = pm + logf(pl);
  } else if (lane == 0) {
    plse[si] = -INFINITY;
  }
  T* orow = out + ((b * g.Tq + i) * g.H + h) * g.d;
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    const int64_t c = lane + 32 * t;
    if (c < g.d) orow[c] = static_cast<T>(acc[t]);
  }
}

// ---------------------------------------------------------------------------------------------- backward
template <typename T, int DMAX>
__global__ void gpa_bwd_pre_kernel(Geo g, const T* __restrict__ q, const T* __restrict__ pk, const T* __restrict__ pv,
                                   const float* __restrict__ phi, const T* __restrict__ dout,
                                   const T* __restrict__ out, float* __restrict__ Dw, float* __restrict__ Dp) {
  constexpr int NT = DMAX / 32;
  __shared__ float qs_all[kWarps][DMAX];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (row >= g.B * g.H * g.Tq) return;
  const int64_t i = row % g.Tq, h = (row / g.Tq) % g.H, b = row / (g.Tq * g.H), hkv = h / g.rep;
  const int64_t roff = ((b * g.Tq + i) * g.H + h) * g.d;
  float dpr = 0.f;
  if (g.has_prompt) {
    float* qs = qs_all[warp];
    for (int64_t c = lane; c < DMAX; c += 32) qs[c] = c < g.d ? static_cast<float>(q[roff + c]) * g.scale : 0.f;
    __syncwarp();
    float pacc[NT], pm = -INFINITY, pl = 0.f;
#pragma unroll
    for (int t = 0; t < NT; ++t) pacc[t] = 0.f;
    const int64_t poff = ((g.Bp == 1 ? 0 : b) * g.K * g.Hkv + hkv) * g.d;
    attend_warp<T, NT>(qs, pk + poff, pv + poff, g.Hkv * g.d, 0, g.K, g.d, pm, pl, pacc, lane);
    float part = 0.f;
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      const int64_t c = lane + 32 * t;
      if (c < g.d) part = fmaf(static_cast<float>(dout[roff + c]), pacc[t], part);
    }
    dpr = warp_sum(part) / pl;
  }
  float part = 0.f;
  for (int64_t c = lane; c < g.d; c += 32) part = fmaf(static_cast<float>(dout[roff + c]), static_cast<float>(out[roff + c]), part);
  const float dw = warp_sum(part) - (g.has_prompt ? phi[h] * dpr : 0.f);
  const int64_t si = (b * g.H + h) * g.Tq + i;
  if (lane == 0) {
    Dw[si] = dw;
    Dp[si] = dpr;
  }
}

// dq contributions (units of the scaled query) of keys [lo, hi): dS = factor * exp(s - L) * (dP - D).
template <typename T, int NT>
__device__ void qgrad_warp(const float* qs, const float* dos, const T* __restrict__ kb, const T* __restrict__ vb,
                           int64_t stride, int64_t lo, int64_t hi, int64_t d, float L, float D, float factor,
                           float (&acc)[NT], int lane) {
  if (L == -INFINITY) return;  // the branch has no key for this row
  for (int64_t j0 = lo; j0 < hi; j0 += 32) {
    const int64_t j = j0 + lane;
    float ds = 0.f;
    if (j < hi) {
      const float p = expf(dot_row(qs, kb + j * stride, d) - L);
      ds = factor * p * (dot_row(dos, vb + j * stride, d) - D);
    }
    const int n = static_cast<int>(min_i64(32, hi - j0));
    for (int jj = 0; jj < n; ++jj) {
      const float dsj = __shfl_sync(kFull, ds, jj);
      const T* kr = kb + (j0 + jj) * stride;
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        const int64_t c = lane + 32 * t;
        if (c < d) acc[t] = fmaf(dsj, static_cast<float>(kr[c]), acc[t]);
      }
    }
  }
}

template <typename T, int DMAX>
__global__ void gpa_bwd_dq_kernel(Geo g, const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                  const T* __restrict__ pk, const T* __restrict__ pv,
                                  const int64_t* __restrict__ kv_start, const float* __restrict__ phi,
                                  const T* __restrict__ dout, const float* __restrict__ lse,
                                  const float* __restrict__ plse, const float* __restrict__ Dw,
                                  const float* __restrict__ Dp, T* __restrict__ dq) {
  constexpr int NT = DMAX / 32;
  __shared__ float qs_all[kWarps][DMAX];
  __shared__ float do_all[kWarps][DMAX];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (row >= g.B * g.H * g.Tq) return;
  const int64_t i = row % g.Tq, h = (row / g.Tq) % g.H, b = row / (g.Tq * g.H), hkv = h / g.rep;
  const int64_t roff = ((b * g.Tq + i) * g.H + h) * g.d;
  float* qs = qs_all[warp];
  float* dos = do_all[warp];
  for (int64_t c = lane; c < DMAX; c += 32) {
    qs[c] = c < g.d ? static_cast<float>(q[roff + c]) * g.scale : 0.f;
    dos[c] = c < g.d ? static_cast<float>(dout[roff + c]) : 0.f;
  }
  __syncwarp();
  const int64_t si = (b * g.H + h) * g.Tq + i, stride = g.Hkv * g.d;
  float acc[NT];
#pragma unroll
  for (int t = 0; t < NT; ++t) acc[t] = 0.f;
  int64_t lo, hi;
  word_range(g, kv_start, b, i, lo, hi);
  const int64_t woff = (b * g.Tk * g.Hkv + hkv) * g.d;
  qgrad_warp<T, NT>(qs, dos, k + woff, v + woff, stride, lo, hi, g.d, lse[si], Dw[si], 1.f, acc, lane);
  if (g.has_prompt) {
    const int64_t poff = ((g.Bp == 1 ? 0 : b) * g.K * g.Hkv + hkv) * g.d;
    qgrad_warp<T, NT>(qs, dos, pk + poff, pv + poff, stride, 0, g.K, g.d, plse[si], Dp[si], phi[h], acc, lane);
  }
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    const int64_t c = lane + 32 * t;
    if (c < g.d) dq[roff + c] = static_cast<T>(acc[t] * g.scale);
  }
}

// Gradient of one key (kj, vj in shared memory) from query rows [r0, r1) of the flattened (b, h of the group, i)
// list of its kv head; rows are scored 32 at a time, lane r taking row r0 + r.
//   dV += factor * P * dout_i,  dK += dS * scale * q_i,  dS = factor * P * (dout_i . vj - D_i)
template <typename T, int NT>
__device__ void kv_rows_warp(const Geo& g, const float* kj, const float* vj, int64_t j, bool word, int64_t hkv,
                             int64_t b0, int64_t nb, int64_t r0, int64_t r1, const int64_t* kv_start, const T* q,
                             const T* dout, const float* lse, const float* D, const float* phi, float (&dk)[NT],
                             float (&dv)[NT], int lane) {
  const int64_t per_b = g.rep * g.Tq;
  for (int64_t x0 = r0; x0 < r1; x0 += 32) {
    const int64_t x = x0 + lane;
    float p = 0.f, ds = 0.f;
    if (x < r1) {
      const int64_t b = b0 + x / per_b, h = hkv * g.rep + (x % per_b) / g.Tq, i = x % g.Tq;
      bool allowed = true;
      if (word) {
        int64_t lo, hi;
        word_range(g, kv_start, b, i, lo, hi);
        allowed = j >= lo && j < hi;
      }
      const int64_t si = (b * g.H + h) * g.Tq + i;
      const float L = lse[si];
      if (allowed && L != -INFINITY) {
        const int64_t roff = ((b * g.Tq + i) * g.H + h) * g.d;
        const float factor = word ? 1.f : phi[h];
        const float pr = expf(dot_rows(q + roff, kj, g.d) * g.scale - L);
        ds = factor * pr * (dot_rows(dout + roff, vj, g.d) - D[si]);
        p = factor * pr;
      }
    }
    const int n = static_cast<int>(min_i64(32, r1 - x0));
    for (int rr = 0; rr < n; ++rr) {
      const float pr = __shfl_sync(kFull, p, rr);
      const float dsr = __shfl_sync(kFull, ds, rr);
      if (pr == 0.f && dsr == 0.f) continue;  // warp-uniform (shuffled values)
      const int64_t xx = x0 + rr;
      const int64_t b = b0 + xx / per_b, h = hkv * g.rep + (xx % per_b) / g.Tq, i = xx % g.Tq;
      const int64_t roff = ((b * g.Tq + i) * g.H + h) * g.d;
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        const int64_t c = lane + 32 * t;
        if (c < g.d) {
          dv[t] = fmaf(pr, static_cast<float>(dout[roff + c]), dv[t]);
          dk[t] = fmaf(dsr * g.scale, static_cast<float>(q[roff + c]), dk[t]);
        }
      }
    }
  }
}

template <typename T, int DMAX>
__global__ void gpa_bwd_dkv_kernel(Geo g, const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                   const int64_t* __restrict__ kv_start, const T* __restrict__ dout,
                                   const float* __restrict__ lse, const float* __restrict__ Dw, T* __restrict__ dk,
                                   T* __restrict__ dv) {
  constexpr int NT = DMAX / 32;
  __shared__ float k_all[kWarps][DMAX];
  __shared__ float v_all[kWarps][DMAX];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kWarps + warp;  // (b, hkv, j) with j fastest
  if (item >= g.B * g.Hkv * g.Tk) return;
  const int64_t j = item % g.Tk, hkv = (item / g.Tk) % g.Hkv, b = item / (g.Tk * g.Hkv);
  const int64_t koff = ((b * g.Tk + j) * g.Hkv + hkv) * g.d;
  float* kj = k_all[warp];
  float* vj = v_all[warp];
  for (int64_t c = lane; c < DMAX; c += 32) {
    kj[c] = c < g.d ? static_cast<float>(k[koff + c]) : 0.f;
    vj[c] = c < g.d ? static_cast<float>(v[koff + c]) : 0.f;
  }
  __syncwarp();
  float dka[NT], dva[NT];
#pragma unroll
  for (int t = 0; t < NT; ++t) dka[t] = dva[t] = 0.f;
  // rows of batch b, all heads of the group; the causal / padding mask is applied per row
  kv_rows_warp<T, NT>(g, kj, vj, j, true, hkv, b, 1, 0, g.rep * g.Tq, kv_start, q, dout, lse, Dw, nullptr, dka, dva,
                      lane);
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    const int64_t c = lane + 32 * t;
    if (c < g.d) {
      dk[koff + c] = static_cast<T>(dka[t]);
      dv[koff + c] = static_cast<T>(dva[t]);
    }
  }
}

// Partial prompt gradients: partial [chunks, Bp, K, Hkv, d] x 2 (dpk then dpv), fp32.
template <typename T, int DMAX>
__global__ void gpa_bwd_dpkv_kernel(Geo g, const T* __restrict__ q, const T* __restrict__ pk, const T* __restrict__ pv,
                                    const float* __restrict__ phi, const T* __restrict__ dout,
                                    const float* __restrict__ plse, const float* __restrict__ Dp, int64_t chunks,
                                    float* __restrict__ part_k, float* __restrict__ part_v) {
  constexpr int NT = DMAX / 32;
  __shared__ float k_all[kWarps][DMAX];
  __shared__ float v_all[kWarps][DMAX];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kWarps + warp;  // (chunk, bp, hkv, p), p fastest
  const int64_t keys = g.Bp * g.Hkv * g.K;
  if (item >= chunks * keys) return;
  const int64_t p = item % g.K, hkv = (item / g.K) % g.Hkv, bp = (item / (g.K * g.Hkv)) % g.Bp, chunk = item / keys;
  const int64_t koff = ((bp * g.K + p) * g.Hkv + hkv) * g.d;
  float* kj = k_all[warp];
  float* vj = v_all[warp];
  for (int64_t c = lane; c < DMAX; c += 32) {
    kj[c] = c < g.d ? static_cast<float>(pk[koff + c]) : 0.f;
    vj[c] = c < g.d ? static_cast<float>(pv[koff + c]) : 0.f;
  }
  __syncwarp();
  // a shared prompt (Bp = 1) gathers the rows of every batch; a per-sample one only its own
  const int64_t b0 = g.Bp == 1 ? 0 : bp, nb = g.Bp == 1 ? g.B : 1;
  const int64_t rows = nb * g.rep * g.Tq;
  const int64_t r0 = min(rows, chunk * kPromptRowChunk), r1 = min(rows, r0 + kPromptRowChunk);
  float dka[NT], dva[NT];
#pragma unroll
  for (int t = 0; t < NT; ++t) dka[t] = dva[t] = 0.f;
  kv_rows_warp<T, NT>(g, kj, vj, p, false, hkv, b0, nb, r0, r1, nullptr, q, dout, plse, Dp, phi, dka, dva, lane);
  const int64_t ooff = chunk * keys * g.d + koff;
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    const int64_t c = lane + 32 * t;
    if (c < g.d) {
      part_k[ooff + c] = dka[t];
      part_v[ooff + c] = dva[t];
    }
  }
}

// ---------------------------------------------------------------------------------------------- host side
constexpr const char* kOp = "lladapter::gated_prompt_attention";
constexpr const char* kBwdOp = "lladapter::gated_prompt_attention_backward";

struct Prepared {
  PromptAttnShape s;
  Geo g;
  at::Tensor q, k, v, pk, pv, kv_start, phi, dphi;
};

Prepared prepare(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const std::optional<at::Tensor>& pk, const std::optional<at::Tensor>& pv,
                 const std::optional<at::Tensor>& gate, const std::optional<at::Tensor>& kv_start,
                 const std::string& gate_act, bool causal, double scale) {
  Prepared p;
  p.s = prompt_attn_check_inputs(op, q, k, v, pk, pv, gate, kv_start, gate_act, scale, c10::DeviceType::CUDA);
  const auto& s = p.s;
  TORCH_CHECK(s.d == 64 || s.d == 80 || s.d == 96 || s.d == 128, op,
              ": the CUDA kernel supports head_dim (q.size(3)) in {64, 80, 96, 128}, got ", s.d,
              " (use backend='reference' or the CPU)");
  p.q = q.contiguous();
  p.k = k.contiguous();
  p.v = v.contiguous();
  if (s.has_prompt) {
    p.pk = pk->contiguous();
    p.pv = pv->contiguous();
  }
  if (kv_start.has_value()) p.kv_start = kv_start->to(at::kLong).contiguous();
  if (gate.has_value()) {
    const at::Tensor gf = gate->to(at::kFloat);
    p.phi = s.tanh_gate ? gf.tanh().contiguous() : gf.contiguous();
    p.dphi = s.tanh_gate ? (1 - p.phi * p.phi) : at::ones_like(gf);
  }
  p.g = Geo{s.B, s.Tq, s.Tk, s.H, s.Hkv, s.d, s.K, s.Bp, s.H / s.Hkv, causal, s.has_prompt,
            static_cast<float>(scale), s.kv_per_query};
  return p;
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

unsigned blocks_for(int64_t warps) { return static_cast<unsigned>((warps + kWarps - 1) / kWarps); }

// Calls f.template operator()<T, DMAX>() for q's dtype and the head-dim bucket (64 or 128 columns per lane set).
template <typename F>
void dispatch_cuda(at::ScalarType t, int64_t d, F&& f) {
  const bool small = d <= 64;
  switch (t) {
    case at::kFloat: return small ? f.template operator()<float, 64>() : f.template operator()<float, 128>();
    case at::kBFloat16:
      return small ? f.template operator()<at::BFloat16, 64>() : f.template operator()<at::BFloat16, 128>();
    case at::kHalf: return small ? f.template operator()<at::Half, 64>() : f.template operator()<at::Half, 128>();
    default: TORCH_CHECK(false, kOp, ": unsupported dtype ", t);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_prompt_attention_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const std::optional<at::Tensor>& pk_in,
    const std::optional<at::Tensor>& pv_in, const std::optional<at::Tensor>& gate,
    const std::optional<at::Tensor>& kv_start_in, bool causal, std::string gate_act, double scale) {
  const c10::cuda::CUDAGuard guard(q_in.device());
  Prepared p = prepare(kOp, q_in, k_in, v_in, pk_in, pv_in, gate, kv_start_in, gate_act, causal, scale);
  const auto& g = p.g;
  at::Tensor out = at::empty(p.q.sizes(), p.q.options());
  at::Tensor lse = at::empty({g.B, g.H, g.Tq}, p.q.options().dtype(at::kFloat));
  at::Tensor plse = at::empty({g.B, g.H, g.Tq}, p.q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse, plse};
  // bf16/fp16, d in {64, 80, 96, 128}, kv_start absent or [B], sm_80+: the tensor-core kernel
  // (prompt_attention_mma.cu); LLADAPTER_CUDA_ATTN=simt keeps the SIMT kernel below
  if (try_prompt_attn_mma_forward(p.q, p.k, p.v, p.pk, p.pv, p.kv_start, p.phi, causal, scale, out, lse, plse)) {
    return {out, lse, plse};
  }
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_cuda(p.q.scalar_type(), g.d, [&]<typename T, int DMAX>() {
    gpa_fwd_kernel<T, DMAX><<<blocks_for(g.B * g.H * g.Tq), kWarps * 32, 0, stream>>>(
        g, p.q.const_data_ptr<T>(), p.k.const_data_ptr<T>(), p.v.const_data_ptr<T>(), ptr_or_null<T>(p.pk),
        ptr_or_null<T>(p.pv), ptr_or_null<int64_t>(p.kv_start), ptr_or_null<float>(p.phi), out.mutable_data_ptr<T>(),
        lse.mutable_data_ptr<float>(), plse.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, lse, plse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_prompt_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const std::optional<at::Tensor>& pk_in, const std::optional<at::Tensor>& pv_in,
    const std::optional<at::Tensor>& gate, const std::optional<at::Tensor>& kv_start_in, const at::Tensor& out_in,
    const at::Tensor& lse_in, const at::Tensor& plse_in, bool causal, std::string gate_act, double scale) {
  const c10::cuda::CUDAGuard guard(q_in.device());
  Prepared p = prepare(kBwdOp, q_in, k_in, v_in, pk_in, pv_in, gate, kv_start_in, gate_act, causal, scale);
  const auto& g = p.g;
  prompt_attn_check_backward_inputs(kBwdOp, p.s, grad_out, q_in, out_in, lse_in, plse_in, c10::DeviceType::CUDA);
  const at::Tensor dout = grad_out.contiguous();
  const at::Tensor out = out_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  const at::Tensor plse = plse_in.contiguous();
  at::Tensor dq, dk, dv, dpk, dpv, dgate;  // lambdas below capture these, so no structured binding
  std::tie(dq, dk, dv, dpk, dpv, dgate) = prompt_attn_zero_grads(p.q, p.k, p.v, pk_in, gate, g.H);
  if (p.q.numel() == 0) return {dq, dk, dv, dpk, dpv, dgate};
  at::Tensor Dw = at::empty({g.B, g.H, g.Tq}, p.q.options().dtype(at::kFloat));
  at::Tensor Dp = at::empty({g.B, g.H, g.Tq}, p.q.options().dtype(at::kFloat));
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_cuda(p.q.scalar_type(), g.d, [&]<typename T, int DMAX>() {
    const T* qp = p.q.const_data_ptr<T>();
    const T* dop = dout.const_data_ptr<T>();
    const float* phip = ptr_or_null<float>(p.phi);
    gpa_bwd_pre_kernel<T, DMAX><<<blocks_for(g.B * g.H * g.Tq), kWarps * 32, 0, stream>>>(
        g, qp, ptr_or_null<T>(p.pk), ptr_or_null<T>(p.pv), phip, dop, out.const_data_ptr<T>(),
        Dw.mutable_data_ptr<float>(), Dp.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // bf16/fp16, d in {64, 80, 96, 128}, kv_start absent or [B], sm_80+: dq (both branches) and the word keys' dk,
    // dv on tensor cores (prompt_attention_mma.cu); LLADAPTER_CUDA_ATTN=simt keeps the SIMT kernels
    if (!try_prompt_attn_mma_backward(p.q, p.k, p.v, p.pk, p.pv, p.kv_start, p.phi, dout, lse, plse, Dw, Dp, causal,
                                      scale, dq, dk, dv)) {
      gpa_bwd_dq_kernel<T, DMAX><<<blocks_for(g.B * g.H * g.Tq), kWarps * 32, 0, stream>>>(
          g, qp, p.k.const_data_ptr<T>(), p.v.const_data_ptr<T>(), ptr_or_null<T>(p.pk), ptr_or_null<T>(p.pv),
          ptr_or_null<int64_t>(p.kv_start), phip, dop, lse.const_data_ptr<float>(), plse.const_data_ptr<float>(),
          Dw.const_data_ptr<float>(), Dp.const_data_ptr<float>(), dq.mutable_data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (g.Tk > 0) {
        gpa_bwd_dkv_kernel<T, DMAX><<<blocks_for(g.B * g.Hkv * g.Tk), kWarps * 32, 0, stream>>>(
            g, qp, p.k.const_data_ptr<T>(), p.v.const_data_ptr<T>(), ptr_or_null<int64_t>(p.kv_start), dop,
            lse.const_data_ptr<float>(), Dw.const_data_ptr<float>(), dk.mutable_data_ptr<T>(),
            dv.mutable_data_ptr<T>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
    if (g.has_prompt) {
      const int64_t rows = (g.Bp == 1 ? g.B : 1) * g.rep * g.Tq;
      const int64_t chunks = (rows + kPromptRowChunk - 1) / kPromptRowChunk;
      at::Tensor part_k = at::empty({chunks, g.Bp, g.K, g.Hkv, g.d}, p.q.options().dtype(at::kFloat));
      at::Tensor part_v = at::empty_like(part_k);
      gpa_bwd_dpkv_kernel<T, DMAX><<<blocks_for(chunks * g.Bp * g.Hkv * g.K), kWarps * 32, 0, stream>>>(
          g, qp, p.pk.const_data_ptr<T>(), p.pv.const_data_ptr<T>(), phip, dop, plse.const_data_ptr<float>(),
          Dp.const_data_ptr<float>(), chunks, part_k.mutable_data_ptr<float>(), part_v.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      // ordered reductions (at::sum on CUDA is deterministic)
      dpk.copy_(part_k.sum(0));
      dpv.copy_(part_v.sum(0));
      dgate.copy_(p.dphi * Dp.sum({0, 2}));
    }
  });
  return {dq, dk, dv, dpk, dpv, dgate};
}

}  // namespace

TORCH_LIBRARY_IMPL(lladapter, CUDA, m) {
  m.impl("gated_prompt_attention", &gated_prompt_attention_cuda);
  m.impl("gated_prompt_attention_backward", &gated_prompt_attention_backward_cuda);
}

}  // namespace lladapter::cuda_impl
