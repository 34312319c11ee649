// Gated prompt attention, CUDA split-K ("flash-decoding") forward for few query rows and many word keys: the
// per-row SIMT kernel streams all Tk keys with one warp and the tensor-core kernel has one CTA per (b, h) for
// Tq = 1, both far too few to keep a GPU's memory system busy. Chosen by the dispatcher in gated_prompt_attention.cu
// (Tq <= kDecodeMaxTq and Tk >= 2 * kDecodeMinChunk, or LLADAPTER_CUDA_DECODE=splitk); same contract as the other
// kernels. The word keys of each batch row are split into nsplit chunks:
//  partial  one block per (b, kv head, group of kDecRows rows, chunk). The rows of a (b, kv head) are the
//           rep * Tq pairs (query head of the group, query), row x = hl * Tq + i, so one block serves every
//           query head of a GQA group and each K/V tile is read from memory once for all of them. K/V tiles of
//           kDecKeys keys go to shared memory as fp32 (16-byte vector loads when aligned); warp w owns the block's
//           rows w + kDecWarps * u: lane j scores key j0 + j for all of its rows, one online-softmax update per
//           row and tile, then P V with lanes owning output columns. Writes the chunk's m, l and unnormalised
//           accumulator (fp32) per (b, h, i, chunk) to a workspace; an empty chunk writes m = -inf, l = 0, acc 0.
//  combine  one warp per (b, h, i): merges the chunks in chunk order (deterministic) into the normalised word
//           output and its lse, runs the prompt branch (K small) like the SIMT forward and writes out once.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "gated_prompt_attention_cuda.h"
#include "gated_prompt_attention_simt.cuh"

namespace lladapter::cuda_impl {
namespace {

constexpr int kDecWarps = 4;
constexpr int kDecThreads = 32 * kDecWarps;
constexpr int kDecRowsPerWarp = 4;
constexpr int kDecRows = kDecWarps * kDecRowsPerWarp;  // rows per partial block
constexpr int kDecKeys = kDecodeTileKeys;              // keys per shared-memory tile: one per lane when scoring
static_assert(kDecKeys == 32, "scoring gives each lane one key of the tile");
constexpr int64_t kDecodeBlocksPerSm = 4;  // partial blocks aimed for per SM (about 41 KiB shared memory each)

// Copies rows [0, n) of a K and a V tile (row r at src + r * stride, D contiguous elements) to shared memory as fp32
// with row stride D + 1 (odd: lane j reading row j at column c hits bank (j * (D + 1) + c) % 32, distinct over j);
// rows [n, kDecKeys) are zero-filled so no uninitialised shared memory is ever read. With vec16 all loads of a
// thread are issued before any conversion (every row start is 16-byte aligned: the base is, and D * sizeof(T) is a
// multiple of 16 for every supported D).
template <typename T, int D>
__device__ __forceinline__ void dec_load_kv_tile(float* __restrict__ ks, float* __restrict__ vs,
                                                 const T* __restrict__ ksrc, const T* __restrict__ vsrc, int64_t stride,
                                                 int n, bool vec16) {
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
    gpa_decode_partial_kernel(GatedPromptAttentionProblem g, DecodePlan dg, const T* __restrict__ q,
                              const T* __restrict__ k, const T* __restrict__ v, const int64_t* __restrict__ kv_start,
                              float* __restrict__ part_ml, float* __restrict__ part_acc) {
  constexpr int LD = D + 1;
  constexpr int NT = (D + 31) / 32;  // output columns lane + 32 t per lane
  constexpr int RPW = kDecRowsPerWarp;
  LL_SHARED(float, Ks, [kDecKeys * LD]);
  LL_SHARED(float, Vs, [kDecKeys * LD]);
  LL_SHARED(float, Qs, [kDecRows * D]);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int64_t blk = blockIdx.x;
  const int64_t split = blk % dg.nsplit;
  blk /= dg.nsplit;
  const int64_t rg = blk % dg.row_groups;
  blk /= dg.row_groups;
  const int64_t hkv = blk % g.Hkv, b = blk / g.Hkv;
  const int64_t row0 = rg * kDecRows;  // the block's first row x
  const float scale = static_cast<float>(g.scale);

  // the block's scaled query rows; rows past the last are zeros
  for (int e = threadIdx.x; e < kDecRows * D; e += kDecThreads) {
    const int64_t x = row0 + e / D;
    float val = 0.f;
    if (x < dg.rows) {
      const int64_t hl = x / g.Tq, i = x % g.Tq;
      val = static_cast<float>(q[((b * g.Tq + i) * g.H + hkv * g.rep + hl) * D + e % D]) * scale;
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

  const int64_t stride = g.Hkv * D;                         // elements between consecutive keys
  const int64_t kv_off = b * dg.kv_batch_stride + hkv * D;  // key j at k + kv_off + j * stride
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
      if (__any_sync(kFullMask, allowed)) {  // warp-uniform: a row with no allowed key in this tile keeps its state
        const float sm = allowed ? s[u] : -INFINITY;
        const float m_new = fmax_keep_nan(m[u], warp_max(sm));  // -inf only if all allowed keys score -inf (then NaN)
        const float alpha = expf(m[u] - m_new);                 // 0 on the row's first keys (m = -inf)
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
      for (int u = 0; u < RPW; ++u) pj[u] = __shfl_sync(kFullMask, p[u], jj);
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
__global__ void gpa_decode_combine_kernel(GatedPromptAttentionProblem g, DecodePlan dg, const T* __restrict__ q,
                                          const T* __restrict__ pk, const T* __restrict__ pv,
                                          const float* __restrict__ phi, const float* __restrict__ part_ml,
                                          const float* __restrict__ part_acc, T* __restrict__ out,
                                          float* __restrict__ lse, float* __restrict__ plse) {
  constexpr int NT = (D + 31) / 32;
  LL_SHARED(float, qs_all, [kWarps][D]);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t si = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (si >= g.B * g.H * g.Tq) return;  // whole warps leave; no block-wide synchronisation below
  const int64_t i = si % g.Tq, h = (si / g.Tq) % g.H, b = si / (g.Tq * g.H), hkv = h / g.rep;
  const int64_t nsplit = dg.nsplit;
  const float* ml = part_ml + si * nsplit * 2;
  const float* pacc = part_acc + si * nsplit * D;

  // word branch: M = max over chunks; then the chunks in order, 32 at a time (lane s holds chunk s0 + s)
  float M = -INFINITY;
  for (int64_t s = lane; s < nsplit; s += 32) M = fmax_keep_nan(M, ml[2 * s]);
  M = warp_max(M);
  float L = 0.f, acc[NT];
#pragma unroll
  for (int t = 0; t < NT; ++t) acc[t] = 0.f;
  {
    for (int64_t s0 = 0; s0 < nsplit; s0 += 32) {
      const int64_t s = s0 + lane;
      float f = 0.f, ls = 0.f;
      if (s < nsplit) {
        const float ms = ml[2 * s];
        if (ms != -INFINITY) {  // an empty chunk (m = -inf, l = 0) contributes nothing; its accumulator is not read
          f = expf(ms - M);
          ls = ml[2 * s + 1];
        } else if (ml[2 * s + 1] != 0.f) {  // m = -inf, l = NaN: allowed keys that all scored -inf, NaN as softmax
          f = ls = ml[2 * s + 1];
        }
      }
      const int cnt = static_cast<int>(min_i64(32, nsplit - s0));
      for (int jj = 0; jj < cnt; ++jj) {
        const float fj = __shfl_sync(kFullMask, f, jj);
        const float lj = __shfl_sync(kFullMask, ls, jj);
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
  const float inv = L != 0.f ? 1.f / L : 0.f;  // (a NaN L, from a non-finite score, stays NaN)
#pragma unroll
  for (int t = 0; t < NT; ++t) acc[t] *= inv;
  if (lane == 0) lse[si] = L != 0.f ? M + logf(L) : -INFINITY;

  // prompt branch, as in gpa_fwd_kernel
  if (g.has_prompt) {
    float* qs = qs_all[warp];
    const T* qr = q + ((b * g.Tq + i) * g.H + h) * D;
    for (int c = lane; c < D; c += 32) qs[c] = static_cast<float>(qr[c]) * static_cast<float>(g.scale);
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

// Number of key chunks: enough (b, kv head, row group, chunk) blocks to give every SM kDecodeBlocksPerSm of them,
// but no chunk shorter than min_chunk keys (the CPU kernel's rule with SMs for threads and 128-key chunks for
// its 64-key blocks). When the rows alone fill the GPU this is 1: a per-query pass that still reads each K/V
// row once per GQA group.
int64_t decode_splits(int64_t groups, int64_t Tk, int64_t min_chunk, int64_t sms) {
  const int64_t target = kDecodeBlocksPerSm * sms;
  const int64_t max_split = std::max<int64_t>(1, (Tk + min_chunk - 1) / min_chunk);
  return std::clamp<int64_t>((target + groups - 1) / groups, 1, max_split);
}

// Calls f.template operator()<T, D>() for q's dtype and the exact head dim (the op's checks admit only these).
template <typename F>
void dispatch_decode(at::ScalarType t, int64_t d, F&& f) {
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
        TORCH_CHECK(false, "lladapter::gated_prompt_attention: no decode kernel for head dim ", d);
    }
  };
  switch (t) {
    case at::kFloat:
      return by_dim.template operator()<float>();
    case at::kBFloat16:
      return by_dim.template operator()<at::BFloat16>();
    case at::kHalf:
      return by_dim.template operator()<at::Half>();
    default:
      TORCH_CHECK(false, "lladapter::gated_prompt_attention: unsupported dtype ", t);
  }
}

}  // namespace

std::optional<DecodePlan> plan_decode(const GatedPromptAttentionProblem& g, const AttnTensors& t, int64_t min_chunk,
                                      int64_t sm_count) {
  DecodePlan plan{};
  plan.rows = g.rep * g.Tq;
  plan.row_groups = (plan.rows + kDecRows - 1) / kDecRows;
  const int64_t groups = g.B * g.Hkv * plan.row_groups;
  plan.nsplit = decode_splits(groups, g.Tk, min_chunk, sm_count);
  if (groups * plan.nsplit > std::numeric_limits<int32_t>::max()) return std::nullopt;  // 1-D grid limit
  plan.kv_batch_stride = g.B > 1 ? t.k.stride(0) : g.Tk * g.Hkv * g.d;
  plan.vec16 =
      aligned16(t.k) && aligned16(t.v) && (plan.kv_batch_stride * static_cast<int64_t>(t.k.element_size())) % 16 == 0;
  return plan;
}

void launch_decode_forward(const GatedPromptAttentionProblem& g, const DecodePlan& plan, const AttnTensors& t,
                           at::Tensor& out, at::Tensor& lse, at::Tensor& plse) {
  const int64_t groups = g.B * g.Hkv * plan.row_groups;
  const int64_t stat_rows = g.B * g.H * g.Tq;
  at::Tensor part_ml = t.q.new_empty({stat_rows, plan.nsplit, 2}, at::kFloat);
  at::Tensor part_acc = t.q.new_empty({stat_rows, plan.nsplit, g.d}, at::kFloat);
  const ll::Stream stream = ll::current_stream();
  dispatch_decode(t.q.scalar_type(), g.d, [&]<typename T, int D>() {
    LL_LAUNCH(static_cast<unsigned>(groups * plan.nsplit), kDecThreads, 0, stream, gpa_decode_partial_kernel<T, D>)(
        g, plan, t.q.const_data_ptr<T>(), t.k.const_data_ptr<T>(), t.v.const_data_ptr<T>(),
        ptr_or_null<int64_t>(t.kv_start), part_ml.mutable_data_ptr<float>(), part_acc.mutable_data_ptr<float>());
    LL_LAUNCH_CHECK();
    LL_LAUNCH(blocks_for(stat_rows), kWarps * 32, 0, stream, gpa_decode_combine_kernel<T, D>)(
        g, plan, t.q.const_data_ptr<T>(), ptr_or_null<T>(t.pk), ptr_or_null<T>(t.pv), ptr_or_null<float>(t.phi),
        part_ml.const_data_ptr<float>(), part_acc.const_data_ptr<float>(), out.mutable_data_ptr<T>(),
        lse.mutable_data_ptr<float>(), plse.mutable_data_ptr<float>());
    LL_LAUNCH_CHECK();
  });
}

}  // namespace lladapter::cuda_impl
