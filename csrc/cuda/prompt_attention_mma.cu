// Gated prompt attention, tensor-core forward (nvcuda::wmma, bf16/fp16 operands, fp32 accumulation), sm_80+.
// NOTE: written without a GPU; it compiles here (sm_80, sm_90) but has never run (see docs/attention.md).
// Same contract and masking rules as the SIMT kernel (prompt_attention.cu) and the CPU kernel:
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
#include "prompt_attention_mma.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <string>

namespace lladapter::cuda_impl {
namespace {

constexpr int kMmaWarps = 4;
constexpr int kBlockM = 16 * kMmaWarps;  // query rows per CTA (16 per warp: one wmma row tile)
constexpr int kBlockN = 64;              // keys per block; the Q staging tile reuses the K tile, so kBlockM == kBlockN
constexpr int kThreads = 32 * kMmaWarps;
constexpr unsigned kFullMask = 0xffffffffu;
static_assert(kBlockM == kBlockN, "the Q tile is staged in the K tile's shared memory");

struct MmaGeo {
  int64_t B, Tq, Tk, H, Hkv, K, Bp, rep;
  bool causal;
  float scale;
};

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
__device__ __forceinline__ int64_t word_hi(const MmaGeo& g, int64_t i) {
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

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
namespace wmma = nvcuda::wmma;

template <typename T>
using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
using FragAcc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// X[16, 16 * n16] = Q_w (16 x D, A fragments) . K_tile[0 : 16 * n16, :]^T, fp32. K is stored row-major
// (key n, dim k at Ks[n * LDT + k]), i.e. the B operand (k x n) in column-major with ldm = LDT.
template <typename T, int D>
__device__ __forceinline__ void warp_scores(const FragA<T> (&qa)[D / 16], const T* Ks, float* X, int n16) {
  constexpr int LDT = Layout<D>::LDT, LDX = Layout<D>::LDX;
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
    if (c >= c_lo && c < c_hi) bmax = fmaxf(bmax, xrow[c] * scale);
  }
  bmax = fmaxf(bmax, __shfl_xor_sync(kFullMask, bmax, 1));
  const float m_new = fmaxf(m, bmax);
  // m_new = -inf: no allowed key so far; keep everything at 0 (exp(-inf - -inf) would be NaN)
  const bool any = m_new != -INFINITY;
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
#endif  // !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800

// grid (ceil(Tq / kBlockM), H, B), kThreads threads, Layout<D>::kSmemBytes dynamic shared memory.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    gpa_fwd_mma_kernel(MmaGeo g, const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                       const T* __restrict__ pk, const T* __restrict__ pv, const int64_t* __restrict__ kv_start,
                       const float* __restrict__ phi, T* __restrict__ out, float* __restrict__ lse,
                       float* __restrict__ plse) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using L = Layout<D>;
  extern __shared__ __align__(128) unsigned char smem[];
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
  const T* q_base = q + (b * g.Tq * g.H + h) * D;                   // row i at q_base + i * q_stride
  const int64_t kv_off = (b * g.Tk * g.Hkv + hkv) * D;              // key j at k + kv_off + j * kv_stride

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
    if (warp_active && j0 < warp_hi) {  // warp-uniform
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
  const float inv_l = l > 0.f ? 1.f / l : 0.f;  // no allowed word key: the word branch gives 0
#pragma unroll
  for (int t = 0; t < D / 2; ++t) o[t] *= inv_l;
  const int64_t si = (b * g.H + h) * g.Tq + i;
  if (row_valid && half == 0) lse[si] = l > 0.f ? m + logf(l) : -INFINITY;

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
            const float w = pl > 0.f ? phi[h] / pl : 0.f;  // phi(g_h) / l_p: gate applied before the single write
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
#endif  // __CUDA_ARCH__ >= 800
}

// ---------------------------------------------------------------------------------------------- host side
bool aligned16(const at::Tensor& t) {
  return !t.defined() || t.numel() == 0 || reinterpret_cast<std::uintptr_t>(t.const_data_ptr()) % 16 == 0;
}

template <typename T>
const T* native_ptr_or_null(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<const T*>(t.const_data_ptr()) : nullptr;
}

template <typename T, int D>
void launch_mma_forward(const MmaGeo& g, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& pk, const at::Tensor& pv, const at::Tensor& kv_start, const at::Tensor& phi,
                        at::Tensor& out, at::Tensor& lse, at::Tensor& plse) {
  constexpr size_t smem = Layout<D>::kSmemBytes;
  auto kernel = gpa_fwd_mma_kernel<T, D>;
  // above 48 KiB dynamic shared memory needs the opt-in (d = 128: 76 KiB)
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  const dim3 grid(static_cast<unsigned>((g.Tq + kBlockM - 1) / kBlockM), static_cast<unsigned>(g.H),
                  static_cast<unsigned>(g.B));
  kernel<<<grid, kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
      g, native_ptr_or_null<T>(q), native_ptr_or_null<T>(k), native_ptr_or_null<T>(v), native_ptr_or_null<T>(pk),
      native_ptr_or_null<T>(pv), kv_start.defined() ? kv_start.const_data_ptr<int64_t>() : nullptr,
      phi.defined() ? phi.const_data_ptr<float>() : nullptr, reinterpret_cast<T*>(out.mutable_data_ptr()),
      lse.mutable_data_ptr<float>(), plse.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_for_head_dim(int64_t d, const MmaGeo& g, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& pk, const at::Tensor& pv, const at::Tensor& kv_start,
                         const at::Tensor& phi, at::Tensor& out, at::Tensor& lse, at::Tensor& plse) {
  switch (d) {
    case 64: return launch_mma_forward<T, 64>(g, q, k, v, pk, pv, kv_start, phi, out, lse, plse);
    case 80: return launch_mma_forward<T, 80>(g, q, k, v, pk, pv, kv_start, phi, out, lse, plse);
    case 96: return launch_mma_forward<T, 96>(g, q, k, v, pk, pv, kv_start, phi, out, lse, plse);
    case 128: return launch_mma_forward<T, 128>(g, q, k, v, pk, pv, kv_start, phi, out, lse, plse);
    default: TORCH_CHECK(false, "lladapter::gated_prompt_attention: no tensor-core kernel for head dim ", d);
  }
}

size_t smem_bytes_for(int64_t d) {
  switch (d) {
    case 64: return Layout<64>::kSmemBytes;
    case 80: return Layout<80>::kSmemBytes;
    case 96: return Layout<96>::kSmemBytes;
    case 128: return Layout<128>::kSmemBytes;
    default: return 0;
  }
}

// LLADAPTER_CUDA_ATTN: unset / "" / "mma" -> the tensor-core kernel where supported, "simt" -> the SIMT kernel.
bool mma_allowed_by_env() {
  const char* env = std::getenv("LLADAPTER_CUDA_ATTN");
  if (env == nullptr || env[0] == '\0') return true;
  const std::string mode(env);
  TORCH_CHECK(mode == "mma" || mode == "simt", "lladapter::gated_prompt_attention: the environment variable ",
              "LLADAPTER_CUDA_ATTN must be 'mma' or 'simt' (or unset), got '", mode, "'");
  return mode == "mma";
}

}  // namespace

bool try_prompt_attn_mma_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pk,
                                 const at::Tensor& pv, const at::Tensor& kv_start, const at::Tensor& phi, bool causal,
                                 double scale, at::Tensor& out, at::Tensor& lse, at::Tensor& prompt_lse) {
  if (!mma_allowed_by_env()) return false;
  const auto dtype = q.scalar_type();
  if (dtype != at::kBFloat16 && dtype != at::kHalf) return false;  // fp32 keeps the SIMT kernel
  const int64_t B = q.size(0), Tq = q.size(1), H = q.size(2), d = q.size(3);
  if (smem_bytes_for(d) == 0) return false;
  // per-row starts ([B, Tq]) and anything but int64 [B] stay on the SIMT kernels
  if (kv_start.defined() && (kv_start.dim() != 1 || kv_start.scalar_type() != at::kLong)) return false;
  if (B > 65535 || H > 65535 || (Tq + kBlockM - 1) / kBlockM > 0x7fffffff) return false;  // grid limits
  const bool has_prompt = pk.defined() && pk.size(1) > 0;
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&q, &k, &v, &pk, &pv, &out}) {
    if (t->defined() && (!t->is_contiguous() || !aligned16(*t))) return false;
  }
  if (has_prompt && !phi.defined()) return false;  // the caller's checks require a gate with a prompt
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaDeviceProp* props = at::cuda::getDeviceProperties(q.get_device());
  if (props->major < 8) return false;
  if (smem_bytes_for(d) > props->sharedMemPerBlockOptin) return false;
  if (out.numel() == 0) return true;  // nothing to compute (the caller returns earlier anyway)

  const int64_t Hkv = k.size(2);
  const MmaGeo g{B,
                 Tq,
                 k.size(1),
                 H,
                 Hkv,
                 has_prompt ? pk.size(1) : 0,
                 has_prompt ? pk.size(0) : 1,
                 H / Hkv,
                 causal,
                 static_cast<float>(scale)};
  const at::Tensor no_tensor;
  const at::Tensor& pk_used = has_prompt ? pk : no_tensor;
  const at::Tensor& pv_used = has_prompt ? pv : no_tensor;
  if (dtype == at::kBFloat16) {
    launch_for_head_dim<__nv_bfloat16>(d, g, q, k, v, pk_used, pv_used, kv_start, phi, out, lse, prompt_lse);
  } else {
    launch_for_head_dim<__half>(d, g, q, k, v, pk_used, pv_used, kv_start, phi, out, lse, prompt_lse);
  }
  return true;
}

}  // namespace lladapter::cuda_impl
