// Gated prompt attention, tensor-core forward and backward (nvcuda::wmma, bf16/fp16 operands, fp32 accumulation),
// sm_80+. Written without a GPU; runs on the emulator in every `make test` (docs/emulator.md) and matched it on an
// H200 (tests/test_emulator_vs_gpu.py, 2026-11-29). See docs/gated_prompt_attention.md.
// Same contract and masking rules as the SIMT kernel (gated_prompt_attention.cu) and the CPU kernel:
//   out_i = sum_j a_ij v_j + phi(g_h) * sum_p b_ip pv_p, two separate softmaxes, lse / prompt_lse per (b, h, i) in
//   units of the scaled scores, -inf where a branch has no key; a row with no allowed word key gets 0 from it.
//
// Tiling: one CTA per (query block of 64 rows, head h, batch b), 4 warps, warp w owns rows q0 + 16w .. + 15.
//  - The Q tile is staged in shared memory once and kept as wmma A fragments in registers.
//  - Word keys [lo, hi_cta) in blocks of 64: K and V tiles (zero-filled past the range) in shared memory;
//    per warp S = Q K^T (wmma, fp32) -> per-warp fp32 scratch X; online softmax in fp32 by lane pairs (lane
//    2r + half owns row r, columns half + 2t); P = exp(s - m) rounded to the dtype -> per-warp P tile;
//    X = P V (wmma, fp32); the lanes rescale their output registers by alpha and add X. A warp whose rows all
//    end before a block (causal) skips it; the CTA stops at the last key any of its rows may see.
//  - Prompt branch after the words, two passes over its blocks of 64 keys: pass 0 gets max / sum, pass 1 adds
//    (phi(g_h) / l_p) * exp(s - m_p) pv to the normalised word output in registers; with K <= 64 the prompt
//    tile is loaded once. Then the single write of out.
// The fp32 scratch X holds S, then (after a __syncwarp) the P V product: the two never live at the same time.
//
// Backward (FlashAttention-2 recomputation from the saved lse / prompt_lse; the caller's SIMT pre pass has written
// Dw_i = dout_i . out_word_i and Dp_i = dout_i . prompt_out_i; dpk, dpv, dgate stay on the SIMT kernels):
//   P_ij = exp(scale q_i . k_j - lse_i) on allowed keys, dP_ij = dout_i . v_j, dS_ij = P_ij (dP_ij - Dw_i);
//   dv_j = sum_i P_ij dout_i, dk_j = scale sum_i dS_ij q_i, dq_i = scale (sum_j dS_ij k_j + sum_p dS'_ip pk_p)
//   with the prompt's dS'_ip = phi(g_h) P'_ip (dP'_ip - Dp_i) from prompt_lse.
//  - dq kernel: one CTA per (query block of 64, head, batch), the forward's tiling: warp w owns 16 rows, Q_w
//    and dout_w are A fragments in registers; per block of 64 word keys (then of prompt keys) S = Q K^T and
//    dP = dout V^T (wmma, fp32) into two per-warp scratch tiles, dS by lane pairs (lane 2r + half: row r,
//    columns half + 2t) rounded to the dtype into a per-warp tile, dq += dS K (wmma) into fp32 accumulator
//    fragments that stay in registers over all key blocks. The same block ranges and skips as the forward.
//  - dk/dv kernel: one CTA per (block of 64 word keys, kv head, batch); warp w owns keys j0 + 16w .. + 15,
//    K_w and V_w are A fragments in registers, dk_w and dv_w fp32 accumulator fragments. The CTA loops over the
//    H / Hkv query heads of the kv head and, from the first query row that sees one of its keys (causal), over
//    blocks of 64 query rows: Q and dout tiles and the rows' lse / Dw in shared memory; S^T = K_w Q^T and
//    dP^T = V_w dout^T (wmma) into the scratch tiles, P^T and dS^T by lane pairs (row r: a key, columns: queries)
//    rounded to the dtype, then dv += P^T dout and dk += dS^T Q (wmma). Keys left of kv_start get 0.
//  - Both write once (fp32 accumulators -> the row tiles' shared memory, no longer in use -> the dtype):
//    no atomics, a fixed summation order, so the backward is deterministic.
//  - Rounding: P (for dv) and dS (for dq, dk) are rounded to the dtype before the products, as FlashAttention
//    does; everything else is fp32.
#include <cmath>
#include <cstdint>
#include <initializer_list>

#include "compat.h"
#include "device_utils.cuh"
#include "gated_prompt_attention_cuda.h"

namespace lladapter::cuda_impl {
namespace {

constexpr int kMmaWarps = 4;
constexpr int kBlockM = 16 * kMmaWarps;  // query rows per CTA (16 per warp: one wmma row tile)
constexpr int kBlockN = 64;              // keys per block; the Q staging tile reuses the K tile, so kBlockM == kBlockN
constexpr int kThreads = 32 * kMmaWarps;
static_assert(kBlockM == kBlockN, "the Q tile is staged in the K tile's shared memory");

// Shared memory of one CTA (bytes; every region starts at a multiple of 128 bytes, which wmma's 32-byte
// alignment of fragment pointers needs): K tile, V tile (16-bit, kBlockN x LDT), per-warp fp32 scratch
// (16 x LDX), per-warp P tile (16-bit, 16 x LDP). Row strides are padded (wmma wants multiples of 16 bytes) to
// spread shared-memory banks.
template <int D>
struct Layout {
  static constexpr int LDT = D + 8;
  static constexpr int LDP = kBlockN + 8;
  static constexpr int LDX = (D > kBlockN ? D : kBlockN) + 4;
  static constexpr size_t kTileBytes = size_t(kBlockN) * LDT * 2;
  static constexpr size_t kScratchBytes = size_t(kMmaWarps) * 16 * LDX * 4;
  static constexpr size_t kPBytes = size_t(kMmaWarps) * 16 * LDP * 2;
  static constexpr size_t kSmemBytes = 2 * kTileBytes + kScratchBytes + kPBytes;
  static_assert(D % 16 == 0, "head dim must be a multiple of the 16-wide wmma tile");
  static_assert(kTileBytes % 128 == 0 && kScratchBytes % 128 == 0, "regions must stay 128-byte aligned");
};

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}

// Exclusive end of the word keys query row i may see (causal: bottom-right aligned, j <= i + Tk - Tq).
__device__ __forceinline__ int64_t word_hi(const GatedPromptAttentionProblem& g, int64_t i) {
  return g.causal ? imin(g.Tk, i + g.Tk - g.Tq + 1) : g.Tk;
}

// Copies rows [0, n_valid) of a kBlockN-row tile (row r at src + r * src_stride, D contiguous elements) to shared
// memory (row stride LDT) with 16-byte vectors; rows [n_valid, kBlockN) are zero-filled so that masked keys
// multiply exact zeros (never stale data or NaN). The host checks 16-byte alignment of every base pointer, and
// D * 2 bytes is a multiple of 16, so every vector is aligned.
template <typename T, int D>
__device__ __forceinline__ void load_tile(T* __restrict__ dst, const T* __restrict__ src, int64_t src_stride,
                                          int n_valid) {
  constexpr int kVecs = D / 8;  // 8 16-bit elements per 16-byte vector
  constexpr int LDT = Layout<D>::LDT;
  constexpr int kPerThread = kBlockN * kVecs / kThreads;
  static_assert(kBlockN * kVecs % kThreads == 0, "every thread copies the same number of vectors");
#pragma unroll  // a fixed trip count: the loads of one thread can all be in flight together
  for (int it = 0; it < kPerThread; ++it) {
    const int x = threadIdx.x + it * kThreads;
    const int r = x / kVecs, c = (x % kVecs) * 8;
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    if (r < n_valid) val = *reinterpret_cast<const uint4*>(src + r * src_stride + c);
    *reinterpret_cast<uint4*>(dst + r * LDT + c) = val;
  }
}

#if LL_MMA_DECLS
namespace wmma = nvcuda::wmma;

template <typename T>
using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
using FragAcc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// X[16, 16 * n16] = Q_w (16 x D, A fragments) . K_tile[0 : 16 * n16, :]^T, fp32, X with row stride LDX. K is
// stored row-major (key n, dim k at Ks[n * LDT + k]), i.e. the B operand (k x n) in column-major with ldm = LDT.
// (The backward passes other row tiles in both roles: K_w . Q_tile^T, V_w . dout_tile^T, dout_w . V_tile^T.)
template <typename T, int D, int LDX = Layout<D>::LDX>
__device__ __forceinline__ void warp_scores(const FragA<T> (&qa)[D / 16], const T* Ks, float* X, int n16) {
  constexpr int LDT = Layout<D>::LDT;
#pragma unroll
  for (int nt = 0; nt < kBlockN / 16; ++nt) {
    if (nt < n16) {
      FragAcc acc;
      wmma::fill_fragment(acc, 0.f);
#pragma unroll
      for (int kt = 0; kt < D / 16; ++kt) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> kb;
        wmma::load_matrix_sync(kb, Ks + nt * 16 * LDT + kt * 16, LDT);
        wmma::mma_sync(acc, qa[kt], kb, acc);
      }
      wmma::store_matrix_sync(X + nt * 16, acc, LDX, wmma::mem_row_major);
    }
  }
}

// X[16, D] = P_w[16, 0 : 16 * n16] . V_tile[0 : 16 * n16, :], fp32. P (row-major, ldm LDP) is the A operand,
// V (row-major, key k, dim n at Vs[k * LDT + n]) the B operand.
template <typename T, int D>
__device__ __forceinline__ void warp_pv(const T* P, const T* Vs, float* X, int n16) {
  constexpr int LDT = Layout<D>::LDT, LDP = Layout<D>::LDP, LDX = Layout<D>::LDX;
  FragA<T> pa[kBlockN / 16];
#pragma unroll
  for (int kt = 0; kt < kBlockN / 16; ++kt) {
    if (kt < n16) wmma::load_matrix_sync(pa[kt], P + kt * 16, LDP);
  }
#pragma unroll
  for (int dt = 0; dt < D / 16; ++dt) {
    FragAcc acc;
    wmma::fill_fragment(acc, 0.f);
#pragma unroll
    for (int kt = 0; kt < kBlockN / 16; ++kt) {
      if (kt < n16) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> vb;
        wmma::load_matrix_sync(vb, Vs + kt * 16 * LDT + dt * 16, LDT);
        wmma::mma_sync(acc, pa[kt], vb, acc);
      }
    }
    wmma::store_matrix_sync(X + dt * 16, acc, LDX, wmma::mem_row_major);
  }
}

// Column range [c_lo, c_hi) of a block starting at key key0 that holds the keys [lo, hi) (empty when hi <= lo).
__device__ __forceinline__ void block_cols(int64_t key0, int64_t lo, int64_t hi, int& c_lo, int& c_hi) {
  c_lo = static_cast<int>(imin(imax(lo - key0, int64_t(0)), int64_t(kBlockN)));
  c_hi = static_cast<int>(imin(imax(hi - key0, int64_t(0)), int64_t(kBlockN)));
}

// Online-softmax step of one row over a block of scores (xrow: the row's fp32 scores; column c is allowed when
// c_lo <= c < c_hi, see block_cols; only allowed columns are read). The two lanes of a pair (half = 0, 1) each
// take the columns c = half + 2t and combine by shuffle, so both hold the same m and l. Writes
// P = exp(s - m_new) (0 where not allowed) to prow in the dtype, updates m and l (l from the unrounded fp32 P,
// as the lse contract needs), and returns alpha = exp(m_old - m_new), the factor for the old accumulator.
template <typename T>
__device__ __forceinline__ float softmax_step(const float* xrow, T* prow, int c_lo, int c_hi, float scale, float& m,
                                              float& l, int half) {
  float bmax = -INFINITY;
#pragma unroll
  for (int t = 0; t < kBlockN / 2; ++t) {
    const int c = half + 2 * t;
    if (c >= c_lo && c < c_hi) bmax = fmax_keep_nan(bmax, xrow[c] * scale);
  }
  bmax = fmax_keep_nan(bmax, __shfl_xor_sync(kFullMask, bmax, 1));
  const float m_new = fmax_keep_nan(m, bmax);
  // m_new = -inf and no allowed key in this block: none so far, keep everything at 0 (exp(-inf - -inf) is NaN).
  // With allowed keys that all score -inf the row becomes NaN, as softmax does; a NaN score keeps m_new NaN.
  const bool any = m_new != -INFINITY || c_lo < c_hi;
  const float alpha = any ? expf(m - m_new) : 1.f;  // m = -inf, m_new finite: 0
  float psum = 0.f;
#pragma unroll
  for (int t = 0; t < kBlockN / 2; ++t) {
    const int c = half + 2 * t;
    float p = 0.f;
    if (any && c >= c_lo && c < c_hi) p = expf(xrow[c] * scale - m_new);
    psum += p;
    prow[c] = from_float<T>(p);
  }
  psum += __shfl_xor_sync(kFullMask, psum, 1);
  l = l * alpha + psum;
  m = m_new;
  return alpha;
}

// P = exp(s - m) for a row whose final maximum m is known (prompt pass 1); 0 where not allowed.
template <typename T>
__device__ __forceinline__ void probs_final(const float* xrow, T* prow, int c_lo, int c_hi, float scale, float m,
                                            int half) {
#pragma unroll
  for (int t = 0; t < kBlockN / 2; ++t) {
    const int c = half + 2 * t;
    float p = 0.f;
    if (m != -INFINITY && c >= c_lo && c < c_hi) p = expf(xrow[c] * scale - m);
    prow[c] = from_float<T>(p);
  }
}
#endif  // LL_MMA_DECLS

// grid (ceil(Tq / kBlockM), H, B), kThreads threads, Layout<D>::kSmemBytes dynamic shared memory.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    gpa_fwd_mma_kernel(GatedPromptAttentionProblem g, const T* __restrict__ q, const T* __restrict__ k,
                       const T* __restrict__ v, const T* __restrict__ pk, const T* __restrict__ pv,
                       const int64_t* __restrict__ kv_start, const float* __restrict__ phi, T* __restrict__ out,
                       float* __restrict__ lse, float* __restrict__ plse) {
#if LL_MMA_CODE
  using L = Layout<D>;
  LL_DYNAMIC_SHARED(unsigned char, smem, 128);
  T* Ks = reinterpret_cast<T*>(smem);
  T* Vs = reinterpret_cast<T*>(smem + L::kTileBytes);
  float* X_all = reinterpret_cast<float*>(smem + 2 * L::kTileBytes);
  T* P_all = reinterpret_cast<T*>(smem + 2 * L::kTileBytes + L::kScratchBytes);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int r = lane >> 1, half = lane & 1;  // this lane's row within the warp's 16, and its column parity
  float* X = X_all + warp * 16 * L::LDX;
  T* P = P_all + warp * 16 * L::LDP;
  float* xrow = X + r * L::LDX;
  T* prow = P + r * L::LDP;

  // the last query blocks see the most keys (causal): launch them first
  const int64_t qblk = static_cast<int64_t>(gridDim.x) - 1 - blockIdx.x;
  const int64_t h = blockIdx.y, b = blockIdx.z, hkv = h / g.rep;
  const int64_t q0 = qblk * kBlockM;
  const int n_rows = static_cast<int>(imin(kBlockM, g.Tq - q0));  // >= 1 by the grid size
  const int64_t q_stride = g.H * D, kv_stride = g.Hkv * D;        // elements between consecutive rows
  const T* q_base = q + (b * g.Tq * g.H + h) * D;                 // row i at q_base + i * q_stride
  const int64_t kv_off = (b * g.Tk * g.Hkv + hkv) * D;            // key j at k + kv_off + j * kv_stride

  // Word keys: [lo, row_hi) for each row; the CTA loops over [lo, cta_hi), cta_hi being its last row's end.
  const int64_t lo = kv_start ? imin(imax(kv_start[b], int64_t(0)), g.Tk) : int64_t(0);
  const int64_t cta_hi = word_hi(g, q0 + n_rows - 1);
  const int64_t warp_row0 = q0 + warp * 16;
  const bool warp_active = warp_row0 < g.Tq;  // uniform per warp: a warp past Tq only joins the block syncs
  const int64_t warp_hi = warp_active ? word_hi(g, imin(warp_row0 + 15, g.Tq - 1)) : int64_t(0);
  const int64_t i = warp_row0 + r;
  const bool row_valid = i < g.Tq;
  const int64_t row_hi = row_valid ? word_hi(g, i) : lo;  // an invalid (tail) row allows no key

  // Q tile -> shared memory (the K tile's space) -> this warp's A fragments.
  load_tile<T, D>(Ks, q_base + q0 * q_stride, q_stride, n_rows);
  __syncthreads();
  FragA<T> qa[D / 16];
#pragma unroll
  for (int kt = 0; kt < D / 16; ++kt) wmma::load_matrix_sync(qa[kt], Ks + warp * 16 * L::LDT + kt * 16, L::LDT);
  // (every loop below starts with __syncthreads before it overwrites Ks, which orders these reads first)

  float o[D / 2];  // this lane's output columns half + 2t of row r
#pragma unroll
  for (int t = 0; t < D / 2; ++t) o[t] = 0.f;
  float m = -INFINITY, l = 0.f;

  // ------------------------------------------------------------------ word branch (online softmax)
  for (int64_t j0 = lo; j0 < cta_hi; j0 += kBlockN) {
    const int n_keys = static_cast<int>(imin(kBlockN, cta_hi - j0));
    __syncthreads();  // the previous block's (or the Q staging) reads are done
    load_tile<T, D>(Ks, k + kv_off + j0 * kv_stride, kv_stride, n_keys);
    load_tile<T, D>(Vs, v + kv_off + j0 * kv_stride, kv_stride, n_keys);
    __syncthreads();
    if (warp_active && j0 < warp_hi) {     // warp-uniform
      const int n16 = (n_keys + 15) / 16;  // allowed columns are < n_keys <= 16 * n16: the rest is never read
      warp_scores<T, D>(qa, Ks, X, n16);
      __syncwarp();
      int c_lo, c_hi;
      block_cols(j0, lo, row_hi, c_lo, c_hi);
      const float alpha = softmax_step<T>(xrow, prow, c_lo, c_hi, g.scale, m, l, half);
      __syncwarp();  // P written and S read by all lanes before P V overwrites X
      warp_pv<T, D>(P, Vs, X, n16);
      __syncwarp();
#pragma unroll
      for (int t = 0; t < D / 2; ++t) o[t] = fmaf(o[t], alpha, xrow[half + 2 * t]);
      __syncwarp();  // X read before the next block's scores overwrite it
    }
  }
  const float inv_l = l != 0.f ? 1.f / l : 0.f;  // l = 0: no allowed word key, the word branch gives 0 (NaN stays)
#pragma unroll
  for (int t = 0; t < D / 2; ++t) o[t] *= inv_l;
  const int64_t si = (b * g.H + h) * g.Tq + i;
  if (row_valid && half == 0) lse[si] = l != 0.f ? m + logf(l) : -INFINITY;

  // ------------------------------------------------------------------ prompt branch (separate softmax)
  if (g.K > 0) {
    const int64_t p_off = ((g.Bp == 1 ? 0 : b) * g.K * g.Hkv + hkv) * D;  // prompt key p at pk + p_off + p * kv_stride
    const int64_t p_hi = row_valid ? g.K : 0;
    const bool resident = g.K <= kBlockN;  // one block: load it once for both passes
    float pm = -INFINITY, pl = 0.f;
    for (int pass = 0; pass < 2; ++pass) {
      for (int64_t p0 = 0; p0 < g.K; p0 += kBlockN) {
        const int n_keys = static_cast<int>(imin(kBlockN, g.K - p0));
        const int n16 = (n_keys + 15) / 16;
        if (pass == 0 || !resident) {  // CTA-uniform
          __syncthreads();
          load_tile<T, D>(Ks, pk + p_off + p0 * kv_stride, kv_stride, n_keys);
          load_tile<T, D>(Vs, pv + p_off + p0 * kv_stride, kv_stride, n_keys);
          __syncthreads();
        }
        if (warp_active) {
          warp_scores<T, D>(qa, Ks, X, n16);
          __syncwarp();
          int c_lo, c_hi;
          block_cols(p0, 0, p_hi, c_lo, c_hi);
          if (pass == 0) {
            softmax_step<T>(xrow, prow, c_lo, c_hi, g.scale, pm, pl, half);  // statistics only
            __syncwarp();
          } else {
            probs_final<T>(xrow, prow, c_lo, c_hi, g.scale, pm, half);
            __syncwarp();
            warp_pv<T, D>(P, Vs, X, n16);
            __syncwarp();
            const float w = pl != 0.f ? phi[h] / pl : 0.f;  // phi(g_h) / l_p: gate applied before the single write
#pragma unroll
            for (int t = 0; t < D / 2; ++t) o[t] = fmaf(w, xrow[half + 2 * t], o[t]);
            __syncwarp();
          }
        }
      }
    }
    if (row_valid && half == 0) plse[si] = pm + logf(pl);  // K > 0: pl >= 1 (the maximum contributes exp(0))
  } else if (row_valid && half == 0) {
    plse[si] = -INFINITY;
  }

  if (row_valid) {
    T* orow = out + (b * g.Tq + i) * q_stride + h * D;
#pragma unroll
    for (int t = 0; t < D / 2; ++t) orow[half + 2 * t] = from_float<T>(o[t]);
  }
#endif  // LL_MMA_CODE
}

// ---------------------------------------------------------------------------------------------- backward
// Shared memory of one backward CTA (bytes; regions at multiples of 128 bytes): two 16-bit row tiles (kBlockN x
// LDT: K and V in the dq kernel, Q and dout in the dk/dv kernel), two per-warp fp32 scratch tiles of 16 x LDS
// (the scores and dP of one 16 x 64 block), two per-warp 16-bit tiles of 16 x LDP (P and dS), and the lse / D of
// the dk/dv kernel's 64 query rows. At the end the two row tiles hold each warp's 16 x D fp32 result (16 x LDX)
// on its way to global memory (LDX <= LDT: it fits).
template <int D>
struct BwdLayout {
  using F = Layout<D>;
  static constexpr int LDT = F::LDT, LDP = F::LDP, LDX = F::LDX;
  static constexpr int LDS = kBlockN + 4;
  static constexpr size_t kScratchBytes = size_t(kMmaWarps) * 16 * LDS * 4;
  static constexpr size_t kTileA = 0, kTileB = F::kTileBytes;
  static constexpr size_t kX = 2 * F::kTileBytes, kY = kX + kScratchBytes;
  static constexpr size_t kP0 = kY + kScratchBytes, kP1 = kP0 + F::kPBytes;
  static constexpr size_t kStats = kP1 + F::kPBytes;
  static constexpr size_t kSmemBytes = kStats + 2 * kBlockM * sizeof(float);
  static_assert(kScratchBytes % 128 == 0 && F::kPBytes % 128 == 0, "regions must stay 128-byte aligned");
  static_assert(size_t(kMmaWarps) * 16 * LDX * 4 <= 2 * F::kTileBytes, "the fp32 results must fit the row tiles");
};

#if LL_MMA_DECLS
// acc[dt] += A_w[16, 0 : 16 * n16] . Bs[0 : 16 * n16, 16 dt : 16 dt + 16] for every column tile dt, fp32
// accumulators kept in registers across calls. A (row-major, ldm LDP: a per-warp P or dS tile) is the A operand,
// Bs (row-major, row k at Bs + k * LDT: a kBlockN-row tile) the B operand, as V in warp_pv.
template <typename T, int D>
__device__ __forceinline__ void warp_accumulate(const T* A, const T* Bs, FragAcc (&acc)[D / 16], int n16) {
  constexpr int LDT = Layout<D>::LDT, LDP = Layout<D>::LDP;
#pragma unroll
  for (int kt = 0; kt < kBlockN / 16; ++kt) {  // one A fragment live at a time (the callers hold many registers)
    if (kt < n16) {
      FragA<T> a;
      wmma::load_matrix_sync(a, A + kt * 16, LDP);
#pragma unroll
      for (int dt = 0; dt < D / 16; ++dt) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bf;
        wmma::load_matrix_sync(bf, Bs + kt * 16 * LDT + dt * 16, LDT);
        wmma::mma_sync(acc[dt], a, bf, acc[dt]);
      }
    }
  }
}

// Writes the warp's 16 x D accumulators to X (fp32, row stride LDX), then lane pair 2r + half writes columns
// half + 2t of row r times mult, rounded to the dtype, to dst_row (nullptr: row r is not written).
template <typename T, int D>
__device__ __forceinline__ void warp_write_rows(const FragAcc (&acc)[D / 16], float* X, T* dst_row, float mult, int r,
                                                int half) {
  constexpr int LDX = Layout<D>::LDX;
#pragma unroll
  for (int dt = 0; dt < D / 16; ++dt) wmma::store_matrix_sync(X + dt * 16, acc[dt], LDX, wmma::mem_row_major);
  __syncwarp();
  if (dst_row != nullptr) {
#pragma unroll
    for (int t = 0; t < D / 2; ++t) dst_row[half + 2 * t] = from_float<T>(X[r * LDX + half + 2 * t] * mult);
  }
  __syncwarp();  // X read by every lane before anything overwrites it
}

// dq kernel, one query row over a block of keys: xrow = q_i . k_c (unscaled), yrow = dout_i . v_c (fp32); column
// c is allowed when c_lo <= c < c_hi (block_cols). Lane pair columns c = half + 2t. Writes
// dS = factor * P * (dP - D), P = exp(scale * s - L), to dsrow in the dtype (0 where not allowed, and everywhere
// when L = -inf: the branch has no key for this row), all kBlockN columns (the product reads 16 * n16 of them).
template <typename T>
__device__ __forceinline__ void dscores_row(const float* xrow, const float* yrow, T* dsrow, int c_lo, int c_hi,
                                            float scale, float L, float D, float factor, int half) {
  const bool any = L != -INFINITY;
#pragma unroll
  for (int t = 0; t < kBlockN / 2; ++t) {
    const int c = half + 2 * t;
    float ds = 0.f;
    if (any && c >= c_lo && c < c_hi) ds = factor * expf(xrow[c] * scale - L) * (yrow[c] - D);
    dsrow[c] = from_float<T>(ds);
  }
}

// dk/dv kernel, one key row j over a block of query columns: xrow = k_j . q_c (unscaled), yrow = v_j . dout_c
// (fp32); lse_c, D_c: the columns' statistics (shared memory; lse -inf: a row with no key). Column c is allowed
// when key_ok (j inside [lo, Tk)), c_first <= c (causal: earlier queries do not see key j) and c < n_cols.
// Writes P = exp(scale * s - lse_c) to prow and dS = P * (dP - D_c) to dsrow in the dtype, 0 where not allowed,
// all kBlockN columns.
template <typename T>
__device__ __forceinline__ void probs_dscores_col(const float* xrow, const float* yrow, T* prow, T* dsrow,
                                                  const float* lse_c, const float* D_c, bool key_ok, int c_first,
                                                  int n_cols, float scale, int half) {
#pragma unroll
  for (int t = 0; t < kBlockN / 2; ++t) {
    const int c = half + 2 * t;
    float p = 0.f, ds = 0.f;
    if (key_ok && c >= c_first && c < n_cols && lse_c[c] != -INFINITY) {
      p = expf(xrow[c] * scale - lse_c[c]);
      ds = p * (yrow[c] - D_c[c]);
    }
    prow[c] = from_float<T>(p);
    dsrow[c] = from_float<T>(ds);
  }
}
#endif  // LL_MMA_DECLS

// dq, both branches: grid (ceil(Tq / kBlockM), H, B), kThreads threads, BwdLayout<D>::kSmemBytes dynamic shared
// memory. Warp w owns query rows q0 + 16w .. + 15; Q_w and dout_w stay in registers as A fragments, dq_w in fp32
// accumulator fragments across all key blocks (word then prompt); one write.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    gpa_bwd_dq_mma_kernel(GatedPromptAttentionProblem g, const T* __restrict__ q, const T* __restrict__ k,
                          const T* __restrict__ v, const T* __restrict__ pk, const T* __restrict__ pv,
                          const int64_t* __restrict__ kv_start, const float* __restrict__ phi,
                          const T* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ plse,
                          const float* __restrict__ Dw, const float* __restrict__ Dp, T* __restrict__ dq) {
#if LL_MMA_CODE
  using BL = BwdLayout<D>;
  LL_DYNAMIC_SHARED(unsigned char, smem, 128);
  T* Ks = reinterpret_cast<T*>(smem + BL::kTileA);
  T* Vs = reinterpret_cast<T*>(smem + BL::kTileB);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int r = lane >> 1, half = lane & 1;  // this lane's row within the warp's 16, and its column parity
  float* X = reinterpret_cast<float*>(smem + BL::kX) + warp * 16 * BL::LDS;  // scores
  float* Y = reinterpret_cast<float*>(smem + BL::kY) + warp * 16 * BL::LDS;  // dP
  T* dS = reinterpret_cast<T*>(smem + BL::kP0) + warp * 16 * BL::LDP;

  // the last query blocks see the most keys (causal): launch them first
  const int64_t qblk = static_cast<int64_t>(gridDim.x) - 1 - blockIdx.x;
  const int64_t h = blockIdx.y, b = blockIdx.z, hkv = h / g.rep;
  const int64_t q0 = qblk * kBlockM;
  const int n_rows = static_cast<int>(imin(kBlockM, g.Tq - q0));  // >= 1 by the grid size
  const int64_t q_stride = g.H * D, kv_stride = g.Hkv * D;        // elements between consecutive rows
  const int64_t q_off = (b * g.Tq * g.H + h) * D;                 // row i of q, dout, dq at + q_off + i * q_stride
  const int64_t kv_off = (b * g.Tk * g.Hkv + hkv) * D;            // key j at k + kv_off + j * kv_stride

  // Word keys [lo, row_hi) per row, as in the forward; the CTA loops over [lo, cta_hi).
  const int64_t lo = kv_start ? imin(imax(kv_start[b], int64_t(0)), g.Tk) : int64_t(0);
  const int64_t cta_hi = word_hi(g, q0 + n_rows - 1);
  const int64_t warp_row0 = q0 + warp * 16;
  const bool warp_active = warp_row0 < g.Tq;  // uniform per warp: a warp past Tq only joins the block syncs
  const int64_t warp_hi = warp_active ? word_hi(g, imin(warp_row0 + 15, g.Tq - 1)) : int64_t(0);
  const int64_t i = warp_row0 + r;
  const bool row_valid = i < g.Tq;
  const int64_t row_hi = row_valid ? word_hi(g, i) : lo;  // an invalid (tail) row allows no key
  const int64_t si = (b * g.H + h) * g.Tq + i;

  // Q and dout tiles -> shared memory (the K and V tiles' space) -> this warp's A fragments.
  load_tile<T, D>(Ks, q + q_off + q0 * q_stride, q_stride, n_rows);
  load_tile<T, D>(Vs, dout + q_off + q0 * q_stride, q_stride, n_rows);
  __syncthreads();
  FragA<T> qa[D / 16], da[D / 16];
#pragma unroll
  for (int kt = 0; kt < D / 16; ++kt) {
    wmma::load_matrix_sync(qa[kt], Ks + warp * 16 * BL::LDT + kt * 16, BL::LDT);
    wmma::load_matrix_sync(da[kt], Vs + warp * 16 * BL::LDT + kt * 16, BL::LDT);
  }
  // (every loop below starts with __syncthreads before it overwrites Ks / Vs, which orders these reads first)
  FragAcc acc[D / 16];  // dq_w in units of the scaled query (times scale at the write)
#pragma unroll
  for (int dt = 0; dt < D / 16; ++dt) wmma::fill_fragment(acc[dt], 0.f);

  // ------------------------------------------------------------------ word keys: dS = P (dP - D_word)
  {
    const float row_lse = row_valid ? lse[si] : -INFINITY;
    const float row_D = row_valid ? Dw[si] : 0.f;
    for (int64_t j0 = lo; j0 < cta_hi; j0 += kBlockN) {
      const int n_keys = static_cast<int>(imin(kBlockN, cta_hi - j0));
      __syncthreads();  // the previous block's (or the staging) reads are done
      load_tile<T, D>(Ks, k + kv_off + j0 * kv_stride, kv_stride, n_keys);
      load_tile<T, D>(Vs, v + kv_off + j0 * kv_stride, kv_stride, n_keys);
      __syncthreads();
      if (warp_active && j0 < warp_hi) {  // warp-uniform
        const int n16 = (n_keys + 15) / 16;
        warp_scores<T, D, BL::LDS>(qa, Ks, X, n16);
        warp_scores<T, D, BL::LDS>(da, Vs, Y, n16);
        __syncwarp();
        int c_lo, c_hi;
        block_cols(j0, lo, row_hi, c_lo, c_hi);
        dscores_row<T>(X + r * BL::LDS, Y + r * BL::LDS, dS + r * BL::LDP, c_lo, c_hi, g.scale, row_lse, row_D, 1.f,
                       half);
        __syncwarp();  // dS written, X / Y read by all lanes
        warp_accumulate<T, D>(dS, Ks, acc, n16);
        __syncwarp();
      }
    }
  }

  // ------------------------------------------------------------------ prompt keys: dS = phi(g_h) P (dP - D_prompt)
  if (g.K > 0) {
    const int64_t p_off = ((g.Bp == 1 ? 0 : b) * g.K * g.Hkv + hkv) * D;  // prompt key p at pk + p_off + p * kv_stride
    const float row_lse = row_valid ? plse[si] : -INFINITY;
    const float row_D = row_valid ? Dp[si] : 0.f;
    const float factor = phi[h];
    const int64_t p_hi = row_valid ? g.K : 0;
    for (int64_t p0 = 0; p0 < g.K; p0 += kBlockN) {
      const int n_keys = static_cast<int>(imin(kBlockN, g.K - p0));
      __syncthreads();
      load_tile<T, D>(Ks, pk + p_off + p0 * kv_stride, kv_stride, n_keys);
      load_tile<T, D>(Vs, pv + p_off + p0 * kv_stride, kv_stride, n_keys);
      __syncthreads();
      if (warp_active) {
        const int n16 = (n_keys + 15) / 16;
        warp_scores<T, D, BL::LDS>(qa, Ks, X, n16);
        warp_scores<T, D, BL::LDS>(da, Vs, Y, n16);
        __syncwarp();
        int c_lo, c_hi;
        block_cols(p0, 0, p_hi, c_lo, c_hi);
        dscores_row<T>(X + r * BL::LDS, Y + r * BL::LDS, dS + r * BL::LDP, c_lo, c_hi, g.scale, row_lse, row_D, factor,
                       half);
        __syncwarp();
        warp_accumulate<T, D>(dS, Ks, acc, n16);
        __syncwarp();
      }
    }
  }

  __syncthreads();  // every warp is done with the row tiles: they now hold the fp32 result rows
  float* Xo = reinterpret_cast<float*>(smem + BL::kTileA) + warp * 16 * BL::LDX;
  if (warp_active) warp_write_rows<T, D>(acc, Xo, row_valid ? dq + q_off + i * q_stride : nullptr, g.scale, r, half);
#endif  // LL_MMA_CODE
}

// dk, dv of the word keys: grid (ceil(Tk / kBlockN), Hkv, B), kThreads threads, BwdLayout<D>::kSmemBytes dynamic
// shared memory. Warp w owns keys j0 + 16w .. + 15; K_w and V_w stay in registers as A fragments, dk_w and dv_w in
// fp32 accumulator fragments while the CTA loops over the query heads of the kv group and their query blocks
// (no atomics; a fixed order).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    gpa_bwd_dkv_mma_kernel(GatedPromptAttentionProblem g, const T* __restrict__ q, const T* __restrict__ k,
                           const T* __restrict__ v, const int64_t* __restrict__ kv_start, const T* __restrict__ dout,
                           const float* __restrict__ lse, const float* __restrict__ Dw, T* __restrict__ dk,
                           T* __restrict__ dv) {
#if LL_MMA_CODE
  using BL = BwdLayout<D>;
  LL_DYNAMIC_SHARED(unsigned char, smem, 128);
  T* Qs = reinterpret_cast<T*>(smem + BL::kTileA);
  T* Os = reinterpret_cast<T*>(smem + BL::kTileB);  // dout rows
  float* lse_s = reinterpret_cast<float*>(smem + BL::kStats);
  float* D_s = lse_s + kBlockM;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int r = lane >> 1, half = lane & 1;  // this lane's key row within the warp's 16, and its column parity
  float* X = reinterpret_cast<float*>(smem + BL::kX) + warp * 16 * BL::LDS;  // S^T: key rows, query columns
  float* Y = reinterpret_cast<float*>(smem + BL::kY) + warp * 16 * BL::LDS;  // dP^T
  T* Pt = reinterpret_cast<T*>(smem + BL::kP0) + warp * 16 * BL::LDP;
  T* dSt = reinterpret_cast<T*>(smem + BL::kP1) + warp * 16 * BL::LDP;

  const int64_t hkv = blockIdx.y, b = blockIdx.z;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kBlockN;
  const int n_keys = static_cast<int>(imin(kBlockN, g.Tk - j0));  // >= 1 by the grid size
  const int64_t q_stride = g.H * D, kv_stride = g.Hkv * D;
  const int64_t kv_off = (b * g.Tk * g.Hkv + hkv) * D;  // key j at k + kv_off + j * kv_stride
  const int64_t lo = kv_start ? imin(imax(kv_start[b], int64_t(0)), g.Tk) : int64_t(0);
  const int64_t off = g.Tk - g.Tq;  // causal: query i sees key j iff j <= i + off
  const int64_t warp_key0 = j0 + warp * 16;
  const int64_t j = warp_key0 + r;
  const bool key_ok = j >= lo && j < g.Tk;                           // no query sees a key left of kv_start
  const bool warp_active = warp_key0 < g.Tk && warp_key0 + 16 > lo;  // uniform per warp
  // first query row that sees a key of the CTA / of the warp (causal: key kk is seen from row kk - off on);
  // Tq (no query block) when the whole CTA block is left padding
  const int64_t cta_key_lo = imax(j0, lo);
  const int64_t i_first =
      cta_key_lo >= j0 + n_keys ? g.Tq : imin(g.causal ? imax(cta_key_lo - off, int64_t(0)) : int64_t(0), g.Tq);
  const int64_t warp_i_first = g.causal ? imax(imax(warp_key0, lo) - off, int64_t(0)) : int64_t(0);

  // K and V tiles -> shared memory (the Q and dout tiles' space) -> this warp's A fragments.
  load_tile<T, D>(Qs, k + kv_off + j0 * kv_stride, kv_stride, n_keys);
  load_tile<T, D>(Os, v + kv_off + j0 * kv_stride, kv_stride, n_keys);
  __syncthreads();
  FragA<T> ka[D / 16], va[D / 16];
#pragma unroll
  for (int kt = 0; kt < D / 16; ++kt) {
    wmma::load_matrix_sync(ka[kt], Qs + warp * 16 * BL::LDT + kt * 16, BL::LDT);
    wmma::load_matrix_sync(va[kt], Os + warp * 16 * BL::LDT + kt * 16, BL::LDT);
  }
  // (the loop starts with __syncthreads before it overwrites Qs / Os, which orders these reads first)
  FragAcc dka[D / 16], dva[D / 16];  // dk_w (times scale at the write) and dv_w
#pragma unroll
  for (int dt = 0; dt < D / 16; ++dt) {
    wmma::fill_fragment(dka[dt], 0.f);
    wmma::fill_fragment(dva[dt], 0.f);
  }

  for (int64_t h = hkv * g.rep; h < (hkv + 1) * g.rep; ++h) {
    const int64_t q_off = (b * g.Tq * g.H + h) * D;  // row i of q, dout at + q_off + i * q_stride
    const int64_t stat_off = (b * g.H + h) * g.Tq;   // lse / Dw of row i at + stat_off + i
    for (int64_t i0 = i_first; i0 < g.Tq; i0 += kBlockM) {
      const int n_rows = static_cast<int>(imin(kBlockM, g.Tq - i0));
      __syncthreads();  // the previous block's (or the staging) reads are done
      load_tile<T, D>(Qs, q + q_off + i0 * q_stride, q_stride, n_rows);
      load_tile<T, D>(Os, dout + q_off + i0 * q_stride, q_stride, n_rows);
      if (threadIdx.x < kBlockM) {
        const int c = threadIdx.x;
        lse_s[c] = c < n_rows ? lse[stat_off + i0 + c] : -INFINITY;
        D_s[c] = c < n_rows ? Dw[stat_off + i0 + c] : 0.f;
      }
      __syncthreads();
      if (warp_active && i0 + n_rows > warp_i_first) {  // warp-uniform: some row of the block sees a key of the warp
        const int n16 = (n_rows + 15) / 16;
        warp_scores<T, D, BL::LDS>(ka, Qs, X, n16);
        warp_scores<T, D, BL::LDS>(va, Os, Y, n16);
        __syncwarp();
        const int c_first = g.causal ? static_cast<int>(imin(imax(j - off - i0, int64_t(0)), int64_t(kBlockM))) : 0;
        probs_dscores_col<T>(X + r * BL::LDS, Y + r * BL::LDS, Pt + r * BL::LDP, dSt + r * BL::LDP, lse_s, D_s, key_ok,
                             c_first, n_rows, g.scale, half);
        __syncwarp();                              // P^T, dS^T written, X / Y read by all lanes
        warp_accumulate<T, D>(Pt, Os, dva, n16);   // dv_j += sum_i P_ij dout_i
        warp_accumulate<T, D>(dSt, Qs, dka, n16);  // dk_j += sum_i dS_ij q_i
        __syncwarp();
      }
    }
  }

  __syncthreads();  // every warp is done with the row tiles: they now hold the fp32 result rows
  float* Xo = reinterpret_cast<float*>(smem + BL::kTileA) + warp * 16 * BL::LDX;
  if (warp_key0 < g.Tk) {  // warp-uniform; keys left of kv_start get their (zero) gradient written too
    const bool key_valid = j < g.Tk;
    warp_write_rows<T, D>(dka, Xo, key_valid ? dk + kv_off + j * kv_stride : nullptr, g.scale, r, half);
    warp_write_rows<T, D>(dva, Xo, key_valid ? dv + kv_off + j * kv_stride : nullptr, 1.f, r, half);
  }
#endif  // LL_MMA_CODE
}

// ---------------------------------------------------------------------------------------------- host side
size_t smem_bytes_for(int64_t d, bool backward) {
  switch (d) {
    case 64:
      return backward ? BwdLayout<64>::kSmemBytes : Layout<64>::kSmemBytes;
    case 80:
      return backward ? BwdLayout<80>::kSmemBytes : Layout<80>::kSmemBytes;
    case 96:
      return backward ? BwdLayout<96>::kSmemBytes : Layout<96>::kSmemBytes;
    case 128:
      return backward ? BwdLayout<128>::kSmemBytes : Layout<128>::kSmemBytes;
    default:
      return 0;
  }
}

// Calls f.template operator()<T, D>() with T the CUDA 16-bit type of q's dtype and D the head dim.
template <typename F>
void dispatch_mma(at::ScalarType dtype, int64_t d, F&& f) {
  auto by_dim = [&]<typename T>() {
    switch (d) {
      case 64:
        return f.template operator()<T, 64>();
      case 80:
        return f.template operator()<T, 80>();
      case 96:
        return f.template operator()<T, 96>();
      case 128:
        return f.template operator()<T, 128>();
      default:
        TORCH_CHECK(false, "lladapter::gated_prompt_attention: no tensor-core kernel for head dim ", d);
    }
  };
  switch (dtype) {
    case at::kBFloat16:
      return by_dim.template operator()<__nv_bfloat16>();
    case at::kHalf:
      return by_dim.template operator()<__half>();
    default:
      TORCH_CHECK(false, "lladapter::gated_prompt_attention: no tensor-core kernel for dtype ", dtype);
  }
}

}  // namespace

bool mma_supports(const GatedPromptAttentionProblem& g, const AttnTensors& t,
                  std::initializer_list<const at::Tensor*> io, const ll::DeviceProps& props, bool backward) {
  const auto dtype = t.q.scalar_type();
  if (dtype != at::kBFloat16 && dtype != at::kHalf) return false;  // fp32 keeps the SIMT kernels
  const size_t smem = smem_bytes_for(g.d, backward);
  if (smem == 0) return false;
  // per-query starts ([B, Tq]) stay on the SIMT kernels
  if (t.kv_start.defined() && t.kv_start.dim() != 1) return false;
  const bool grid_ok = g.B <= 65535 && g.H <= 65535 && (g.Tq + kBlockM - 1) / kBlockM <= 0x7fffffff &&
                       (g.Tk + kBlockN - 1) / kBlockN <= 0x7fffffff;  // grid limits (Hkv <= H)
  if (!grid_ok) return false;
  for (const at::Tensor* x : {&t.q, &t.k, &t.v, &t.pk, &t.pv}) {
    if (x->defined() && (!x->is_contiguous() || !aligned16(*x))) return false;
  }
  for (const at::Tensor* x : io) {
    if (x->defined() && (!x->is_contiguous() || !aligned16(*x))) return false;
  }
  if (g.has_prompt && !t.phi.defined()) return false;  // the op's checks require a gate with a prompt
  return props.major >= 8 && smem <= props.smem_optin_bytes;
}

void launch_mma_forward(const GatedPromptAttentionProblem& g, const AttnTensors& t, at::Tensor& out, at::Tensor& lse,
                        at::Tensor& plse) {
  const ll::Stream stream = ll::current_stream();
  dispatch_mma(t.q.scalar_type(), g.d, [&]<typename T, int D>() {
    constexpr size_t smem = Layout<D>::kSmemBytes;
    // above 48 KiB dynamic shared memory needs the opt-in (d = 128: 76 KiB)
    ll::allow_dynamic_smem(gpa_fwd_mma_kernel<T, D>, smem);
    const dim3 grid(static_cast<unsigned>((g.Tq + kBlockM - 1) / kBlockM), static_cast<unsigned>(g.H),
                    static_cast<unsigned>(g.B));
    LL_LAUNCH(grid, kThreads, smem, stream, gpa_fwd_mma_kernel<T, D>)(
        g, ptr_or_null<T>(t.q), ptr_or_null<T>(t.k), ptr_or_null<T>(t.v), ptr_or_null<T>(t.pk), ptr_or_null<T>(t.pv),
        ptr_or_null<int64_t>(t.kv_start), ptr_or_null<float>(t.phi), reinterpret_cast<T*>(out.mutable_data_ptr()),
        lse.mutable_data_ptr<float>(), plse.mutable_data_ptr<float>());
    LL_LAUNCH_CHECK();
  });
}

void launch_mma_backward(const GatedPromptAttentionProblem& g, const AttnTensors& t, AttnBackwardTensors& b) {
  const ll::Stream stream = ll::current_stream();
  dispatch_mma(t.q.scalar_type(), g.d, [&]<typename T, int D>() {
    constexpr size_t smem = BwdLayout<D>::kSmemBytes;
    const int64_t* ks = ptr_or_null<int64_t>(t.kv_start);
    // above 48 KiB dynamic shared memory needs the opt-in (70.5 KiB at d = 64 to 86.5 KiB at d = 128)
    ll::allow_dynamic_smem(gpa_bwd_dq_mma_kernel<T, D>, smem);
    const dim3 q_grid(static_cast<unsigned>((g.Tq + kBlockM - 1) / kBlockM), static_cast<unsigned>(g.H),
                      static_cast<unsigned>(g.B));
    LL_LAUNCH(q_grid, kThreads, smem, stream, gpa_bwd_dq_mma_kernel<T, D>)(
        g, ptr_or_null<T>(t.q), ptr_or_null<T>(t.k), ptr_or_null<T>(t.v), ptr_or_null<T>(t.pk), ptr_or_null<T>(t.pv),
        ks, ptr_or_null<float>(t.phi), ptr_or_null<T>(b.dout), b.lse.const_data_ptr<float>(),
        b.plse.const_data_ptr<float>(), b.Dw.const_data_ptr<float>(), b.Dp.const_data_ptr<float>(),
        reinterpret_cast<T*>(b.dq.mutable_data_ptr()));
    LL_LAUNCH_CHECK();
    if (g.Tk == 0) return;  // no word keys: dk, dv are empty
    ll::allow_dynamic_smem(gpa_bwd_dkv_mma_kernel<T, D>, smem);
    const dim3 kv_grid(static_cast<unsigned>((g.Tk + kBlockN - 1) / kBlockN), static_cast<unsigned>(g.Hkv),
                       static_cast<unsigned>(g.B));
    LL_LAUNCH(kv_grid, kThreads, smem, stream, gpa_bwd_dkv_mma_kernel<T, D>)(
        g, ptr_or_null<T>(t.q), ptr_or_null<T>(t.k), ptr_or_null<T>(t.v), ks, ptr_or_null<T>(b.dout),
        b.lse.const_data_ptr<float>(), b.Dw.const_data_ptr<float>(), reinterpret_cast<T*>(b.dk.mutable_data_ptr()),
        reinterpret_cast<T*>(b.dv.mutable_data_ptr()));
    LL_LAUNCH_CHECK();
  });
}

}  // namespace lladapter::cuda_impl
