// Gated prompt attention on CUDA: the op entry points, the dispatcher that picks the kernels of each call, and
// the SIMT kernels (no tensor cores; every dtype and head dim the op takes), forward and backward. The
// tensor-core kernels live in gated_prompt_attention_mma.cu, the split-K decode forward in
// gated_prompt_attention_decode.cu (gated_prompt_attention_cuda.h is the interface). fp32 accumulation, the same passes
// and the same masking rules as the CPU kernel (csrc/cpu/gated_prompt_attention.cpp). The same source runs on the CPU
// through the emulator (compat.h, docs/emulator.md).
//
// SIMT layout of the work (one warp = one work item, kWarps independent warps per block, no block-wide sync):
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
//            The tensor-core kernels replace dq and dkv where the dispatcher picks them.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "gated_prompt_attention_cuda.h"
#include "gated_prompt_attention_simt.cuh"
#include "ops_cuda.h"

namespace lladapter::cuda_impl {
namespace {

constexpr int64_t kPromptRowChunk = 512;  // query rows per warp in the prompt-gradient kernel

template <typename T, int DMAX>
__global__ void gpa_fwd_kernel(GatedPromptAttentionProblem g, const T* __restrict__ q, const T* __restrict__ k,
                               const T* __restrict__ v, const T* __restrict__ pk, const T* __restrict__ pv,
                               const int64_t* __restrict__ kv_start, const float* __restrict__ phi, T* __restrict__ out,
                               float* __restrict__ lse, float* __restrict__ plse) {
  constexpr int NT = DMAX / 32;
  LL_SHARED(float, qs_all, [kWarps][DMAX]);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp;  // (b, h, i) with i fastest
  if (row >= g.B * g.H * g.Tq) return;  // whole warps leave; no block-wide synchronisation below
  const int64_t i = row % g.Tq, h = (row / g.Tq) % g.H, b = row / (g.Tq * g.H), hkv = h / g.rep;
  float* qs = qs_all[warp];
  const T* qr = q + ((b * g.Tq + i) * g.H + h) * g.d;
  const float scale = static_cast<float>(g.scale);
  for (int64_t c = lane; c < DMAX; c += 32) qs[c] = c < g.d ? static_cast<float>(qr[c]) * scale : 0.f;
  __syncwarp();
  const int64_t stride = g.Hkv * g.d;
  float acc[NT], m = -INFINITY, l = 0.f;
#pragma unroll
  for (int t = 0; t < NT; ++t) acc[t] = 0.f;
  int64_t lo, hi;
  word_range(g, kv_start, b, i, lo, hi);
  attend_warp<T, NT>(qs, k + (b * g.Tk * g.Hkv + hkv) * g.d, v + (b * g.Tk * g.Hkv + hkv) * g.d, stride, lo, hi, g.d, m,
                     l, acc, lane);
  const int64_t si = (b * g.H + h) * g.Tq + i;
  // l = 0: no allowed word key, the word branch gives 0; l = NaN: a non-finite score, which stays NaN
  const float inv = l != 0.f ? 1.f / l : 0.f;
#pragma unroll
  for (int t = 0; t < NT; ++t) acc[t] *= inv;
  if (lane == 0) lse[si] = l != 0.f ? m + logf(l) : -INFINITY;
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

template <typename T, int DMAX>
__global__ void gpa_bwd_pre_kernel(GatedPromptAttentionProblem g, const T* __restrict__ q, const T* __restrict__ pk,
                                   const T* __restrict__ pv, const float* __restrict__ phi, const T* __restrict__ dout,
                                   const T* __restrict__ out, float* __restrict__ Dw, float* __restrict__ Dp) {
  constexpr int NT = DMAX / 32;
  LL_SHARED(float, qs_all, [kWarps][DMAX]);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (row >= g.B * g.H * g.Tq) return;
  const int64_t i = row % g.Tq, h = (row / g.Tq) % g.H, b = row / (g.Tq * g.H), hkv = h / g.rep;
  const int64_t roff = ((b * g.Tq + i) * g.H + h) * g.d;
  float dpr = 0.f;
  if (g.has_prompt) {
    float* qs = qs_all[warp];
    const float scale = static_cast<float>(g.scale);
    for (int64_t c = lane; c < DMAX; c += 32) qs[c] = c < g.d ? static_cast<float>(q[roff + c]) * scale : 0.f;
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
  for (int64_t c = lane; c < g.d; c += 32)
    part = fmaf(static_cast<float>(dout[roff + c]), static_cast<float>(out[roff + c]), part);
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
      const float dsj = __shfl_sync(kFullMask, ds, jj);
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
__global__ void gpa_bwd_dq_kernel(GatedPromptAttentionProblem g, const T* __restrict__ q, const T* __restrict__ k,
                                  const T* __restrict__ v, const T* __restrict__ pk, const T* __restrict__ pv,
                                  const int64_t* __restrict__ kv_start, const float* __restrict__ phi,
                                  const T* __restrict__ dout, const float* __restrict__ lse,
                                  const float* __restrict__ plse, const float* __restrict__ Dw,
                                  const float* __restrict__ Dp, T* __restrict__ dq) {
  constexpr int NT = DMAX / 32;
  LL_SHARED(float, qs_all, [kWarps][DMAX]);
  LL_SHARED(float, do_all, [kWarps][DMAX]);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (row >= g.B * g.H * g.Tq) return;
  const int64_t i = row % g.Tq, h = (row / g.Tq) % g.H, b = row / (g.Tq * g.H), hkv = h / g.rep;
  const int64_t roff = ((b * g.Tq + i) * g.H + h) * g.d;
  float* qs = qs_all[warp];
  float* dos = do_all[warp];
  const float scale = static_cast<float>(g.scale);
  for (int64_t c = lane; c < DMAX; c += 32) {
    qs[c] = c < g.d ? static_cast<float>(q[roff + c]) * scale : 0.f;
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
    if (c < g.d) dq[roff + c] = static_cast<T>(acc[t] * scale);
  }
}

// Gradient of one key (kj, vj in shared memory) from query rows [r0, r1) of the flattened (b, h of the group, i)
// list of its kv head; rows are scored 32 at a time, lane r taking row r0 + r.
//   dV += factor * P * dout_i,  dK += dS * scale * q_i,  dS = factor * P * (dout_i . vj - D_i)
template <typename T, int NT>
__device__ void kv_rows_warp(const GatedPromptAttentionProblem& g, const float* kj, const float* vj, int64_t j,
                             bool word, int64_t hkv, int64_t b0, int64_t nb, int64_t r0, int64_t r1,
                             const int64_t* kv_start, const T* q, const T* dout, const float* lse, const float* D,
                             const float* phi, float (&dk)[NT], float (&dv)[NT], int lane) {
  const int64_t per_b = g.rep * g.Tq;
  const float scale = static_cast<float>(g.scale);
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
        const float pr = expf(dot_rows(q + roff, kj, g.d) * scale - L);
        ds = factor * pr * (dot_rows(dout + roff, vj, g.d) - D[si]);
        p = factor * pr;
      }
    }
    const int n = static_cast<int>(min_i64(32, r1 - x0));
    for (int rr = 0; rr < n; ++rr) {
      const float pr = __shfl_sync(kFullMask, p, rr);
      const float dsr = __shfl_sync(kFullMask, ds, rr);
      if (pr == 0.f && dsr == 0.f) continue;  // warp-uniform (shuffled values)
      const int64_t xx = x0 + rr;
      const int64_t b = b0 + xx / per_b, h = hkv * g.rep + (xx % per_b) / g.Tq, i = xx % g.Tq;
      const int64_t roff = ((b * g.Tq + i) * g.H + h) * g.d;
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        const int64_t c = lane + 32 * t;
        if (c < g.d) {
          dv[t] = fmaf(pr, static_cast<float>(dout[roff + c]), dv[t]);
          dk[t] = fmaf(dsr * scale, static_cast<float>(q[roff + c]), dk[t]);
        }
      }
    }
  }
}

template <typename T, int DMAX>
__global__ void gpa_bwd_dkv_kernel(GatedPromptAttentionProblem g, const T* __restrict__ q, const T* __restrict__ k,
                                   const T* __restrict__ v, const int64_t* __restrict__ kv_start,
                                   const T* __restrict__ dout, const float* __restrict__ lse,
                                   const float* __restrict__ Dw, T* __restrict__ dk, T* __restrict__ dv) {
  constexpr int NT = DMAX / 32;
  LL_SHARED(float, k_all, [kWarps][DMAX]);
  LL_SHARED(float, v_all, [kWarps][DMAX]);
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
__global__ void gpa_bwd_dpkv_kernel(GatedPromptAttentionProblem g, const T* __restrict__ q, const T* __restrict__ pk,
                                    const T* __restrict__ pv, const float* __restrict__ phi, const T* __restrict__ dout,
                                    const float* __restrict__ plse, const float* __restrict__ Dp, int64_t chunks,
                                    float* __restrict__ part_k, float* __restrict__ part_v) {
  constexpr int NT = DMAX / 32;
  LL_SHARED(float, k_all, [kWarps][DMAX]);
  LL_SHARED(float, v_all, [kWarps][DMAX]);
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

// ---------------------------------------------------------------------------------------------- dispatcher
constexpr const char* kOp = "lladapter::gated_prompt_attention";
constexpr const char* kBwdOp = "lladapter::gated_prompt_attention_backward";

// The two environment policies, read on every call (tests and benchmarks switch them), in this one place:
//   LLADAPTER_CUDA_ATTN    unset, "" or "mma": the tensor-core kernels where they take the call; "simt": never
//   LLADAPTER_CUDA_DECODE  unset, "" or "auto": the split-K decode forward when Tq <= kDecodeMaxTq and
//                          Tk >= 2 * kDecodeMinChunk; "splitk": always, with chunks as small as one tile (tests use
//                          it to put chunk edges at small Tk); "off": never
enum class DecodeMode { kAuto, kForce, kOff };

struct AttnPolicy {
  bool tensor_cores;
  DecodeMode decode;
};

AttnPolicy policy_from_env() {
  AttnPolicy policy{true, DecodeMode::kAuto};
  if (const char* env = std::getenv("LLADAPTER_CUDA_ATTN"); env != nullptr && env[0] != '\0') {
    const std::string mode(env);
    TORCH_CHECK(mode == "mma" || mode == "simt", kOp, ": the environment variable LLADAPTER_CUDA_ATTN must be 'mma' ",
                "or 'simt' (or unset), got '", mode, "'");
    policy.tensor_cores = mode == "mma";
  }
  if (const char* env = std::getenv("LLADAPTER_CUDA_DECODE"); env != nullptr && env[0] != '\0') {
    const std::string mode(env);
    TORCH_CHECK(mode == "auto" || mode == "splitk" || mode == "off", kOp,
                ": the environment variable LLADAPTER_CUDA_DECODE must be 'auto', 'splitk' or 'off' (or unset), got '",
                mode, "'");
    policy.decode = mode == "splitk" ? DecodeMode::kForce : mode == "off" ? DecodeMode::kOff : DecodeMode::kAuto;
  }
  return policy;
}

// The split-K decode plan when the policy and the shape select it (few query rows, many keys).
std::optional<DecodePlan> choose_decode(const AttnPolicy& policy, const GatedPromptAttentionProblem& g,
                                        const AttnTensors& t, const ll::DeviceProps& props) {
  if (policy.decode == DecodeMode::kOff) return std::nullopt;
  const bool forced = policy.decode == DecodeMode::kForce;
  if (!forced && (g.Tq > kDecodeMaxTq || g.Tk < 2 * kDecodeMinChunk)) return std::nullopt;
  return plan_decode(g, t, forced ? kDecodeTileKeys : kDecodeMinChunk, props.sm_count);
}

// ---------------------------------------------------------------------------------------------- host side
struct Prepared {
  GatedPromptAttentionProblem g;
  AttnTensors t;
};

// kv_row_views (the forward): k and v with dense rows are kept as they are, views of a longer KV cache included,
// for the split-K decode kernels, which read them with their batch stride; the forward makes them contiguous when
// another kernel takes the call. Without it, and for any other layout, they are made contiguous here.
Prepared prepare(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const std::optional<at::Tensor>& pk, const std::optional<at::Tensor>& pv,
                 const std::optional<at::Tensor>& gate, const std::optional<at::Tensor>& kv_start,
                 const std::string& gate_act, bool causal, double scale, bool kv_row_views = false) {
  Prepared p;
  p.g = gated_prompt_attention_check_inputs(op, q, k, v, pk, pv, gate, kv_start, gate_act, causal, scale, ll::kTarget);
  const GatedPromptAttentionProblem& g = p.g;
  TORCH_CHECK(g.d == 64 || g.d == 80 || g.d == 96 || g.d == 128, op,
              ": the CUDA kernel supports head_dim (q.size(3)) in {64, 80, 96, 128}, got ", g.d,
              " (use backend='reference' or the CPU)");
  AttnTensors& t = p.t;
  t.q = q.contiguous();
  const bool keep_kv = kv_row_views && gated_prompt_attention_kv_rows_dense(k, v, g);
  t.k = keep_kv ? k : k.contiguous();
  t.v = keep_kv ? v : v.contiguous();
  if (g.has_prompt) {
    t.pk = pk->contiguous();
    t.pv = pv->contiguous();
  }
  if (kv_start.has_value()) t.kv_start = kv_start->to(at::kLong).contiguous();
  if (gate.has_value()) {
    const at::Tensor gf = gate->to(at::kFloat);
    t.phi = g.tanh_gate ? gf.tanh().contiguous() : gf.contiguous();
    t.dphi = g.tanh_gate ? t.phi.mul(t.phi).neg().add(1) : gf.new_ones(gf.sizes());  // 1 - phi^2 (exactly)
  }
  return p;
}

// Calls f.template operator()<T, DMAX>() for q's dtype and the head-dim bucket (64 or 128 columns per lane set).
template <typename F>
void dispatch_simt(at::ScalarType t, int64_t d, F&& f) {
  const bool small = d <= 64;
  switch (t) {
    case at::kFloat:
      return small ? f.template operator()<float, 64>() : f.template operator()<float, 128>();
    case at::kBFloat16:
      return small ? f.template operator()<at::BFloat16, 64>() : f.template operator()<at::BFloat16, 128>();
    case at::kHalf:
      return small ? f.template operator()<at::Half, 64>() : f.template operator()<at::Half, 128>();
    default:
      TORCH_CHECK(false, kOp, ": unsupported dtype ", t);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_prompt_attention_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const std::optional<at::Tensor>& pk_in,
    const std::optional<at::Tensor>& pv_in, const std::optional<at::Tensor>& gate,
    const std::optional<at::Tensor>& kv_start_in, bool causal, std::string gate_act, double scale) {
  const ll::DeviceGuard guard(q_in.device());
  Prepared p = prepare(kOp, q_in, k_in, v_in, pk_in, pv_in, gate, kv_start_in, gate_act, causal, scale,
                       /*kv_row_views=*/true);
  const GatedPromptAttentionProblem& g = p.g;
  AttnTensors& t = p.t;
  const AttnPolicy policy = policy_from_env();
  at::Tensor out = t.q.new_empty(t.q.sizes());
  at::Tensor lse = t.q.new_empty({g.B, g.H, g.Tq}, at::kFloat);
  at::Tensor plse = t.q.new_empty({g.B, g.H, g.Tq}, at::kFloat);
  if (out.numel() == 0) return {out, lse, plse};
  const ll::DeviceProps props = ll::device_props();
  // few query rows and many keys (decode): split-K, before the tensor-core / SIMT choice
  if (const auto plan = choose_decode(policy, g, t, props)) {
    launch_decode_forward(g, *plan, t, out, lse, plse);
    return {out, lse, plse};
  }
  t.k = t.k.contiguous();  // (a KV-cache view: the other kernels read k and v contiguous)
  t.v = t.v.contiguous();
  if (policy.tensor_cores && mma_supports(g, t, {&out}, props, /*backward=*/false)) {
    launch_mma_forward(g, t, out, lse, plse);
    return {out, lse, plse};
  }
  const ll::Stream stream = ll::current_stream();
  dispatch_simt(t.q.scalar_type(), g.d, [&]<typename T, int DMAX>() {
    LL_LAUNCH(blocks_for(g.B * g.H * g.Tq), kWarps * 32, 0, stream, gpa_fwd_kernel<T, DMAX>)(
        g, t.q.const_data_ptr<T>(), t.k.const_data_ptr<T>(), t.v.const_data_ptr<T>(), ptr_or_null<T>(t.pk),
        ptr_or_null<T>(t.pv), ptr_or_null<int64_t>(t.kv_start), ptr_or_null<float>(t.phi), out.mutable_data_ptr<T>(),
        lse.mutable_data_ptr<float>(), plse.mutable_data_ptr<float>());
    LL_LAUNCH_CHECK();
  });
  return {out, lse, plse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_prompt_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const std::optional<at::Tensor>& pk_in, const std::optional<at::Tensor>& pv_in,
    const std::optional<at::Tensor>& gate, const std::optional<at::Tensor>& kv_start_in, const at::Tensor& out_in,
    const at::Tensor& lse_in, const at::Tensor& plse_in, bool causal, std::string gate_act, double scale) {
  const ll::DeviceGuard guard(q_in.device());
  const Prepared p = prepare(kBwdOp, q_in, k_in, v_in, pk_in, pv_in, gate, kv_start_in, gate_act, causal, scale);
  const GatedPromptAttentionProblem& g = p.g;
  const AttnTensors& t = p.t;
  gated_prompt_attention_check_backward_inputs(kBwdOp, g, grad_out, q_in, out_in, lse_in, plse_in, ll::kTarget);
  const AttnPolicy policy = policy_from_env();
  const at::Tensor out = out_in.contiguous();
  AttnBackwardTensors bt;
  bt.dout = grad_out.contiguous();
  bt.lse = lse_in.contiguous();
  bt.plse = plse_in.contiguous();
  at::Tensor dpk, dpv, dgate;
  std::tie(bt.dq, bt.dk, bt.dv, dpk, dpv, dgate) = gated_prompt_attention_zero_grads(t.q, t.k, t.v, pk_in, gate, g.H);
  if (t.q.numel() == 0) return {bt.dq, bt.dk, bt.dv, dpk, dpv, dgate};
  bt.Dw = t.q.new_empty({g.B, g.H, g.Tq}, at::kFloat);
  bt.Dp = t.q.new_empty({g.B, g.H, g.Tq}, at::kFloat);
  const ll::DeviceProps props = ll::device_props();
  const bool tensor_cores =
      policy.tensor_cores && mma_supports(g, t, {&bt.dout, &bt.dq, &bt.dk, &bt.dv}, props, /*backward=*/true);
  const ll::Stream stream = ll::current_stream();
  dispatch_simt(t.q.scalar_type(), g.d, [&]<typename T, int DMAX>() {
    const T* qp = t.q.const_data_ptr<T>();
    const T* dop = bt.dout.const_data_ptr<T>();
    const float* phip = ptr_or_null<float>(t.phi);
    LL_LAUNCH(blocks_for(g.B * g.H * g.Tq), kWarps * 32, 0, stream, gpa_bwd_pre_kernel<T, DMAX>)(
        g, qp, ptr_or_null<T>(t.pk), ptr_or_null<T>(t.pv), phip, dop, out.const_data_ptr<T>(),
        bt.Dw.mutable_data_ptr<float>(), bt.Dp.mutable_data_ptr<float>());
    LL_LAUNCH_CHECK();
    if (tensor_cores) {
      // dq (both branches) and the word keys' dk, dv on tensor cores
      launch_mma_backward(g, t, bt);
    } else {
      LL_LAUNCH(blocks_for(g.B * g.H * g.Tq), kWarps * 32, 0, stream, gpa_bwd_dq_kernel<T, DMAX>)(
          g, qp, t.k.const_data_ptr<T>(), t.v.const_data_ptr<T>(), ptr_or_null<T>(t.pk), ptr_or_null<T>(t.pv),
          ptr_or_null<int64_t>(t.kv_start), phip, dop, bt.lse.const_data_ptr<float>(), bt.plse.const_data_ptr<float>(),
          bt.Dw.const_data_ptr<float>(), bt.Dp.const_data_ptr<float>(), bt.dq.mutable_data_ptr<T>());
      LL_LAUNCH_CHECK();
      if (g.Tk > 0) {
        LL_LAUNCH(blocks_for(g.B * g.Hkv * g.Tk), kWarps * 32, 0, stream, gpa_bwd_dkv_kernel<T, DMAX>)(
            g, qp, t.k.const_data_ptr<T>(), t.v.const_data_ptr<T>(), ptr_or_null<int64_t>(t.kv_start), dop,
            bt.lse.const_data_ptr<float>(), bt.Dw.const_data_ptr<float>(), bt.dk.mutable_data_ptr<T>(),
            bt.dv.mutable_data_ptr<T>());
        LL_LAUNCH_CHECK();
      }
    }
    if (g.has_prompt) {
      const int64_t rows = (g.Bp == 1 ? g.B : 1) * g.rep * g.Tq;
      const int64_t chunks = (rows + kPromptRowChunk - 1) / kPromptRowChunk;
      at::Tensor part_k = t.q.new_empty({chunks, g.Bp, g.K, g.Hkv, g.d}, at::kFloat);
      at::Tensor part_v = t.q.new_empty(part_k.sizes(), at::kFloat);
      LL_LAUNCH(blocks_for(chunks * g.Bp * g.Hkv * g.K), kWarps * 32, 0, stream, gpa_bwd_dpkv_kernel<T, DMAX>)(
          g, qp, t.pk.const_data_ptr<T>(), t.pv.const_data_ptr<T>(), phip, dop, bt.plse.const_data_ptr<float>(),
          bt.Dp.const_data_ptr<float>(), chunks, part_k.mutable_data_ptr<float>(), part_v.mutable_data_ptr<float>());
      LL_LAUNCH_CHECK();
      // ordered reductions (at::sum on CUDA is deterministic)
      dpk.copy_(part_k.sum(0));
      dpv.copy_(part_v.sum(0));
      dgate.copy_(t.dphi.mul(bt.Dp.sum(at::IntArrayRef{0, 2})));
    }
  });
  return {bt.dq, bt.dk, bt.dv, dpk, dpv, dgate};
}

}  // namespace lladapter::cuda_impl
