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
//  decode    (Tq <= 4 and Tk >= 256, or forced by LLADAPTER_CUDA_DECODE=splitk; takes precedence over the
//            tensor-core and SIMT forwards) flash-decoding: a partial kernel per (b, kv head, rows of the GQA
//            group, key chunk) writes fp32 (m, l, unnormalised acc) per chunk; a combine kernel (warp per row)
//            merges them in chunk order, adds the prompt branch and writes out, lse, prompt_lse. The decode
//            kernels were written after the rest, also without a GPU: they compile for sm_80 / sm_90 here but
//            have NEVER RUN (tests/test_prompt_attention_decode.py holds their CUDA tests).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>

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

// ---------------------------------------------------------------------------------------------- decode (split-K)
// Flash-decoding forward for few query rows and many word keys (Tq <= kDecodeMaxTq): the per-row SIMT kernel
// streams all Tk keys with one warp and the tensor-core kernel has one CTA per (b, h) for Tq = 1, both far too
// few to keep a GPU's memory system busy. Here the word keys of each batch row are split into nsplit chunks:
//  partial  one block per (b, kv head, group of kDecRows rows, chunk). The rows of a (b, kv head) are the
//           rep * Tq pairs (query head of the group, query), row x = hl * Tq + i, so one block serves every
//           query head of a GQA group and each K/V tile is read from memory once for all of them. K/V tiles of
//           kDecKeys keys go to shared memory as fp32 (16-byte vector loads when aligned); warp w owns the block's
//           rows w + kDecWarps * u: lane j scores key j0 + j for all of its rows, one online-softmax update per
//           row and tile, then P V with lanes owning output columns. Writes the chunk's m, l and unnormalised
//           accumulator (fp32) per (b, h, i, chunk) to a workspace; an empty chunk writes m = -inf, l = 0, acc 0.
//  combine  one warp per (b, h, i): merges the chunks in chunk order (deterministic) into the normalised word
//           output and its lse, runs the prompt branch (K small) like gpa_fwd_kernel and writes out once.
constexpr int kDecWarps = 4;
constexpr int kDecThreads = 32 * kDecWarps;
constexpr int kDecRowsPerWarp = 4;
constexpr int kDecRows = kDecWarps * kDecRowsPerWarp;  // rows per partial block
constexpr int kDecKeys = 32;                             // keys per shared-memory tile: one per lane when scoring

struct DecGeo {
  Geo g;
  int64_t rows;        // rep * Tq: rows of one (b, kv head)
  int64_t row_groups;  // ceil(rows / kDecRows)
  int64_t nsplit;      // chunks of the word keys per batch row
  bool vec16;          // k and v storage 16-byte aligned: vector loads
};

// Copies rows [0, n) of a K and a V tile (row r at src + r * stride, D contiguous elements) to shared memory as fp32
// with row stride D + 1 (odd: lane j reading row j at column c hits bank (j * (D + 1) + c) % 32, distinct over j);
// rows [n, kDecKeys) are zero-filled so no uninitialised shared memory is ever read. With vec16 all loads of a
// thread are issued before any conversion (every row start is 16-byte aligned: the base is, and D * sizeof(T) is a
// multiple of 16 for every supported D).
template <typename T, int D>
__device__ __forceinline__ void dec_load_kv_tile(float* __restrict__ ks, float* __restrict__ vs,
                                                 const T* __restrict__ ksrc, const T* __restrict__ vsrc,
                                                 int64_t stride, int n, bool vec16) {
  constexpr int LD = D + 1;
  if (vec16) {
    constexpr int kVec = 16 / static_cast<int>(sizeof(T));
    static_assert(D % kVec == 0, "a row is a whole number of 16-byte vectors");
    constexpr int kVecsPerRow = D / kVec;
    constexpr int kTotal = kDecKeys * kVecsPerRow;
    constexpr int kPerThread = (kTotal + kDecThreads - 1) / kDecThreads;
    uint4 kraw[kPerThread], vraw[kPerThread];
#pragma unroll
    for (int it = 0; it < kPerThread; ++it) {
      const int x = threadIdx.x + it * kDecThreads;
      const int r = x / kVecsPerRow, c = (x % kVecsPerRow) * kVec;
      kraw[it] = vraw[it] = make_uint4(0u, 0u, 0u, 0u);
      if (x < kTotal && r < n) {
        kraw[it] = *reinterpret_cast<const uint4*>(ksrc + r * stride + c);
        vraw[it] = *reinterpret_cast<const uint4*>(vsrc + r * stride + c);
      }
    }
#pragma unroll
    for (int it = 0; it < kPerThread; ++it) {
      const int x = threadIdx.x + it * kDecThreads;
      if (x < kTotal) {
        const int r = x / kVecsPerRow, c = (x % kVecsPerRow) * kVec;
        const T* kv = reinterpret_cast<const T*>(&kraw[it]);  // zero bits are 0 in every dtype
        const T* vv = reinterpret_cast<const T*>(&vraw[it]);
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          ks[r * LD + c + e] = static_cast<float>(kv[e]);
          vs[r * LD + c + e] = static_cast<float>(vv[e]);
        }
      }
    }
  } else {
    for (int x = threadIdx.x; x < kDecKeys * D; x += kDecThreads) {
      const int r = x / D, c = x % D;
      const bool in = r < n;
      ks[r * LD + c] = in ? static_cast<float>(ksrc[r * stride + c]) : 0.f;
      vs[r * LD + c] = in ? static_cast<float>(vsrc[r * stride + c]) : 0.f;
    }
  }
}

// grid: B * Hkv * row_groups * nsplit blocks (chunk fastest), kDecThreads threads.
// part_ml [B * H * Tq, nsplit, 2] (m, l), part_acc [B * H * Tq, nsplit, D], indexed by the stat row
// si = (b * H + h) * Tq + i, which for h = hkv * rep + hl is (b * H + hkv * rep) * Tq + x with x = hl * Tq + i.
template <typename T, int D>
__global__ void __launch_bounds__(kDecThreads)
    gpa_decode_partial_kernel(DecGeo dg, const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                              const int64_t* __restrict__ kv_start, float* __restrict__ part_ml,
                              float* __restrict__ part_acc) {
  constexpr int LD = D + 1;
  constexpr int NT = (D + 31) / 32;  // output columns lane + 32 t per lane
  constexpr int RPW = kDecRowsPerWarp;
  __shared__ float Ks[kDecKeys * LD];
  __shared__ float Vs[kDecKeys * LD];
  __shared__ float Qs[kDecRows * D];
  const Geo& g = dg.g;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int64_t blk = blockIdx.x;
  const int64_t split = blk % dg.nsplit;
  blk /= dg.nsplit;
  const int64_t rg = blk % dg.row_groups;
  blk /= dg.row_groups;
  const int64_t hkv = blk % g.Hkv, b = blk / g.Hkv;
  const int64_t row0 = rg * kDecRows;  // the block's first row x

  // the block's scaled query rows; rows past the last are zeros
  for (int e = threadIdx.x; e < kDecRows * D; e += kDecThreads) {
    const int64_t x = row0 + e / D;
    float val = 0.f;
    if (x < dg.rows) {
      const int64_t hl = x / g.Tq, i = x % g.Tq;
      val = static_cast<float>(q[((b * g.Tq + i) * g.H + hkv * g.rep + hl) * D + e % D]) * g.scale;
    }
    Qs[e] = val;
  }

  // The keys any query of batch row b may see lie in [lo_min, Tk) (causal: the last query sees up to Tk - 1).
  // That range is cut into nsplit chunks of whole tiles; a chunk past the end is empty.
  int64_t lo_min = 0;
  if (kv_start != nullptr) {
    if (g.kv_per_query) {
      lo_min = g.Tk;
      for (int64_t i = 0; i < g.Tq; ++i) lo_min = min_i64(lo_min, min(max(kv_start[b * g.Tq + i], int64_t(0)), g.Tk));
    } else {
      lo_min = min(max(kv_start[b], int64_t(0)), g.Tk);
    }
  }
  const int64_t ntiles = (g.Tk - lo_min + kDecKeys - 1) / kDecKeys;
  const int64_t per = (ntiles + dg.nsplit - 1) / dg.nsplit;  // tiles per chunk
  const int64_t c0 = min_i64(g.Tk, lo_min + split * per * kDecKeys);
  const int64_t c1 = min_i64(g.Tk, lo_min + (split + 1) * per * kDecKeys);

  // this warp's rows x = row0 + warp + kDecWarps * u (warp-uniform validity) and their allowed keys [lo, hi)
  bool valid[RPW];
  int64_t lo_r[RPW], hi_r[RPW];
  float m[RPW], l[RPW], acc[RPW][NT];
#pragma unroll
  for (int u = 0; u < RPW; ++u) {
    const int64_t x = row0 + warp + kDecWarps * u;
    valid[u] = x < dg.rows;
    lo_r[u] = 0;
    hi_r[u] = 0;
    if (valid[u]) word_range(g, kv_start, b, x % g.Tq, lo_r[u], hi_r[u]);
    m[u] = -INFINITY;
    l[u] = 0.f;
#pragma unroll
    for (int t = 0; t < NT; ++t) acc[u][t] = 0.f;
  }

  const int64_t stride = g.Hkv * D;                     // elements between consecutive keys
  const int64_t kv_off = (b * g.Tk * g.Hkv + hkv) * D;  // key j at k + kv_off + j * stride
  for (int64_t j0 = c0; j0 < c1; j0 += kDecKeys) {
    const int n = static_cast<int>(min_i64(kDecKeys, c1 - j0));
    __syncthreads();  // the previous tile's reads are done (first tile: orders the Qs writes before the reads)
    dec_load_kv_tile<T, D>(Ks, Vs, k + kv_off + j0 * stride, v + kv_off + j0 * stride, stride, n, dg.vec16);
    __syncthreads();
    // scores of key j0 + lane against every row of the warp (each K element read once for all rows)
    float s[RPW];
#pragma unroll
    for (int u = 0; u < RPW; ++u) s[u] = 0.f;
    const float* krow = Ks + lane * LD;
#pragma unroll 8
    for (int c = 0; c < D; ++c) {
      const float kc = krow[c];
#pragma unroll
      for (int u = 0; u < RPW; ++u) {
        if (valid[u]) s[u] = fmaf(Qs[(warp + kDecWarps * u) * D + c], kc, s[u]);
      }
    }
    const int64_t j = j0 + lane;
    float p[RPW];
#pragma unroll
    for (int u = 0; u < RPW; ++u) {
      const bool allowed = valid[u] && lane < n && j >= lo_r[u] && j < hi_r[u];
      p[u] = 0.f;
      if (__any_sync(kFull, allowed)) {  // warp-uniform: a row with no allowed key in this tile keeps its state
        const float sm = allowed ? s[u] : -INFINITY;
        const float m_new = fmaxf(m[u], warp_max(sm));  // finite: some lane is allowed
        const float alpha = expf(m[u] - m_new);         // 0 on the row's first keys (m = -inf)
        p[u] = allowed ? expf(sm - m_new) : 0.f;
        l[u] = l[u] * alpha + warp_sum(p[u]);
#pragma unroll
        for (int t = 0; t < NT; ++t) acc[u][t] *= alpha;
        m[u] = m_new;
      }
    }
    // P V: key jj's probability comes from lane jj; lanes own the output columns
    for (int jj = 0; jj < n; ++jj) {
      float pj[RPW];
#pragma unroll
      for (int u = 0; u < RPW; ++u) pj[u] = __shfl_sync(kFull, p[u], jj);
      const float* vrow = Vs + jj * LD;
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        const int c = lane + 32 * t;
        if (c < D) {
          const float vc = vrow[c];
#pragma unroll
          for (int u = 0; u < RPW; ++u) {
            if (valid[u]) acc[u][t] = fmaf(pj[u], vc, acc[u][t]);
          }
        }
      }
    }
  }

#pragma unroll
  for (int u = 0; u < RPW; ++u) {
    if (!valid[u]) continue;
    const int64_t x = row0 + warp + kDecWarps * u;
    const int64_t w = ((b * g.H + hkv * g.rep) * g.Tq + x) * dg.nsplit + split;
    if (lane == 0) {
      part_ml[2 * w] = m[u];
      part_ml[2 * w + 1] = l[u];
    }
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      const int c = lane + 32 * t;
      if (c < D) part_acc[w * D + c] = acc[u][t];
    }
  }
}

// grid blocks_for(B * H * Tq), kWarps * 32 threads: warp per stat row si = (b * H + h) * Tq + i.
template <typename T, int D>
__global__ void gpa_decode_combine_kernel(DecGeo dg, const T* __restrict__ q, const T* __restrict__ pk,
                                          const T* __restrict__ pv, const float* __restrict__ phi,
                                          const float* __restrict__ part_ml, const float* __restrict__ part_acc,
                                          T* __restrict__ out, float* __restrict__ lse, float* __restrict__ plse) {
  constexpr int NT = (D + 31) / 32;
  __shared__ float qs_all[kWarps][D];
  const Geo& g = dg.g;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t si = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (si >= g.B * g.H * g.Tq) return;  // whole warps leave; no block-wide synchronisation below
  const int64_t i = si % g.Tq, h = (si / g.Tq) % g.H, b = si / (g.Tq * g.H), hkv = h / g.rep;
  const int64_t nsplit = dg.nsplit;
  const float* ml = part_ml + si * nsplit * 2;
  const float* pacc = part_acc + si * nsplit * D;

  // word branch: M = max over chunks; then the chunks in order, 32 at a time (lane s holds chunk s0 + s)
  float M = -INFINITY;
  for (int64_t s = lane; s < nsplit; s += 32) M = fmaxf(M, ml[2 * s]);
  M = warp_max(M);
  float L = 0.f, acc[NT];
#pragma unroll
  for (int t = 0; t < NT; ++t) acc[t] = 0.f;
  if (M != -INFINITY) {  // warp-uniform
    for (int64_t s0 = 0; s0 < nsplit; s0 += 32) {
      const int64_t s = s0 + lane;
      float f = 0.f, ls = 0.f;
      if (s < nsplit) {
        const float ms = ml[2 * s];
        if (ms != -INFINITY) {  // an empty chunk contributes nothing; its accumulator is not read
          f = expf(ms - M);
          ls = ml[2 * s + 1];
        }
      }
      const int cnt = static_cast<int>(min_i64(32, nsplit - s0));
      for (int jj = 0; jj < cnt; ++jj) {
        const float fj = __shfl_sync(kFull, f, jj);
        const float lj = __shfl_sync(kFull, ls, jj);
        if (fj == 0.f) continue;  // warp-uniform (shuffled value)
        L = fmaf(fj, lj, L);
        const float* src = pacc + (s0 + jj) * D;
#pragma unroll
        for (int t = 0; t < NT; ++t) {
          const int c = lane + 32 * t;
          if (c < D) acc[t] = fmaf(fj, src[c], acc[t]);
        }
      }
    }
  }
  // L >= 1 when M is finite (the chunk holding the maximum has l >= exp(0)); no allowed key: the word branch is 0
  const float inv = L > 0.f ? 1.f / L : 0.f;
#pragma unroll
  for (int t = 0; t < NT; ++t) acc[t] *= inv;
  if (lane == 0) lse[si] = L > 0.f ? M + logf(L) : -INFINITY;

  // prompt branch, as in gpa_fwd_kernel
  if (g.has_prompt) {
    float* qs = qs_all[warp];
    const T* qr = q + ((b * g.Tq + i) * g.H + h) * D;
    for (int c = lane; c < D; c += 32) qs[c] = static_cast<float>(qr[c]) * g.scale;
    __syncwarp();
    float pacc2[NT], pm = -INFINITY, pl = 0.f;
#pragma unroll
    for (int t = 0; t < NT; ++t) pacc2[t] = 0.f;
    const int64_t poff = ((g.Bp == 1 ? 0 : b) * g.K * g.Hkv + hkv) * D;
    attend_warp<T, NT>(qs, pk + poff, pv + poff, g.Hkv * D, 0, g.K, D, pm, pl, pacc2, lane);
    const float w = phi[h] / pl;
#pragma unroll
    for (int t = 0; t < NT; ++t) acc[t] = fmaf(w, pacc2[t], acc[t]);
    if (lane == 0) plse[si] = pm + logf(pl);
  } else if (lane == 0) {
    plse[si] = -INFINITY;
  }
  T* orow = out + ((b * g.Tq + i) * g.H + h) * D;
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    const int c = lane + 32 * t;
    if (c < D) orow[c] = static_cast<T>(acc[t]);
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

// ---- decode path selection (LLADAPTER_CUDA_DECODE, read on every call)
// auto (unset, "" or "auto"): the split-K decode kernels when Tq <= kDecodeMaxTq and Tk >= 2 * kDecodeMinChunk;
// "splitk": always, with chunks as small as one tile (tests use it to put chunk edges at small Tk); "off": never
// (the tensor-core / SIMT kernels, as before).
constexpr int64_t kDecodeMaxTq = 4;       // query rows per (b, h) up to which the forward counts as decode
constexpr int64_t kDecodeMinChunk = 128;  // fewest keys per chunk in auto mode (CPU: 2 key blocks of 64)
constexpr int64_t kDecodeBlocksPerSm = 4; // partial blocks aimed for per SM (about 41 KiB shared memory each)

enum class DecodeMode { kAuto, kForce, kOff };

DecodeMode decode_mode_from_env() {
  const char* env = std::getenv("LLADAPTER_CUDA_DECODE");
  if (env == nullptr || env[0] == '\0') return DecodeMode::kAuto;
  const std::string mode(env);
  if (mode == "auto") return DecodeMode::kAuto;
  if (mode == "splitk") return DecodeMode::kForce;
  if (mode == "off") return DecodeMode::kOff;
  TORCH_CHECK(false, kOp, ": the environment variable LLADAPTER_CUDA_DECODE must be 'auto', 'splitk' or 'off' ",
              "(or unset), got '", mode, "'");
}

// Number of key chunks: enough (b, kv head, row group, chunk) blocks to give every SM kDecodeBlocksPerSm of them,
// but no chunk shorter than min_chunk keys (the CPU kernel's rule with SMs for threads and 128-key chunks for
// its 64-key blocks). When the rows alone fill the GPU this is 1: a per-query pass that still reads each K/V
// row once per GQA group.
int64_t decode_splits(int64_t groups, int64_t Tk, int64_t min_chunk, int64_t sms) {
  const int64_t target = kDecodeBlocksPerSm * sms;
  const int64_t max_split = std::max<int64_t>(1, (Tk + min_chunk - 1) / min_chunk);
  return std::clamp<int64_t>((target + groups - 1) / groups, 1, max_split);
}

// Calls f.template operator()<T, D>() for q's dtype and the exact head dim (prepare() checked it).
template <typename F>
void dispatch_decode(at::ScalarType t, int64_t d, F&& f) {
  auto by_dim = [&]<typename T>() {
    switch (d) {
      case 64: return f.template operator()<T, 64>();
      case 80: return f.template operator()<T, 80>();
      case 96: return f.template operator()<T, 96>();
      case 128: return f.template operator()<T, 128>();
      default: TORCH_CHECK(false, kOp, ": no decode kernel for head dim ", d);
    }
  };
  switch (t) {
    case at::kFloat: return by_dim.template operator()<float>();
    case at::kBFloat16: return by_dim.template operator()<at::BFloat16>();
    case at::kHalf: return by_dim.template operator()<at::Half>();
    default: TORCH_CHECK(false, kOp, ": unsupported dtype ", t);
  }
}

bool aligned16(const at::Tensor& t) {
  return t.numel() == 0 || reinterpret_cast<std::uintptr_t>(t.const_data_ptr()) % 16 == 0;
}

// Runs the split-K decode forward into out / lse / plse when LLADAPTER_CUDA_DECODE and the shape select it.
bool try_decode_forward(const Prepared& p, at::Tensor& out, at::Tensor& lse, at::Tensor& plse) {
  const DecodeMode mode = decode_mode_from_env();
  if (mode == DecodeMode::kOff) return false;
  const Geo& g = p.g;
  if (mode == DecodeMode::kAuto && (g.Tq > kDecodeMaxTq || g.Tk < 2 * kDecodeMinChunk)) return false;
  DecGeo dg{};
  dg.g = g;
  dg.rows = g.rep * g.Tq;
  dg.row_groups = (dg.rows + kDecRows - 1) / kDecRows;
  const int64_t groups = g.B * g.Hkv * dg.row_groups;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  dg.nsplit = decode_splits(groups, g.Tk, mode == DecodeMode::kForce ? kDecKeys : kDecodeMinChunk, sms);
  if (groups * dg.nsplit > std::numeric_limits<int32_t>::max()) return false;  // 1-D grid limit
  dg.vec16 = aligned16(p.k) && aligned16(p.v);
  const int64_t stat_rows = g.B * g.H * g.Tq;
  const auto f32 = p.q.options().dtype(at::kFloat);
  at::Tensor part_ml = at::empty({stat_rows, dg.nsplit, 2}, f32);
  at::Tensor part_acc = at::empty({stat_rows, dg.nsplit, g.d}, f32);
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_decode(p.q.scalar_type(), g.d, [&]<typename T, int D>() {
    gpa_decode_partial_kernel<T, D><<<static_cast<unsigned>(groups * dg.nsplit), kDecThreads, 0, stream>>>(
        dg, p.q.const_data_ptr<T>(), p.k.const_data_ptr<T>(), p.v.const_data_ptr<T>(),
        ptr_or_null<int64_t>(p.kv_start), part_ml.mutable_data_ptr<float>(), part_acc.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    gpa_decode_combine_kernel<T, D><<<blocks_for(stat_rows), kWarps * 32, 0, stream>>>(
        dg, p.q.const_data_ptr<T>(), ptr_or_null<T>(p.pk), ptr_or_null<T>(p.pv), ptr_or_null<float>(p.phi),
        part_ml.const_data_ptr<float>(), part_acc.const_data_ptr<float>(), out.mutable_data_ptr<T>(),
        lse.mutable_data_ptr<float>(), plse.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return true;
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
  // few query rows and many keys (decode): the split-K kernels above, before the tensor-core / SIMT choice
  if (try_decode_forward(p, out, lse, plse)) return {out, lse, plse};
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
      dgate.copy_(p.dphi * Dp.sum(at::IntArrayRef{0, 2}));
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
