// Gated prompt attention, CPU kernels (forward and backward), flash-style.
//
// Never materialises Tq x Tk: queries are processed in blocks of kQB rows against key blocks of kKB keys with
// an online softmax (running max m, sum l, unnormalised accumulator). The prompt branch is a second, separate
// online softmax over the K prompt keys in the same pass, combined with the gate before the single write of out.
// All math is in acc_t = fp32 (fp64 for fp64 inputs, the gradcheck path); blocks are converted into fp32/fp64
// scratch once and the inner products run on at::vec lanes (keys along the lanes: no horizontal sums).
//
// fp32 block products go through the BLAS sgemm that torch's CPU library exports (sequential per worker);
// without it, and for fp64, through the at::vec micro-kernels. Few query rows (decode) skip the block
// conversion and read key/value rows directly (load_as_float), with the heads of a kv group sharing one pass.
//
// Parallelism and determinism:
//  forward   items (b, h, query block); decode with GQA: items (b, kv head); for decode-like shapes with too few
//            items, keys are also split (split-K) and the partial softmax states are merged in split order.
//  backward  pass 0 per (b, h, query block): the prompt branch's probabilities P' and dP' = dout.pv, D_prompt =
//            rowsum(P' dP') (= dout.out_prompt), D_word = dout.out - phi D_prompt; phi P' and dS' kept per row
//            (K values each) for the prompt's dq and dpk/dpv below, which then need one product each
//            then either (single pass, when the (b, kv head) items occupy the threads) one item per (b, kv head)
//            computing dk, dv and its heads' dq in key-block order, or two passes:
//              dk, dv per (b, kv head, key block) looping over the query heads of the group (no races), and
//              dq per (b, h, query block) recomputing the scores (same key blocks: bit-identical to single pass)
//            last: dpk, dpv per (prompt batch, kv head, prompt block), looping over the batch when Bp = 1;
//            dgate_h = phi'(g_h) * sum_{b,i} D_prompt, summed in a fixed order.
//  Every backward sum has a fixed order independent of the thread count (the forward's split-K merge depends on
//  the number of splits, i.e. on the thread count, within fp32 rounding).
//  at::parallel_for only runs in parallel when this file is compiled with -fopenmp (see
//  docs/gated_prompt_attention.md).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

#include "../gated_prompt_attention.h"
#include "vec_utils.h"

// The Fortran BLAS sgemm that torch's CPU library exports (MKL on x86 wheels, OpenBLAS elsewhere). Declared weak:
// when a torch build does not export it, the fp32 block products fall back to the at::vec micro-kernels below.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));
// MKL's per-thread thread count: the block products run inside at::parallel_for, so each must be sequential
// (a nested MKL team per worker oversubscribes the cores badly).
extern "C" int MKL_Set_Num_Threads_Local(int n) __attribute__((weak));  // the C API (mkl_service.h)

namespace lladapter::cpu {
namespace {

// Makes BLAS calls of the current thread sequential for the guard's lifetime (no-op without MKL).
struct SequentialBlasGuard {
  int prev = 0;
  bool active = false;
  SequentialBlasGuard() {
    if (MKL_Set_Num_Threads_Local != nullptr) {
      prev = MKL_Set_Num_Threads_Local(1);
      active = true;
    }
  }
  ~SequentialBlasGuard() {
    if (active) MKL_Set_Num_Threads_Local(prev);
  }
};

// The benchmark's matmul floor (benchmarks/bench_e2e.py) times these kernels' BLAS products alone: while recording
// is on, every sgemm_rowmajor call appends its row of kProductFields (one relaxed load per call when it is off).
constexpr int kProductFields = 9;  // m, n, k, lda, ldb, ldc, a_trans, b_trans, accumulate (beta != 0)
std::atomic<bool> g_recording{false};
std::mutex g_recorded_mutex;
std::vector<std::array<int64_t, kProductFields>> g_recorded;

// Row-major C[m, n] = alpha * op(A) . op(B) + beta * C (op: transpose when the flag is set; lda / ldb are the
// row strides of A and B as stored, e.g. A stored [k, m] when a_trans). Returns false when no BLAS is available.
inline bool sgemm_rowmajor(int64_t m, int64_t n, int64_t k, float alpha, const float* A, int64_t lda, bool a_trans,
                           const float* B, int64_t ldb, bool b_trans, float beta, float* C, int64_t ldc) {
  if (sgemm_ == nullptr) return false;
  if (g_recording.load(std::memory_order_relaxed)) {
    std::lock_guard<std::mutex> lock(g_recorded_mutex);
    g_recorded.push_back({m, n, k, lda, ldb, ldc, a_trans, b_trans, beta != 0.f});
  }
  // column-major view: C^T [n, m] = op(B)^T [n, k] . op(A)^T [k, m]
  const char tb = b_trans ? 'T' : 'N', ta = a_trans ? 'T' : 'N';
  const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
  const int LB = static_cast<int>(ldb), LA = static_cast<int>(lda), LC = static_cast<int>(ldc);
  sgemm_(&tb, &ta, &M, &N, &K, &alpha, B, &LB, A, &LA, &beta, C, &LC);
  return true;
}

// fp32 inputs (with a BLAS, and d a multiple of the vector width so that no padding columns exist): the block
// products read the source rows of q, k, v, dout in place, strided, instead of converting each block into a
// scratch copy first; with d = 64 those copies cost as much as the products.
template <typename scalar_t, typename acc_t>
inline bool blas_reads_rows_in_place(int64_t d, int64_t dp) {
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    return sgemm_ != nullptr && d == dp;
  } else {
    return false;
  }
}

// fp32 accumulation with a BLAS: the block products of converted (bf16/fp16) blocks can go through sgemm too.
template <typename acc_t>
inline bool blas_fp32() {
  if constexpr (std::is_same_v<acc_t, float>) {
    return sgemm_ != nullptr;
  } else {
    return false;
  }
}

// sgemm_rowmajor for operands that may be source rows (scalar_t) or fp32 scratch. Only called where
// blas_reads_rows_in_place or blas_fp32 holds (everything fp32); the other instantiations never run.
template <typename TA, typename TB, typename TC>
inline void gemm_in_place(int64_t m, int64_t n, int64_t k, TC alpha, const TA* A, int64_t lda, bool a_trans,
                          const TB* B, int64_t ldb, bool b_trans, TC beta, TC* C, int64_t ldc) {
  if constexpr (std::is_same_v<TA, float> && std::is_same_v<TB, float> && std::is_same_v<TC, float>) {
    sgemm_rowmajor(m, n, k, alpha, A, lda, a_trans, B, ldb, b_trans, beta, C, ldc);
  } else {
    TORCH_INTERNAL_ASSERT(false, "gemm_in_place is fp32 only");
  }
}

constexpr int64_t kQB = 128;  // query rows per block
constexpr int64_t kKB = 128;  // keys per block (a multiple of every at::vec width)

template <typename acc_t>
using AVec = at::vec::Vectorized<acc_t>;

template <typename acc_t>
constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

// The running max of the online softmax, NaN-propagating: std::max(m, NaN) returns m, which would drop a NaN score
// and let its row come out finite (a NaN in q or k must reach every row that sees it, as in reference.py).
template <typename acc_t>
inline acc_t max_keep_nan(acc_t a, acc_t b) {
  return (a < b || b != b) ? b : a;
}

// The online softmax's new running max from the old one and a block's: NaN when it is +inf, because a +inf score
// makes the whole row NaN (exp(inf - inf)). Saying so here keeps NaN out of exp_u20, which clamps a NaN argument
// to a large finite result: the NaN max then reaches l and acc through alpha = exp(m - NaN) (std::exp).
template <typename acc_t>
inline acc_t softmax_running_max(acc_t m, acc_t block_max) {
  const acc_t x = max_keep_nan(m, block_max);
  return x == std::numeric_limits<acc_t>::infinity() ? std::numeric_limits<acc_t>::quiet_NaN() : x;
}

// The largest of s[0:n] (n a positive multiple of the vector width), NaN when any is NaN. Two vector maxima in
// flight (one chain of dependent maxima cost ~5 cycles a vector), and the lanes reduced without branches: the
// scalar max_keep_nan over 8 lanes of random scores mispredicted often. Max is exact, so the order does not matter.
template <typename acc_t>
inline acc_t row_max_keep_nan(const acc_t* s, int64_t n) {
  using V = AVec<acc_t>;
  constexpr int64_t W = V::size();
  V m0 = V::loadu(s), m1 = m0;
  int64_t c = W;
  for (; c + 2 * W <= n; c += 2 * W) {
    m0 = at::vec::maximum(m0, V::loadu(s + c));  // (vec::maximum keeps NaN)
    m1 = at::vec::maximum(m1, V::loadu(s + c + W));
  }
  if (c < n) m0 = at::vec::maximum(m0, V::loadu(s + c));
  alignas(64) acc_t lanes[W];
  at::vec::maximum(m0, m1).store(lanes);
  acc_t mb = lanes[0];
  bool nan = mb != mb;
  for (int64_t t = 1; t < W; ++t) {
    mb = mb < lanes[t] ? lanes[t] : mb;
    nan |= lanes[t] != lanes[t];
  }
  return nan ? std::numeric_limits<acc_t>::quiet_NaN() : mb;
}

// Allowed keys of query i: [lo_at(i), causal ? min(kend, i + off + 1) : kend). The lower bound is one value for
// every query (left padding: kv_start [B]) or, with lo_rows, one per query (kv_start [B, Tq]: packed sequences);
// bounds are already clamped to [0, kend].
struct KeyMask {
  int64_t lo, kend, off;
  bool causal;
  const int64_t* lo_rows = nullptr;  // [Tq] lower bound of each query of this batch row, or nullptr: lo for all
  int64_t lo_at(int64_t i) const { return lo_rows ? lo_rows[i] : lo; }
  // The smallest lower bound of queries [i0, i0 + n): keys below it are masked for all of them.
  int64_t lo_min(int64_t i0, int64_t n) const {
    if (!lo_rows) return lo;
    int64_t m = kend;
    for (int64_t i = i0; i < i0 + n; ++i) m = std::min(m, lo_rows[i]);
    return m;
  }
  int64_t hi(int64_t i) const { return causal ? std::min(kend, i + off + 1) : kend; }
};

// Causal masking inside a (query block, key block) pair: rows near the diagonal see only the first keys of the
// block. Those rows go in chunks of kDiagRows, each against the keys its last row may see, instead of all rows
// against the whole block (at T = 128 the diagonal block is the whole problem; 32-row chunks make 10/16 of its
// products). The chunks depend only on (mask, i0, nrows, j0, nk), so both backward modes make the same products.
// The forward chunks its blocks the same way.
constexpr int64_t kDiagRows = 32;

// f(r0, rn, nc) for the row chunks [r0, r0 + rn) of query rows [i0, i0 + nrows) against keys [j0, j0 + nk): the
// chunk's rows see no key at or past j0 + nc. A chunk that sees no key of the block is skipped (all its weights
// are 0; masked products are not promised to carry non-finite values, docs/reliability.md).
template <typename F>
inline void for_row_chunks(const KeyMask& mk, int64_t i0, int64_t nrows, int64_t j0, int64_t nk, F&& f) {
  for (int64_t r0 = 0; r0 < nrows;) {
    int64_t rn = nrows - r0, nc = nk;
    if (mk.causal && mk.hi(i0 + std::min(nrows, r0 + kDiagRows) - 1) - j0 < nk) {
      rn = std::min(kDiagRows, nrows - r0);
      nc = std::max<int64_t>(0, mk.hi(i0 + r0 + rn - 1) - j0);
    }
    if (nc > 0) f(r0, rn, nc);
    r0 += rn;
  }
}

// Rows of a [n, d] strided source into dst [rows_total, ld] in acc_t, times mul; zero padding beyond n and d.
template <typename scalar_t, typename acc_t>
void load_rows(acc_t* dst, int64_t ld, const scalar_t* src, int64_t stride, int64_t n, int64_t d, int64_t rows_total,
               acc_t mul) {
  for (int64_t r = 0; r < rows_total; ++r) {
    acc_t* o = dst + r * ld;
    if (r < n) {
      const scalar_t* s = src + r * stride;
      for (int64_t c = 0; c < d; ++c) o[c] = static_cast<acc_t>(s[c]) * mul;
      for (int64_t c = d; c < ld; ++c) o[c] = acc_t(0);
    } else {
      std::fill(o, o + ld, acc_t(0));
    }
  }
}

// dst [d, kKB] = transpose of n source rows (zero columns beyond n).
template <typename scalar_t, typename acc_t>
void load_transposed(acc_t* dst, const scalar_t* src, int64_t stride, int64_t n, int64_t d) {
  for (int64_t r = 0; r < n; ++r) {
    const scalar_t* s = src + r * stride;
    for (int64_t c = 0; c < d; ++c) dst[c * kKB + r] = static_cast<acc_t>(s[c]);
  }
  if (n < kKB) {
    for (int64_t c = 0; c < d; ++c) std::fill(dst + c * kKB + n, dst + (c + 1) * kKB, acc_t(0));
  }
}

// S[i, 0:kKB] = sum_c A[i, c] * Bt[c, 0:kKB] for i < nrows (A rows of stride lda, Bt [d, kKB]); through BLAS only
// the columns below ncols rounded up to the vector width (the ones the softmax reads).
// Register blocking: 2 rows x 4 vectors = 8 accumulators (+ 1 load + 2 broadcasts fit the 16 AVX2 registers);
// each loaded Bt vector feeds two FMAs.
template <typename acc_t>
void block_scores(acc_t* S, const acc_t* A, int64_t lda, int64_t nrows, const acc_t* Bt, int64_t d,
                  int64_t ncols = kKB) {
  using V = AVec<acc_t>;
  constexpr int64_t W = V::size();
  if constexpr (std::is_same_v<acc_t, float>) {
    const int64_t n = std::min(kKB, (ncols + W - 1) / W * W);
    if (sgemm_rowmajor(nrows, n, d, 1.f, A, lda, false, Bt, kKB, false, 0.f, S, kKB)) return;
  }
  constexpr int64_t NV = kKB / W;
  constexpr int64_t CV = 4;
  static_assert(NV % CV == 0, "kKB must be a multiple of 4 vectors");
  for (int64_t v0 = 0; v0 < NV; v0 += CV) {
    int64_t i = 0;
    for (; i + 2 <= nrows; i += 2) {
      V acc0[CV], acc1[CV];
      for (int64_t v = 0; v < CV; ++v) acc0[v] = acc1[v] = V(acc_t(0));
      const acc_t* a0 = A + i * lda;
      const acc_t* a1 = a0 + lda;
      for (int64_t c = 0; c < d; ++c) {
        const V x0(a0[c]), x1(a1[c]);
        const acc_t* bc = Bt + c * kKB + v0 * W;
        for (int64_t v = 0; v < CV; ++v) {
          const V bv = V::loadu(bc + v * W);
          acc0[v] = at::vec::fmadd(x0, bv, acc0[v]);
          acc1[v] = at::vec::fmadd(x1, bv, acc1[v]);
        }
      }
      for (int64_t v = 0; v < CV; ++v) {
        acc0[v].store(S + i * kKB + (v0 + v) * W);
        acc1[v].store(S + (i + 1) * kKB + (v0 + v) * W);
      }
    }
    for (; i < nrows; ++i) {
      V acc0[CV];
      for (int64_t v = 0; v < CV; ++v) acc0[v] = V(acc_t(0));
      const acc_t* a0 = A + i * lda;
      for (int64_t c = 0; c < d; ++c) {
        const V x0(a0[c]);
        const acc_t* bc = Bt + c * kKB + v0 * W;
        for (int64_t v = 0; v < CV; ++v) acc0[v] = at::vec::fmadd(x0, V::loadu(bc + v * W), acc0[v]);
      }
      for (int64_t v = 0; v < CV; ++v) acc0[v].store(S + i * kKB + (v0 + v) * W);
    }
  }
}

// C[r, 0:dp] += sum_{t < nt} A[r*sr + t*st] * X[t, 0:dp]  for r < nr  (dp a multiple of the vector width).
// Register blocking: 2 rows of C x 4 vectors; each loaded X vector feeds two FMAs.
template <typename acc_t>
void accum_rows(acc_t* C, int64_t ldc, const acc_t* A, int64_t sr, int64_t st, const acc_t* X, int64_t ldx, int64_t nr,
                int64_t nt, int64_t dp) {
  if constexpr (std::is_same_v<acc_t, float>) {
    // A viewed as a row-major [nr, nt] matrix: (sr, st) = (lda, 1), or its transpose stored [nt, nr]: (1, lda)
    if (nr > 0 && nt > 0 && (st == 1 || sr == 1)) {
      const bool a_trans = st != 1;
      // BLAS requires a leading dimension >= the stored row's length even where there is one row, whose stride means
      // nothing (A = P' [1, Tq] of a single prompt key, K = 1: with lda = 1 MKL refused the call and dpv came out 0)
      const int64_t lda = a_trans ? (nt == 1 ? std::max(st, nr) : st) : (nr == 1 ? std::max(sr, nt) : sr);
      if (sgemm_rowmajor(nr, dp, nt, 1.f, A, lda, a_trans, X, ldx, false, 1.f, C, ldc)) return;
    }
  }
  using V = AVec<acc_t>;
  constexpr int64_t W = V::size();
  constexpr int64_t CV = 4;
  int64_t r = 0;
  for (; r + 2 <= nr; r += 2) {
    acc_t* c0p = C + r * ldc;
    acc_t* c1p = c0p + ldc;
    const acc_t* a0 = A + r * sr;
    const acc_t* a1 = a0 + sr;
    int64_t c0 = 0;
    for (; c0 + CV * W <= dp; c0 += CV * W) {
      V acc0[CV], acc1[CV];
      for (int64_t v = 0; v < CV; ++v) {
        acc0[v] = V::loadu(c0p + c0 + v * W);
        acc1[v] = V::loadu(c1p + c0 + v * W);
      }
      for (int64_t t = 0; t < nt; ++t) {
        const acc_t w0 = a0[t * st], w1 = a1[t * st];
        if (w0 == acc_t(0) && w1 == acc_t(0)) continue;  // masked keys (exactly zero probability) cost nothing
        const V wv0(w0), wv1(w1);
        const acc_t* x = X + t * ldx + c0;
        for (int64_t v = 0; v < CV; ++v) {
          const V xv = V::loadu(x + v * W);
          acc0[v] = at::vec::fmadd(wv0, xv, acc0[v]);
          acc1[v] = at::vec::fmadd(wv1, xv, acc1[v]);
        }
      }
      for (int64_t v = 0; v < CV; ++v) {
        acc0[v].store(c0p + c0 + v * W);
        acc1[v].store(c1p + c0 + v * W);
      }
    }
    for (; c0 < dp; c0 += W) {
      V acc0 = V::loadu(c0p + c0), acc1 = V::loadu(c1p + c0);
      for (int64_t t = 0; t < nt; ++t) {
        const V xv = V::loadu(X + t * ldx + c0);
        acc0 = at::vec::fmadd(V(a0[t * st]), xv, acc0);
        acc1 = at::vec::fmadd(V(a1[t * st]), xv, acc1);
      }
      acc0.store(c0p + c0);
      acc1.store(c1p + c0);
    }
  }
  for (; r < nr; ++r) {
    acc_t* c = C + r * ldc;
    const acc_t* a = A + r * sr;
    for (int64_t c0 = 0; c0 < dp; c0 += W) {
      V acc = V::loadu(c + c0);
      for (int64_t t = 0; t < nt; ++t) {
        const acc_t w = a[t * st];
        if (w == acc_t(0)) continue;
        acc = at::vec::fmadd(V(w), V::loadu(X + t * ldx + c0), acc);
      }
      acc.store(c + c0);
    }
  }
}

template <typename acc_t>
acc_t dot_padded(const acc_t* a, const acc_t* b, int64_t dp) {
  using V = AVec<acc_t>;
  constexpr int64_t W = V::size();
  V acc(acc_t(0));
  for (int64_t c = 0; c < dp; c += W) acc = at::vec::fmadd(V::loadu(a + c), V::loadu(b + c), acc);
  alignas(64) acc_t lanes[W];
  acc.store(lanes);
  acc_t s = 0;
  for (int64_t i = 0; i < W; ++i) s += lanes[i];
  return s;
}

// The problem (gated_prompt_attention.h) plus what the CPU kernels add: padded head dim, the scale in the accumulation
// type, and the data.
template <typename scalar_t, typename acc_t>
struct Problem : GatedPromptAttentionProblem {
  int64_t dp;      // d padded to the vector width
  acc_t qk_scale;  // scale in acc_t
  const scalar_t *q, *k, *v, *pk, *pv;
  int64_t kv_bstride;       // elements between batch rows of k and v: Tk * Hkv * d, or more for a KV-cache view
  const int64_t* kv_start;  // [B] or [B, Tq] (kv_per_query), clamped to [0, Tk]; or nullptr
  const acc_t* phi;         // [H] phi(gate), or nullptr when there is no prompt

  int64_t q_stride() const { return H * d; }
  int64_t kv_stride() const { return Hkv * d; }
  const scalar_t* q_row(const scalar_t* base, int64_t b, int64_t i, int64_t h) const {
    return base + ((b * Tq + i) * H + h) * d;
  }
  const scalar_t* word(const scalar_t* base, int64_t b, int64_t hkv) const { return base + b * kv_bstride + hkv * d; }
  const scalar_t* prompt(const scalar_t* base, int64_t b, int64_t hkv) const {
    return base + ((Bp == 1 ? 0 : b) * K * Hkv + hkv) * d;
  }
  KeyMask word_mask(int64_t b) const {
    if (kv_start && kv_per_query) return KeyMask{0, Tk, Tk - Tq, causal, kv_start + b * Tq};
    return KeyMask{kv_start ? kv_start[b] : 0, Tk, Tk - Tq, causal};
  }
  KeyMask prompt_mask() const { return KeyMask{0, K, 0, false}; }
  int64_t stat(int64_t b, int64_t h, int64_t i) const { return (b * H + h) * Tq + i; }
};

// Allocates without initialising: Buffer<T>(n) leaves its n elements as they come, where std::vector<T>(n) zero-fills
// them. The work buffers below (Scratch, the backward's dS, dP, dK, dV, ...) are written before every read (the
// accumulators are filled explicitly), and a call allocates ~0.5 MB of them per worker and pass: the zero fills and
// their page faults were most of the kernels' fixed cost per call. Built with -DLLADAPTER_ATTN_POISON_BUFFERS, every
// element starts as a quiet NaN instead, so that a read before a write shows in the tests' results.
template <typename T>
struct NoInitAllocator : std::allocator<T> {
  template <typename U>
  struct rebind {
    using other = NoInitAllocator<U>;
  };
  NoInitAllocator() = default;
  template <typename U>
  NoInitAllocator(const NoInitAllocator<U>&) noexcept {}
  template <typename U>
  void construct(U* p) noexcept {
#ifdef LLADAPTER_ATTN_POISON_BUFFERS
    ::new (static_cast<void*>(p)) U(std::numeric_limits<U>::quiet_NaN());
#else
    ::new (static_cast<void*>(p)) U;
#endif
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};
template <typename T>
using Buffer = std::vector<T, NoInitAllocator<T>>;

// Few query rows (decode): reading the keys and values straight from their rows beats converting whole blocks.
constexpr int64_t kDirectRows = 4;

// Per-worker work buffers. rows: the most query rows a block of the call has; a call of at most kDirectRows rows
// (decode) only takes attend_direct's path and finalize_block's reads of Qs, m, l and pacc, so its Scratch holds
// those for its rows and none of the block buffers (~0.5 MB for full blocks, allocated per worker and call: in a
// decode step that was ~2 us of a ~20 us call).
template <typename acc_t>
struct Scratch {
  Buffer<acc_t> Qs, dO, Kt, Vt, Kr, Vr, S, P, dP, acc, pacc, m, l;
  Buffer<acc_t> col_max, col_alpha;  // per query column of a prompt block laid out keys x queries (prompt_scores)
  Scratch(int64_t d, int64_t dp, int64_t rows = kQB) {
    const bool blocks = rows > kDirectRows;
    rows = blocks ? kQB : rows;
    const int64_t key_block = blocks ? kKB : 0;
    Qs.resize(rows * dp);
    dO.resize(rows * dp);
    Kt.resize(d * key_block);
    Vt.resize(d * key_block);
    Kr.resize(key_block * dp);
    Vr.resize(key_block * dp);
    S.resize(rows * key_block);
    P.resize(rows * key_block);
    dP.resize(rows * key_block);
    acc.resize(rows * dp);
    pacc.resize(rows * dp);
    m.resize(rows);
    l.resize(rows);
    col_max.resize(blocks ? rows : 0);
    col_alpha.resize(blocks ? rows : 0);
  }
};

// Items whose work (multiply-adds, roughly) is below this share a thread: an OpenMP region costs more than a tiny
// problem (gradcheck shapes); large problems get grain 1.
constexpr int64_t kMinParallelWork = int64_t(1) << 17;
inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kMinParallelWork / std::max<int64_t>(1, work_per_item));
}

constexpr int64_t kPrefetchAhead = 4;

// Touches the cache lines of one row ahead of use (a hint only).
template <typename scalar_t>
inline void prefetch_row(const scalar_t* row, int64_t d) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t off = 0; off < d * static_cast<int64_t>(sizeof(scalar_t)); off += 64) __builtin_prefetch(p + off);
}

// dot(a[0:d], row[0:d]) with a in acc_t (zero padded to a multiple of the vector width) and row in scalar_t.
template <typename scalar_t, typename acc_t>
inline acc_t dot_src(const acc_t* a, const scalar_t* row, int64_t d) {
  int64_t c = 0;
  acc_t s = 0;
  if constexpr (std::is_same_v<acc_t, float>) {
    fVec acc(0.f);
    for (; c + kFVecSize <= d; c += kFVecSize) acc = at::vec::fmadd(fVec::loadu(a + c), load_as_float(row + c), acc);
    s = hsum(acc);
  }
  for (; c < d; ++c) s += a[c] * static_cast<acc_t>(row[c]);
  return s;
}

// acc[0:d] += w * row[0:d]
template <typename scalar_t, typename acc_t>
inline void axpy_src(acc_t* acc, acc_t w, const scalar_t* row, int64_t d) {
  int64_t c = 0;
  if constexpr (std::is_same_v<acc_t, float>) {
    const fVec wv(w);
    for (; c + kFVecSize <= d; c += kFVecSize)
      at::vec::fmadd(wv, load_as_float(row + c), fVec::loadu(acc + c)).store(acc + c);
  }
  for (; c < d; ++c) acc[c] += w * static_cast<acc_t>(row[c]);
}

// Four keys at once for attend_direct (fp32 sums): out[j] = dot_src(a, row0 + j * stride, d), and acc += w[j] *
// row0 + j * stride in the order j = 0..3, each the same operations in the same order as one dot_src / axpy_src call
// per key (the same bits), with four independent FMA chains instead of one and a's / acc's vectors loaded once.
template <typename scalar_t>
inline void dot4_src(const float* a, const scalar_t* row0, int64_t stride, int64_t d, float* out) {
  fVec s0(0.f), s1(0.f), s2(0.f), s3(0.f);
  int64_t c = 0;
  for (; c + kFVecSize <= d; c += kFVecSize) {
    const fVec av = fVec::loadu(a + c);
    s0 = at::vec::fmadd(av, load_as_float(row0 + c), s0);
    s1 = at::vec::fmadd(av, load_as_float(row0 + stride + c), s1);
    s2 = at::vec::fmadd(av, load_as_float(row0 + 2 * stride + c), s2);
    s3 = at::vec::fmadd(av, load_as_float(row0 + 3 * stride + c), s3);
  }
  float r[4] = {hsum(s0), hsum(s1), hsum(s2), hsum(s3)};
  for (int j = 0; j < 4; ++j) {
    for (int64_t t = c; t < d; ++t) r[j] += a[t] * static_cast<float>(row0[j * stride + t]);
    out[j] = r[j];
  }
}

template <typename scalar_t>
inline void axpy4_src(float* acc, const float* w, const scalar_t* row0, int64_t stride, int64_t d) {
  int64_t c = 0;
  const fVec w0(w[0]), w1(w[1]), w2(w[2]), w3(w[3]);
  for (; c + kFVecSize <= d; c += kFVecSize) {
    fVec a = fVec::loadu(acc + c);
    a = at::vec::fmadd(w0, load_as_float(row0 + c), a);
    a = at::vec::fmadd(w1, load_as_float(row0 + stride + c), a);
    a = at::vec::fmadd(w2, load_as_float(row0 + 2 * stride + c), a);
    a = at::vec::fmadd(w3, load_as_float(row0 + 3 * stride + c), a);
    a.store(acc + c);
  }
  for (; c < d; ++c)
    for (int j = 0; j < 4; ++j) acc[c] += w[j] * static_cast<float>(row0[j * stride + c]);
}

// attend() for a few rows, straight from the source rows (same online softmax, per key block of kKB keys).
// Row r is query position i0 + r % npos (rows may be several heads of one kv group at the same positions); the
// key blocks are the outer loop so a block read for the first row is in cache for the others.
template <typename scalar_t, typename acc_t>
void attend_direct(const acc_t* Qs, int64_t nrows, int64_t i0, int64_t npos, const scalar_t* kbase,
                   const scalar_t* vbase, int64_t kstride, const KeyMask& mk, int64_t kbeg, int64_t kend, int64_t d,
                   int64_t dp, acc_t* m, acc_t* l, acc_t* acc) {
  acc_t s[kKB];
  const int64_t lo_all = std::max(kbeg, mk.lo_min(i0, npos)), hi_all = std::min(kend, mk.hi(i0 + npos - 1));
  for (int64_t jb = lo_all; jb < hi_all; jb += kKB) {
    const int64_t jb_end = std::min(jb + kKB, hi_all);
    for (int64_t r = 0; r < nrows; ++r) {
      const acc_t* q = Qs + r * dp;
      acc_t* a = acc + r * dp;
      const int64_t pos = i0 + r % npos;
      const int64_t j0 = std::max(jb, mk.lo_at(pos)), hi = std::min(jb_end, mk.hi(pos));
      if (hi <= j0) continue;
      const int64_t nk = hi - j0;
      acc_t mb = kNegInf<acc_t>;
      // key rows are kstride apart (other heads in between): prefetch ahead, the hardware prefetcher does not
      auto prefetch_key = [&](int64_t c) {
        if (r == 0 && j0 + c + kPrefetchAhead < hi_all) {
          prefetch_row(kbase + (j0 + c + kPrefetchAhead) * kstride, d);
          prefetch_row(vbase + (j0 + c + kPrefetchAhead) * kstride, d);
        }
      };
      int64_t c = 0;
      if constexpr (std::is_same_v<acc_t, float>) {
        for (; c + 4 <= nk; c += 4) {
          for (int64_t j = 0; j < 4; ++j) prefetch_key(c + j);
          dot4_src(q, kbase + (j0 + c) * kstride, kstride, d, s + c);
          for (int64_t j = 0; j < 4; ++j) mb = max_keep_nan(mb, s[c + j]);
        }
      }
      for (; c < nk; ++c) {
        prefetch_key(c);
        s[c] = dot_src(q, kbase + (j0 + c) * kstride, d);
        mb = max_keep_nan(mb, s[c]);
      }
      const acc_t m_new = softmax_running_max(m[r], mb);
      const acc_t alpha = std::exp(m[r] - m_new);
      acc_t ps = 0;
      for (int64_t c = 0; c < nk; ++c) {
        s[c] = std::exp(s[c] - m_new);
        ps += s[c];
      }
      l[r] = l[r] * alpha + ps;
      m[r] = m_new;
      if (alpha != acc_t(1)) {
        for (int64_t c = 0; c < dp; ++c) a[c] *= alpha;
      }
      c = 0;
      if constexpr (std::is_same_v<acc_t, float>) {
        for (; c + 4 <= nk; c += 4) axpy4_src(a, s + c, vbase + (j0 + c) * kstride, kstride, d);
      }
      for (; c < nk; ++c) axpy_src(a, s[c], vbase + (j0 + c) * kstride, d);
    }
  }
}

// Online-softmax attention of nrows scaled query rows (query index i0 + r) over keys [kbeg, kend) of one head:
// updates the running max m, sum l and unnormalised accumulator acc [nrows, dp].
template <typename scalar_t, typename acc_t>
void attend(const acc_t* Qs, int64_t nrows, int64_t i0, const scalar_t* kbase, const scalar_t* vbase, int64_t kstride,
            const KeyMask& mk, int64_t kbeg, int64_t kend, int64_t d, int64_t dp, acc_t* m, acc_t* l, acc_t* acc,
            Scratch<acc_t>& sc) {
  if (nrows <= kDirectRows) {
    attend_direct(Qs, nrows, i0, nrows, kbase, vbase, kstride, mk, kbeg, kend, d, dp, m, l, acc);
    return;
  }
  using V = AVec<acc_t>;
  constexpr int64_t W = V::size();
  const bool in_place = blas_reads_rows_in_place<scalar_t, acc_t>(d, dp);
  for (int64_t j0 = kbeg; j0 < kend; j0 += kKB) {
    const int64_t nk = std::min(kKB, kend - j0);
    if (!in_place && blas_fp32<acc_t>()) {
      // bf16/fp16 (or padded d): the block converted row-major once (contiguous writes; a transposed 128 x 128 fp32
      // copy does not fit L1), S = Qs . Kr^T through BLAS below
      load_rows(sc.Kr.data(), dp, kbase + j0 * kstride, kstride, nk, d, kKB, acc_t(1));
      load_rows(sc.Vr.data(), dp, vbase + j0 * kstride, kstride, nk, d, kKB, acc_t(1));
    } else if (!in_place) {
      load_transposed(sc.Kt.data(), kbase + j0 * kstride, kstride, nk, d);
      load_rows(sc.Vr.data(), dp, vbase + j0 * kstride, kstride, nk, d, kKB, acc_t(1));
    }
    // rows [r0, r0 + rn) against keys [j0, j0 + nc)
    for_row_chunks(mk, i0, nrows, j0, nk, [&](int64_t r0, int64_t rn, int64_t nc) {
      const acc_t* Qc = Qs + r0 * dp;
      // the products read P's columns < nc only: the softmax stops at the vector holding the last key (a short
      // prompt block of K = 10 keys would otherwise pay for kKB columns)
      const int64_t ncol = (nc + W - 1) / W * W;
      if (in_place) {  // S[:, 0:nc] = Qs . K^T from the key rows (columns >= nc are masked below, never read)
        gemm_in_place(rn, nc, d, acc_t(1), Qc, dp, false, kbase + j0 * kstride, kstride, true, acc_t(0), sc.S.data(),
                      kKB);
      } else if (blas_fp32<acc_t>()) {
        gemm_in_place(rn, std::min(kKB, ncol), dp, acc_t(1), Qc, dp, false, sc.Kr.data(), dp, true, acc_t(0),
                      sc.S.data(), kKB);
      } else {
        block_scores(sc.S.data(), Qc, dp, rn, sc.Kt.data(), d, nc);
      }
      for (int64_t r = 0; r < rn; ++r) {
        const int64_t i = i0 + r0 + r;
        acc_t* s = sc.S.data() + r * kKB;
        acc_t* p = sc.P.data() + r * kKB;
        const int64_t lo = std::max<int64_t>(mk.lo_at(i) - j0, 0);
        const int64_t hi = std::min<int64_t>(mk.hi(i) - j0, nc);
        if (hi <= lo) {
          std::fill(p, p + ncol, acc_t(0));
          continue;
        }
        for (int64_t c = 0; c < lo; ++c) s[c] = kNegInf<acc_t>;
        for (int64_t c = hi; c < ncol; ++c) s[c] = kNegInf<acc_t>;
        const acc_t mb = row_max_keep_nan(s, ncol);
        acc_t& mr = m[r0 + r];
        const acc_t m_new = softmax_running_max(mr, mb);
        const acc_t alpha = std::exp(mr - m_new);  // 0 on the first block (m = -inf)
        const V mv(m_new);
        V sum(acc_t(0));
        for (int64_t c = 0; c < ncol; c += W) {
          V e = (V::loadu(s + c) - mv).exp_u20();
          e.store(p + c);
          sum = sum + e;
        }
        alignas(64) acc_t lanes[W];
        sum.store(lanes);
        acc_t ps = 0;
        for (int64_t t = 0; t < W; ++t) ps += lanes[t];
        l[r0 + r] = l[r0 + r] * alpha + ps;
        mr = m_new;
        if (alpha != acc_t(1)) {
          acc_t* a = acc + (r0 + r) * dp;
          const V av(alpha);
          for (int64_t c = 0; c < dp; c += W) (V::loadu(a + c) * av).store(a + c);
        }
      }
      if (in_place) {  // acc += P[:, 0:nc] . V from the value rows
        gemm_in_place(rn, d, nc, acc_t(1), sc.P.data(), kKB, false, vbase + j0 * kstride, kstride, false, acc_t(1),
                      acc + r0 * dp, dp);
      } else {
        accum_rows(acc + r0 * dp, dp, sc.P.data(), kKB, 1, sc.Vr.data(), dp, rn, nc, dp);
      }
    });
  }
}

// ------------------------------------------------------------------------------------------------- prompt branch
// The prompt branch of a block of query rows (more than kDirectRows of them) runs with its scores laid out keys x
// queries, St[p, c] = pk_p . q_c: K is small (10 in every adapter format), and as a [K, rows] product MKL's sgemm
// takes 3.2 us at 10 x 128 x 64 where the [rows, K] product took 9.0 us (AMD EPYC, one thread); the softmax over
// the keys then runs down the columns, a vector of queries at a time, instead of over one 10-wide row per query.

// Prompt rows [j0, j0 + nk) of (batch row b, kv head hkv) of pk or pv as fp32 rows: the source rows themselves
// where they are acc_t already and unpadded (row stride kv_stride), else converted into buf (row stride dp, zero
// padding). Sets ld to the row stride of what it returns.
template <typename scalar_t, typename acc_t>
const acc_t* prompt_rows(const Problem<scalar_t, acc_t>& pr, const scalar_t* base, int64_t b, int64_t hkv, int64_t j0,
                         int64_t nk, Buffer<acc_t>& buf, int64_t& ld) {
  const scalar_t* src = pr.prompt(base, b, hkv) + j0 * pr.kv_stride();
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (pr.d == pr.dp) {
      ld = pr.kv_stride();
      return src;
    }
  }
  load_rows(buf.data(), pr.dp, src, pr.kv_stride(), nk, pr.d, nk, acc_t(1));
  ld = pr.dp;
  return buf.data();
}

// St[p, c] = keys_p . rows_c (first d columns) for p < nk, c < nrows, row stride kQB; then the columns up to the
// next multiple of the vector width are zeroed, so that the column-wise passes read defined values there.
template <typename acc_t>
void prompt_scores(acc_t* St, const acc_t* keys, int64_t ldk, int64_t nk, const acc_t* rows, int64_t ldr, int64_t nrows,
                   int64_t d) {
  constexpr int64_t W = AVec<acc_t>::size();
  const int64_t ncol = (nrows + W - 1) / W * W;
  bool done = false;
  if constexpr (std::is_same_v<acc_t, float>) {
    done = sgemm_rowmajor(nk, nrows, d, 1.f, keys, ldk, false, rows, ldr, true, 0.f, St, kQB);
  }
  if (!done) {  // fp64 (gradcheck) and builds without a BLAS
    for (int64_t p = 0; p < nk; ++p) {
      for (int64_t c = 0; c < nrows; ++c) {
        acc_t s = 0;
        for (int64_t t = 0; t < d; ++t) s += keys[p * ldk + t] * rows[c * ldr + t];
        St[p * kQB + c] = s;
      }
    }
  }
  for (int64_t p = 0; p < nk; ++p) std::fill(St + p * kQB + nrows, St + p * kQB + ncol, acc_t(0));
}

// attend() over the prompt's K keys (no mask) for nrows > kDirectRows scaled query rows Qs of a head of kv head hkv
// of batch row b, keys x queries: the same online-softmax state (m, l, unnormalised acc [nrows, dp]) and the same NaN
// rules (a NaN or +inf running max reaches l through alpha = exp(m - m_new); exp_u20 never sees it alone).
template <typename scalar_t, typename acc_t>
void attend_prompt(const Problem<scalar_t, acc_t>& pr, int64_t b, int64_t hkv, const acc_t* Qs, int64_t nrows, acc_t* m,
                   acc_t* l, acc_t* acc, Scratch<acc_t>& sc) {
  using V = AVec<acc_t>;
  constexpr int64_t W = V::size();
  const int64_t dp = pr.dp, ncol = (nrows + W - 1) / W * W;
  acc_t* St = sc.S.data();
  acc_t* cmax = sc.col_max.data();
  acc_t* alpha = sc.col_alpha.data();
  for (int64_t j0 = 0; j0 < pr.K; j0 += kKB) {
    const int64_t nk = std::min(kKB, pr.K - j0);
    int64_t ldk = 0, ldv = 0;
    const acc_t* keys = prompt_rows(pr, pr.pk, b, hkv, j0, nk, sc.Kr, ldk);
    prompt_scores(St, keys, ldk, nk, Qs, dp, nrows, pr.d);
    for (int64_t c = 0; c < ncol; c += W) {  // column maxima (vec::maximum keeps NaN)
      V mv = V::loadu(St + c);
      for (int64_t p = 1; p < nk; ++p) mv = at::vec::maximum(mv, V::loadu(St + p * kQB + c));
      mv.store(cmax + c);
    }
    for (int64_t c = 0; c < nrows; ++c) {
      const acc_t m_new = softmax_running_max(m[c], cmax[c]);
      alpha[c] = std::exp(m[c] - m_new);  // 0 on the first block (m = -inf)
      m[c] = m_new;
    }
    std::copy(m, m + nrows, cmax);  // cmax: the new running maxima, 0 in the tail lanes
    std::fill(cmax + nrows, cmax + ncol, acc_t(0));
    for (int64_t c = 0; c < ncol; c += W) {  // St = exp(s - m), column sums
      const V mv = V::loadu(cmax + c);
      V sum(acc_t(0));
      for (int64_t p = 0; p < nk; ++p) {
        const V e = (V::loadu(St + p * kQB + c) - mv).exp_u20();
        e.store(St + p * kQB + c);
        sum = sum + e;
      }
      sum.store(cmax + c);
    }
    for (int64_t c = 0; c < nrows; ++c) {
      l[c] = l[c] * alpha[c] + cmax[c];
      if (alpha[c] != acc_t(1)) {
        acc_t* a = acc + c * dp;
        const V av(alpha[c]);
        for (int64_t t = 0; t < dp; t += W) (V::loadu(a + t) * av).store(a + t);
      }
    }
    const acc_t* vals = prompt_rows(pr, pr.pv, b, hkv, j0, nk, sc.Vr, ldv);
    accum_rows(acc, dp, St, 1, kQB, vals, ldv, nrows, nk, dp);  // acc[c] += sum_p St[p, c] pv_p
  }
}

// The key range [kbeg, kend) that any of the rows [i0, i0 + nrows) may see.
inline std::pair<int64_t, int64_t> block_key_range(const KeyMask& mk, int64_t i0, int64_t nrows) {
  const int64_t kbeg = mk.lo_min(i0, nrows);
  const int64_t kend = mk.hi(i0 + nrows - 1);
  return {kbeg, std::max(kbeg, kend)};
}

// Finishes one query block: normalises the word state, computes the prompt branch, writes out and both LSEs.
template <typename scalar_t, typename acc_t>
void finalize_block(const Problem<scalar_t, acc_t>& pr, int64_t b, int64_t h, int64_t i0, int64_t nrows, const acc_t* m,
                    const acc_t* l, acc_t* acc, scalar_t* out, acc_t* lse, acc_t* plse, Scratch<acc_t>& sc) {
  using V = AVec<acc_t>;
  constexpr int64_t W = V::size();
  const int64_t d = pr.d, dp = pr.dp;
  for (int64_t r = 0; r < nrows; ++r) {
    const int64_t si = pr.stat(b, h, i0 + r);
    acc_t* a = acc + r * dp;
    if (l[r] != acc_t(0)) {  // (a NaN sum is a row that saw a non-finite score: it stays NaN)
      lse[si] = m[r] + std::log(l[r]);
      const V inv(acc_t(1) / l[r]);
      for (int64_t c = 0; c < dp; c += W) (V::loadu(a + c) * inv).store(a + c);
    } else {
      lse[si] = kNegInf<acc_t>;  // no allowed word key: the word branch gives 0
      std::fill(a, a + dp, acc_t(0));
    }
  }
  if (pr.has_prompt) {
    const int64_t hkv = h / pr.rep;
    acc_t* pm = sc.m.data();
    acc_t* pl = sc.l.data();
    acc_t* pacc = sc.pacc.data();
    std::fill(pacc, pacc + nrows * dp, acc_t(0));
    std::fill(pm, pm + nrows, kNegInf<acc_t>);
    std::fill(pl, pl + nrows, acc_t(0));
    if (nrows <= kDirectRows) {  // decode: straight from the prompt rows
      attend(sc.Qs.data(), nrows, i0, pr.prompt(pr.pk, b, hkv), pr.prompt(pr.pv, b, hkv), pr.kv_stride(),
             pr.prompt_mask(), 0, pr.K, d, dp, pm, pl, pacc, sc);
    } else {
      attend_prompt(pr, b, hkv, sc.Qs.data(), nrows, pm, pl, pacc, sc);
    }
    const acc_t g = pr.phi[h];
    for (int64_t r = 0; r < nrows; ++r) {
      plse[pr.stat(b, h, i0 + r)] = pm[r] + std::log(pl[r]);
      const acc_t w = g / pl[r];
      acc_t* a = acc + r * dp;
      const acc_t* pa = pacc + r * dp;
      for (int64_t c = 0; c < d; ++c) a[c] += w * pa[c];
    }
  } else {
    for (int64_t r = 0; r < nrows; ++r) plse[pr.stat(b, h, i0 + r)] = kNegInf<acc_t>;
  }
  for (int64_t r = 0; r < nrows; ++r) {
    scalar_t* o = out + ((b * pr.Tq + i0 + r) * pr.H + h) * d;
    const acc_t* a = acc + r * dp;
    for (int64_t c = 0; c < d; ++c) o[c] = static_cast<scalar_t>(a[c]);
  }
}

template <typename scalar_t, typename acc_t>
void forward_impl(const Problem<scalar_t, acc_t>& pr, scalar_t* out, acc_t* lse, acc_t* plse) {
  const int64_t nqb = (pr.Tq + kQB - 1) / kQB;
  const int64_t items = pr.B * pr.H * nqb;
  const int64_t dp = pr.dp;
  // Split-K when there are too few (b, h, query block) items to occupy the threads and many keys (decode).
  const int64_t threads = at::get_num_threads();
  int64_t nsplit = 1;
  if (items < 2 * threads && pr.Tk > 2 * kKB) {
    nsplit = std::min<int64_t>((2 * threads + items - 1) / items, (pr.Tk + kKB - 1) / kKB);
  }
  auto item_geom = [&](int64_t it, int64_t& b, int64_t& h, int64_t& i0, int64_t& nrows) {
    const int64_t qb = it % nqb;
    h = (it / nqb) % pr.H;
    b = it / (nqb * pr.H);
    i0 = qb * kQB;
    nrows = std::min(kQB, pr.Tq - i0);
  };
  // (the few-rows paths read no padding row, and their Scratch has none)
  auto load_q = [&](Scratch<acc_t>& sc, int64_t b, int64_t h, int64_t i0, int64_t nrows) {
    load_rows(sc.Qs.data(), dp, pr.q_row(pr.q, b, i0, h), pr.q_stride(), nrows, pr.d,
              nrows <= kDirectRows ? nrows : kQB, pr.qk_scale);
  };
  // The word-key sub-range of split s of an item (key blocks split evenly, aligned to kKB).
  auto split_range = [&](const KeyMask& mk, int64_t i0, int64_t nrows, int64_t s) {
    auto [kbeg, kend] = block_key_range(mk, i0, nrows);
    const int64_t nblk = (kend - kbeg + kKB - 1) / kKB;
    const int64_t per = (nblk + nsplit - 1) / nsplit;
    const int64_t a = std::min(kend, kbeg + s * per * kKB), e = std::min(kend, kbeg + (s + 1) * per * kKB);
    return std::pair<int64_t, int64_t>{a, e};
  };

  // Decode with grouped-query attention: the heads of a kv group share one item, so each key/value row is read
  // from memory once per group (enough groups to occupy the threads, else split-K below).
  if (pr.Tq <= kDirectRows && pr.rep > 1 && pr.B * pr.Hkv >= threads) {
    const int64_t nrows = pr.Tq, rows = pr.rep * nrows;
    at::parallel_for(0, pr.B * pr.Hkv, grain_for(pr.rep * pr.Tq * pr.Tk * pr.d), [&](int64_t begin, int64_t end) {
      SequentialBlasGuard blas_guard;
      Scratch<acc_t> sc(pr.d, dp, pr.Tq);
      Buffer<acc_t> Qg(rows * dp), m(rows), l(rows), acc(rows * dp);
      for (int64_t it = begin; it < end; ++it) {
        const int64_t hkv = it % pr.Hkv, b = it / pr.Hkv;
        for (int64_t hl = 0; hl < pr.rep; ++hl) {
          load_rows(Qg.data() + hl * nrows * dp, dp, pr.q_row(pr.q, b, 0, hkv * pr.rep + hl), pr.q_stride(), nrows,
                    pr.d, nrows, pr.qk_scale);
        }
        std::fill(m.begin(), m.end(), kNegInf<acc_t>);
        std::fill(l.begin(), l.end(), acc_t(0));
        std::fill(acc.begin(), acc.end(), acc_t(0));
        const KeyMask mk = pr.word_mask(b);
        auto [kbeg, kend] = block_key_range(mk, 0, nrows);
        attend_direct(Qg.data(), rows, 0, nrows, pr.word(pr.k, b, hkv), pr.word(pr.v, b, hkv), pr.kv_stride(), mk, kbeg,
                      kend, pr.d, dp, m.data(), l.data(), acc.data());
        for (int64_t hl = 0; hl < pr.rep; ++hl) {
          const int64_t h = hkv * pr.rep + hl;
          load_q(sc, b, h, 0, nrows);  // finalize_block reads the head's scaled rows for the prompt branch
          finalize_block(pr, b, h, 0, nrows, m.data() + hl * nrows, l.data() + hl * nrows, acc.data() + hl * nrows * dp,
                         out, lse, plse, sc);
        }
      }
    });
    return;
  }

  if (nsplit == 1) {
    at::parallel_for(0, items, grain_for(std::min(kQB, pr.Tq) * pr.Tk * pr.d), [&](int64_t begin, int64_t end) {
      SequentialBlasGuard blas_guard;
      Scratch<acc_t> sc(pr.d, dp, pr.Tq);
      Buffer<acc_t> m(kQB), l(kQB);
      for (int64_t it = begin; it < end; ++it) {
        int64_t b, h, i0, nrows;
        item_geom(it, b, h, i0, nrows);
        load_q(sc, b, h, i0, nrows);
        std::fill(m.begin(), m.end(), kNegInf<acc_t>);
        std::fill(l.begin(), l.end(), acc_t(0));
        std::fill(sc.acc.begin(), sc.acc.end(), acc_t(0));
        const KeyMask mk = pr.word_mask(b);
        auto [kbeg, kend] = block_key_range(mk, i0, nrows);
        const int64_t hkv = h / pr.rep;
        attend(sc.Qs.data(), nrows, i0, pr.word(pr.k, b, hkv), pr.word(pr.v, b, hkv), pr.kv_stride(), mk, kbeg, kend,
               pr.d, dp, m.data(), l.data(), sc.acc.data(), sc);
        finalize_block(pr, b, h, i0, nrows, m.data(), l.data(), sc.acc.data(), out, lse, plse, sc);
      }
    });
    return;
  }

  // Split-K: partial states per (item, split), merged in split order.
  Buffer<acc_t> pm(items * nsplit * kQB), pl(items * nsplit * kQB), pacc(items * nsplit * kQB * dp);
  at::parallel_for(0, items * nsplit, grain_for(pr.Tq * pr.Tk / nsplit * pr.d), [&](int64_t begin, int64_t end) {
    SequentialBlasGuard blas_guard;
    Scratch<acc_t> sc(pr.d, dp, pr.Tq);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t it = w / nsplit, s = w % nsplit;
      int64_t b, h, i0, nrows;
      item_geom(it, b, h, i0, nrows);
      load_q(sc, b, h, i0, nrows);
      acc_t* m = pm.data() + w * kQB;
      acc_t* l = pl.data() + w * kQB;
      acc_t* a = pacc.data() + w * kQB * dp;
      std::fill(m, m + kQB, kNegInf<acc_t>);
      std::fill(l, l + kQB, acc_t(0));
      std::fill(a, a + kQB * dp, acc_t(0));
      const KeyMask mk = pr.word_mask(b);
      auto [ka, ke] = split_range(mk, i0, nrows, s);
      const int64_t hkv = h / pr.rep;
      attend(sc.Qs.data(), nrows, i0, pr.word(pr.k, b, hkv), pr.word(pr.v, b, hkv), pr.kv_stride(), mk, ka, ke, pr.d,
             dp, m, l, a, sc);
    }
  });
  at::parallel_for(0, items, grain_for(pr.Tq * (nsplit + pr.K) * pr.d), [&](int64_t begin, int64_t end) {
    SequentialBlasGuard blas_guard;
    Scratch<acc_t> sc(pr.d, dp, pr.Tq);
    Buffer<acc_t> m(kQB), l(kQB);
    for (int64_t it = begin; it < end; ++it) {
      int64_t b, h, i0, nrows;
      item_geom(it, b, h, i0, nrows);
      load_q(sc, b, h, i0, nrows);
      std::fill(sc.acc.begin(), sc.acc.end(), acc_t(0));
      for (int64_t r = 0; r < nrows; ++r) {
        acc_t mx = kNegInf<acc_t>;
        for (int64_t s = 0; s < nsplit; ++s) mx = max_keep_nan(mx, pm[(it * nsplit + s) * kQB + r]);
        m[r] = mx;
        l[r] = 0;
        acc_t* a = sc.acc.data() + r * dp;
        for (int64_t s = 0; s < nsplit; ++s) {
          const int64_t w = it * nsplit + s;
          const acc_t ms = pm[w * kQB + r];
          // an empty chunk (m = -inf, l = 0) adds nothing; one whose allowed keys all scored -inf (l = NaN) makes
          // the row NaN, as softmax does
          if (ms == kNegInf<acc_t> && pl[w * kQB + r] == acc_t(0)) continue;
          const acc_t f = std::exp(ms - mx);
          l[r] += f * pl[w * kQB + r];
          const acc_t* src = pacc.data() + (w * kQB + r) * dp;
          for (int64_t c = 0; c < dp; ++c) a[c] += f * src[c];
        }
      }
      finalize_block(pr, b, h, i0, nrows, m.data(), l.data(), sc.acc.data(), out, lse, plse, sc);
    }
  });
}

// ------------------------------------------------------------------------------------------------- backward
// Columns [nk, ncol) of the first nrows rows of a [kQB, kKB] block that an in-place product of nk keys left
// untouched (ncol: nk rounded up to the vector width, the columns probs_and_dscores reads): zeroed, so that stale
// values (possibly inf) never meet the zero probabilities of masked keys.
template <typename acc_t>
void zero_tail_columns(acc_t* X, int64_t nrows, int64_t nk) {
  constexpr int64_t W = AVec<acc_t>::size();
  const int64_t ncol = std::min(kKB, (nk + W - 1) / W * W);
  if (nk == ncol) return;
  for (int64_t r = 0; r < nrows; ++r) std::fill(X + r * kKB + nk, X + r * kKB + ncol, acc_t(0));
}

// P = exp(S - lse_i) on allowed keys (0 elsewhere and on rows whose branch is empty); then
// dS = factor * P * (dP - D_i) and P *= factor, where dP = dout . v_j (factor = phi(g_h) for the prompt branch).
template <typename acc_t>
void probs_and_dscores(acc_t* P, acc_t* dS, acc_t* S, const acc_t* dP, int64_t nrows, int64_t i0, int64_t j0,
                       int64_t nk, const KeyMask& mk, const acc_t* lse_rows, const acc_t* D_rows, acc_t factor) {
  using V = AVec<acc_t>;
  constexpr int64_t W = V::size();
  const int64_t ncol = (nk + W - 1) / W * W;  // columns >= nk of P and dS are never read
  for (int64_t r = 0; r < nrows; ++r) {
    acc_t* p = P + r * kKB;
    acc_t* ds = dS + r * kKB;
    const int64_t lo = std::max<int64_t>(mk.lo_at(i0 + r) - j0, 0);
    const int64_t hi = std::min<int64_t>(mk.hi(i0 + r) - j0, nk);
    const acc_t L = lse_rows[r];
    if (hi <= lo || L == kNegInf<acc_t>) {
      std::fill(p, p + ncol, acc_t(0));
      std::fill(ds, ds + ncol, acc_t(0));
      continue;
    }
    if (L != L) {  // a row that saw a non-finite score: NaN on its keys (exp_u20 would turn NaN into a finite value)
      std::fill(p, p + ncol, acc_t(0));
      std::fill(ds, ds + ncol, acc_t(0));
      std::fill(p + lo, p + hi, std::numeric_limits<acc_t>::quiet_NaN());
      std::fill(ds + lo, ds + hi, std::numeric_limits<acc_t>::quiet_NaN());
      continue;
    }
    acc_t* s = S + r * kKB;
    for (int64_t c = 0; c < lo; ++c) s[c] = kNegInf<acc_t>;  // exp gives exactly 0 on masked keys
    for (int64_t c = hi; c < ncol; ++c) s[c] = kNegInf<acc_t>;
    const acc_t* dp = dP + r * kKB;
    const V Lv(L), Dv(D_rows[r]), fv(factor);
    for (int64_t c = 0; c < ncol; c += W) {
      const V e = (V::loadu(s + c) - Lv).exp_u20() * fv;
      (e * (V::loadu(dp + c) - Dv)).store(ds + c);
      e.store(p + c);
    }
    // masked keys get exactly 0, also in a NaN row (exp(-inf - NaN) is NaN): nothing flows to keys it cannot see
    for (int64_t c = 0; c < lo; ++c) p[c] = ds[c] = acc_t(0);
    for (int64_t c = hi; c < nk; ++c) p[c] = ds[c] = acc_t(0);
  }
}

template <typename scalar_t, typename acc_t>
struct BwdBuffers {
  const scalar_t* dout;
  const scalar_t* out;
  const acc_t* lse;
  const acc_t* plse;
  acc_t* Dw;  // [B, H, Tq] dout . out_word
  acc_t* Dp;  // [B, H, Tq] dout . out_prompt (before the gate)
};

// Gradient contributions to a block of word keys [j0, j0 + nk) of kv head hkv of batch row b from the query rows of
// the heads of the group: dK += dS^T Qs (Qs already scaled), dV += P^T dout; with dQ_group also dq += dS K.
template <typename scalar_t, typename acc_t>
void kv_grad_block(const Problem<scalar_t, acc_t>& pr, const BwdBuffers<scalar_t, acc_t>& bb, int64_t b, int64_t hkv,
                   int64_t j0, int64_t nk, acc_t* dK, acc_t* dV, Scratch<acc_t>& sc, Buffer<acc_t>& dS,
                   Buffer<acc_t>& lse_rows, Buffer<acc_t>& D_rows, acc_t* dQ_group = nullptr) {
  const int64_t d = pr.d, dp = pr.dp;
  const bool in_place = blas_reads_rows_in_place<scalar_t, acc_t>(d, dp);
  std::fill(dK, dK + kKB * dp, acc_t(0));
  std::fill(dV, dV + kKB * dp, acc_t(0));
  const KeyMask mk = pr.word_mask(b);
  if (!mk.lo_rows && mk.lo >= j0 + nk) return;  // every key of the block is left padding for this row
  const scalar_t* kblk = pr.word(pr.k, b, hkv) + j0 * pr.kv_stride();
  const scalar_t* vblk = pr.word(pr.v, b, hkv) + j0 * pr.kv_stride();
  if (!in_place) {
    load_transposed(sc.Kt.data(), kblk, pr.kv_stride(), nk, d);
    load_transposed(sc.Vt.data(), vblk, pr.kv_stride(), nk, d);
    if (dQ_group) load_rows(sc.Kr.data(), dp, kblk, pr.kv_stride(), nk, d, kKB, acc_t(1));
  }
  const int64_t i_start = mk.causal ? std::max<int64_t>(0, j0 - mk.off) : 0;
  for (int64_t h = hkv * pr.rep; h < (hkv + 1) * pr.rep; ++h) {
    const acc_t* lse = bb.lse;
    const acc_t* D = bb.Dw;
    for (int64_t i0 = i_start; i0 < pr.Tq; i0 += kQB) {
      const int64_t nrows = std::min(kQB, pr.Tq - i0);
      // per-query bounds (packed sequences): the block's keys lie below every row's first key, so all its
      // probabilities are 0 (skipping adds nothing anywhere, dq included)
      if (mk.lo_rows && mk.lo_min(i0, nrows) >= j0 + nk) continue;
      if (!in_place) {
        load_rows(sc.Qs.data(), dp, pr.q_row(pr.q, b, i0, h), pr.q_stride(), nrows, d, kQB, pr.qk_scale);
        load_rows(sc.dO.data(), dp, pr.q_row(bb.dout, b, i0, h), pr.q_stride(), nrows, d, kQB, acc_t(1));
      }
      for (int64_t r = 0; r < nrows; ++r) {
        lse_rows[r] = lse[pr.stat(b, h, i0 + r)];
        D_rows[r] = D[pr.stat(b, h, i0 + r)];
      }
      // rows [r0, r0 + rn) against keys [j0, j0 + nc)
      for_row_chunks(mk, i0, nrows, j0, nk, [&](int64_t r0, int64_t rn, int64_t nc) {
        const scalar_t* q_rows = pr.q_row(pr.q, b, i0 + r0, h);
        const scalar_t* do_rows = pr.q_row(bb.dout, b, i0 + r0, h);
        const acc_t* Qs = sc.Qs.data() + r0 * dp;
        const acc_t* dO = sc.dO.data() + r0 * dp;
        if (in_place) {  // S = scale * q . K^T and dP = dout . V^T from the source rows
          gemm_in_place(rn, nc, d, pr.qk_scale, q_rows, pr.q_stride(), false, kblk, pr.kv_stride(), true, acc_t(0),
                        sc.S.data(), kKB);
          gemm_in_place(rn, nc, d, acc_t(1), do_rows, pr.q_stride(), false, vblk, pr.kv_stride(), true, acc_t(0),
                        sc.dP.data(), kKB);
          zero_tail_columns(sc.dP.data(), rn, nc);
        } else {
          block_scores(sc.S.data(), Qs, dp, rn, sc.Kt.data(), d, nc);
          block_scores(sc.dP.data(), dO, dp, rn, sc.Vt.data(), d, nc);
        }
        probs_and_dscores(sc.P.data(), dS.data(), sc.S.data(), sc.dP.data(), rn, i0 + r0, j0, nc, mk,
                          lse_rows.data() + r0, D_rows.data() + r0, acc_t(1));
        acc_t* dq_rows = dQ_group ? dQ_group + ((h - hkv * pr.rep) * pr.Tq + i0 + r0) * dp : nullptr;
        if (in_place) {  // dV += P^T dout, dK += scale * dS^T q, dq (scaled-query units) += dS K
          gemm_in_place(nc, d, rn, acc_t(1), sc.P.data(), kKB, true, do_rows, pr.q_stride(), false, acc_t(1), dV, dp);
          gemm_in_place(nc, d, rn, pr.qk_scale, dS.data(), kKB, true, q_rows, pr.q_stride(), false, acc_t(1), dK, dp);
          if (dq_rows) {
            gemm_in_place(rn, d, nc, acc_t(1), dS.data(), kKB, false, kblk, pr.kv_stride(), false, acc_t(1), dq_rows,
                          dp);
          }
        } else {
          accum_rows(dV, dp, sc.P.data(), 1, kKB, dO, dp, nc, rn, dp);
          accum_rows(dK, dp, dS.data(), 1, kKB, Qs, dp, nc, rn, dp);
          // single-pass mode: this item owns the dq rows of its group, key blocks in order
          if (dq_rows) accum_rows(dq_rows, dp, dS.data(), kKB, 1, sc.Kr.data(), dp, rn, nc, dp);
        }
      });
    }
  }
}

// dq contributions (in units of the scaled query) of word keys [kbeg, kend) of one head to query rows
// [i0, i0 + nrows), whose source rows of q and dout start at q_rows and do_rows (read in place for fp32, as
// kv_grad_block does: the same products, so both backward modes give bit-identical dq for any scale), or scaled and
// converted in sc.Qs and sc.dO.
template <typename scalar_t, typename acc_t>
void q_grad_keys(const Problem<scalar_t, acc_t>& pr, const scalar_t* kbase, const scalar_t* vbase, const KeyMask& mk,
                 int64_t kbeg, int64_t kend, int64_t i0, int64_t nrows, const scalar_t* q_rows, const scalar_t* do_rows,
                 const acc_t* lse_rows, const acc_t* D_rows, acc_t factor, acc_t* dQ, Scratch<acc_t>& sc,
                 Buffer<acc_t>& dS, Buffer<acc_t>& dP) {
  const int64_t d = pr.d, dp = pr.dp;
  const bool in_place = blas_reads_rows_in_place<scalar_t, acc_t>(d, dp);
  for (int64_t j0 = kbeg; j0 < kend; j0 += kKB) {
    const int64_t nk = std::min(kKB, kend - j0);
    const scalar_t* kblk = kbase + j0 * pr.kv_stride();
    const scalar_t* vblk = vbase + j0 * pr.kv_stride();
    if (!in_place) {
      load_transposed(sc.Kt.data(), kblk, pr.kv_stride(), nk, d);
      load_transposed(sc.Vt.data(), vblk, pr.kv_stride(), nk, d);
      load_rows(sc.Kr.data(), dp, kblk, pr.kv_stride(), nk, d, kKB, acc_t(1));
    }
    // the same row chunks as kv_grad_block (so the single-pass mode's dq is bit-identical)
    for_row_chunks(mk, i0, nrows, j0, nk, [&](int64_t r0, int64_t rn, int64_t nc) {
      const acc_t* Qs = sc.Qs.data() + r0 * dp;
      const acc_t* dO = sc.dO.data() + r0 * dp;
      if (in_place) {
        gemm_in_place(rn, nc, d, pr.qk_scale, q_rows + r0 * pr.q_stride(), pr.q_stride(), false, kblk, pr.kv_stride(),
                      true, acc_t(0), sc.S.data(), kKB);
        gemm_in_place(rn, nc, d, acc_t(1), do_rows + r0 * pr.q_stride(), pr.q_stride(), false, vblk, pr.kv_stride(),
                      true, acc_t(0), dP.data(), kKB);
        zero_tail_columns(dP.data(), rn, nc);
      } else {
        block_scores(sc.S.data(), Qs, dp, rn, sc.Kt.data(), d, nc);
        block_scores(dP.data(), dO, dp, rn, sc.Vt.data(), d, nc);
      }
      probs_and_dscores(sc.P.data(), dS.data(), sc.S.data(), dP.data(), rn, i0 + r0, j0, nc, mk, lse_rows + r0,
                        D_rows + r0, factor);
      if (in_place) {
        gemm_in_place(rn, d, nc, acc_t(1), dS.data(), kKB, false, kblk, pr.kv_stride(), false, acc_t(1), dQ + r0 * dp,
                      dp);
      } else {
        accum_rows(dQ + r0 * dp, dp, dS.data(), kKB, 1, sc.Kr.data(), dp, rn, nc, dp);
      }
    });
  }
}

// The prompt branch of the backward for query rows [i0, i0 + nrows) of (b, h), from their scaled rows in sc.Qs and
// dout in sc.dO, keys x queries as in the forward (prompt_scores): P'^T = exp(s' - prompt_lse), dP'^T = pv . dout and
// D_prompt = sum_p P' dP' (= dout . prompt_out, which is never formed), stored in bb.Dp; then phi P' and
// dS' = phi P' (dP' - D_prompt) into Pst and dSst, each [B, H, K, Tq] (the (b, h) block keys x queries).
template <typename scalar_t, typename acc_t>
void prompt_grad_rows(const Problem<scalar_t, acc_t>& pr, const BwdBuffers<scalar_t, acc_t>& bb, int64_t b, int64_t h,
                      int64_t i0, int64_t nrows, Scratch<acc_t>& sc, acc_t* Pst, acc_t* dSst) {
  using V = AVec<acc_t>;
  constexpr int64_t W = V::size();
  const int64_t dp = pr.dp, K = pr.K, Tq = pr.Tq, hkv = h / pr.rep, ncol = (nrows + W - 1) / W * W;
  acc_t* L = sc.l.data();   // prompt_lse of the rows (0 in the tail lanes)
  acc_t* Dp = sc.m.data();  // D_prompt of the rows
  bool special = false;     // a row without a finite prompt_lse
  for (int64_t r = 0; r < ncol; ++r) {
    L[r] = r < nrows ? bb.plse[pr.stat(b, h, i0 + r)] : acc_t(0);
    Dp[r] = 0;
    special |= !std::isfinite(L[r]);
  }
  acc_t* St = sc.S.data();
  acc_t* dPt = sc.dP.data();
  acc_t* pst = Pst + pr.stat(b, h, 0) * K + i0;  // row p of the (b, h) block at + p * Tq
  acc_t* dst = dSst + pr.stat(b, h, 0) * K + i0;
  for (int64_t j0 = 0; j0 < K; j0 += kKB) {
    const int64_t nk = std::min(kKB, K - j0);
    int64_t ldk = 0, ldv = 0;
    const acc_t* keys = prompt_rows(pr, pr.pk, b, hkv, j0, nk, sc.Kr, ldk);
    const acc_t* vals = prompt_rows(pr, pr.pv, b, hkv, j0, nk, sc.Vr, ldv);
    prompt_scores(St, keys, ldk, nk, sc.Qs.data(), dp, nrows, pr.d);
    prompt_scores(dPt, vals, ldv, nk, sc.dO.data(), dp, nrows, pr.d);
    for (int64_t c = 0; c < ncol; c += W) {
      const V Lv = V::loadu(L + c);
      V Dv = V::loadu(Dp + c);
      for (int64_t p = 0; p < nk; ++p) {
        const V e = (V::loadu(St + p * kQB + c) - Lv).exp_u20();
        e.store(St + p * kQB + c);
        Dv = at::vec::fmadd(e, V::loadu(dPt + p * kQB + c), Dv);
      }
      Dv.store(Dp + c);
    }
    for (int64_t p = 0; p < nk; ++p) {  // P' and dP' (until D_prompt is complete)
      std::copy(St + p * kQB, St + p * kQB + nrows, pst + (j0 + p) * Tq);
      std::copy(dPt + p * kQB, dPt + p * kQB + nrows, dst + (j0 + p) * Tq);
    }
  }
  if (special) {
    for (int64_t r = 0; r < nrows; ++r) {
      if (std::isfinite(L[r])) continue;
      // no prompt key (-inf; not reached with K > 0): zeros; a row that saw a non-finite score (NaN): NaN, which
      // exp_u20 would have turned into a finite value
      const acc_t x = L[r] == kNegInf<acc_t> ? acc_t(0) : std::numeric_limits<acc_t>::quiet_NaN();
      for (int64_t p = 0; p < K; ++p) pst[p * Tq + r] = dst[p * Tq + r] = x;
      Dp[r] = x;
    }
  }
  for (int64_t r = 0; r < nrows; ++r) bb.Dp[pr.stat(b, h, i0 + r)] = Dp[r];
  const acc_t phi = pr.phi[h];
  for (int64_t p = 0; p < K; ++p) {  // phi P' and dS' = phi P' (dP' - D_prompt): exactly 0 or NaN in the rows above
    acc_t* pr_row = pst + p * Tq;
    acc_t* ds_row = dst + p * Tq;
    for (int64_t r = 0; r < nrows; ++r) {
      const acc_t e = pr_row[r] * phi;
      ds_row[r] = e * (ds_row[r] - Dp[r]);
      pr_row[r] = e;
    }
  }
}

template <typename scalar_t, typename acc_t>
void backward_impl(const Problem<scalar_t, acc_t>& pr, const BwdBuffers<scalar_t, acc_t>& bb, scalar_t* dq,
                   scalar_t* dk, scalar_t* dv, scalar_t* dpk, scalar_t* dpv) {
  const int64_t d = pr.d, dp = pr.dp;
  const int64_t nqb = (pr.Tq + kQB - 1) / kQB;
  const int64_t q_items = pr.B * pr.H * nqb;

  // phi P' and dS' of the prompt branch, [B, H, K, Tq] each (keys x queries per (b, h); every entry written in pass 0)
  const int64_t pstash = pr.has_prompt ? pr.B * pr.H * pr.Tq * pr.K : 0;
  std::unique_ptr<acc_t[]> Pst(new acc_t[pstash]), dSst(new acc_t[pstash]);

  // pass 0: D_word and D_prompt per row, the prompt's probabilities and dS'
  at::parallel_for(0, q_items, grain_for(std::min(kQB, pr.Tq) * (pr.K + 1) * d), [&](int64_t begin, int64_t end) {
    SequentialBlasGuard blas_guard;
    Scratch<acc_t> sc(d, dp);
    Buffer<acc_t> orow(dp);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t i0 = (it % nqb) * kQB, h = (it / nqb) % pr.H, b = it / (nqb * pr.H);
      const int64_t nrows = std::min(kQB, pr.Tq - i0);
      load_rows(sc.dO.data(), dp, pr.q_row(bb.dout, b, i0, h), pr.q_stride(), nrows, d, kQB, acc_t(1));
      if (pr.has_prompt) {
        load_rows(sc.Qs.data(), dp, pr.q_row(pr.q, b, i0, h), pr.q_stride(), nrows, d, kQB, pr.qk_scale);
        prompt_grad_rows(pr, bb, b, h, i0, nrows, sc, Pst.get(), dSst.get());
      }
      for (int64_t r = 0; r < nrows; ++r) {
        const int64_t si = pr.stat(b, h, i0 + r);
        const acc_t* g = sc.dO.data() + r * dp;
        const scalar_t* o = pr.q_row(bb.out, b, i0 + r, h);
        for (int64_t c = 0; c < d; ++c) orow[c] = static_cast<acc_t>(o[c]);
        for (int64_t c = d; c < dp; ++c) orow[c] = 0;
        if (!pr.has_prompt) bb.Dp[si] = 0;
        bb.Dw[si] = dot_padded(g, orow.data(), dp) - (pr.has_prompt ? pr.phi[h] * bb.Dp[si] : acc_t(0));
      }
    }
  });

  const int64_t nkb = (pr.Tk + kKB - 1) / kKB;
  const int64_t threads = at::get_num_threads();
  const int64_t groups = pr.B * pr.Hkv;
  // Single pass (5 block products per key/query block pair instead of 7) when the (b, kv head) items alone
  // occupy the threads evenly: each item then owns the dq rows of its heads and accumulates them in key order.
  const bool single_pass = groups % threads == 0 || groups >= 4 * threads;
  auto write_kv = [&](int64_t b, int64_t hkv, int64_t j0, int64_t nk, const acc_t* dK, const acc_t* dV) {
    for (int64_t r = 0; r < nk; ++r) {
      scalar_t* ko = dk + ((b * pr.Tk + j0 + r) * pr.Hkv + hkv) * d;
      scalar_t* vo = dv + ((b * pr.Tk + j0 + r) * pr.Hkv + hkv) * d;
      for (int64_t c = 0; c < d; ++c) {
        ko[c] = static_cast<scalar_t>(dK[r * dp + c]);
        vo[c] = static_cast<scalar_t>(dV[r * dp + c]);
      }
    }
  };
  // dq of one query block: acc holds the word-key part (scaled-query units); adds the prompt part and writes.
  auto finish_dq = [&](Scratch<acc_t>& sc, int64_t b, int64_t h, int64_t i0, int64_t nrows, acc_t* acc) {
    if (pr.has_prompt) {  // acc += dS' pk, dS' from pass 0 (keys x queries: row p of (b, h) at + p * Tq)
      const int64_t hkv = h / pr.rep;
      const acc_t* dSt = dSst.get() + pr.stat(b, h, 0) * pr.K + i0;
      for (int64_t j0 = 0; j0 < pr.K; j0 += kKB) {
        const int64_t nk = std::min(kKB, pr.K - j0);
        int64_t ldk = 0;
        const acc_t* keys = prompt_rows(pr, pr.pk, b, hkv, j0, nk, sc.Kr, ldk);
        accum_rows(acc, dp, dSt + j0 * pr.Tq, 1, pr.Tq, keys, ldk, nrows, nk, dp);
      }
    }
    for (int64_t r = 0; r < nrows; ++r) {
      scalar_t* o = dq + ((b * pr.Tq + i0 + r) * pr.H + h) * d;
      const acc_t* a = acc + r * dp;
      for (int64_t c = 0; c < d; ++c) o[c] = static_cast<scalar_t>(a[c] * pr.qk_scale);
    }
  };

  if (single_pass) {
    at::parallel_for(0, groups, grain_for(pr.rep * pr.Tq * pr.Tk * d), [&](int64_t begin, int64_t end) {
      SequentialBlasGuard blas_guard;
      Scratch<acc_t> sc(d, dp);
      Buffer<acc_t> dK(kKB * dp), dV(kKB * dp), dS(kQB * kKB), dP(kQB * kKB), lse_rows(kQB), D_rows(kQB);
      Buffer<acc_t> dQ_group(pr.rep * pr.Tq * dp);
      for (int64_t it = begin; it < end; ++it) {
        const int64_t hkv = it % pr.Hkv, b = it / pr.Hkv;
        std::fill(dQ_group.begin(), dQ_group.end(), acc_t(0));
        for (int64_t kb = 0; kb < nkb; ++kb) {
          const int64_t j0 = kb * kKB, nk = std::min(kKB, pr.Tk - j0);
          kv_grad_block(pr, bb, b, hkv, j0, nk, dK.data(), dV.data(), sc, dS, lse_rows, D_rows, dQ_group.data());
          write_kv(b, hkv, j0, nk, dK.data(), dV.data());
        }
        for (int64_t h = hkv * pr.rep; h < (hkv + 1) * pr.rep; ++h) {
          for (int64_t i0 = 0; i0 < pr.Tq; i0 += kQB) {
            const int64_t nrows = std::min(kQB, pr.Tq - i0);
            finish_dq(sc, b, h, i0, nrows, dQ_group.data() + ((h - hkv * pr.rep) * pr.Tq + i0) * dp);
          }
        }
      }
    });
  } else {
    // pass 1: dk, dv per (b, kv head, key block)
    at::parallel_for(0, groups * nkb, grain_for(pr.rep * pr.Tq * kKB * d), [&](int64_t begin, int64_t end) {
      SequentialBlasGuard blas_guard;
      Scratch<acc_t> sc(d, dp);
      Buffer<acc_t> dK(kKB * dp), dV(kKB * dp), dS(kQB * kKB), lse_rows(kQB), D_rows(kQB);
      for (int64_t it = begin; it < end; ++it) {
        const int64_t j0 = (it % nkb) * kKB, hkv = (it / nkb) % pr.Hkv, b = it / (nkb * pr.Hkv);
        const int64_t nk = std::min(kKB, pr.Tk - j0);
        kv_grad_block(pr, bb, b, hkv, j0, nk, dK.data(), dV.data(), sc, dS, lse_rows, D_rows);
        write_kv(b, hkv, j0, nk, dK.data(), dV.data());
      }
    });
    // pass 2: dq per (b, h, query block), recomputing the scores
    at::parallel_for(0, q_items, grain_for(std::min(kQB, pr.Tq) * pr.Tk * d), [&](int64_t begin, int64_t end) {
      SequentialBlasGuard blas_guard;
      Scratch<acc_t> sc(d, dp);
      Buffer<acc_t> dS(kQB * kKB), dP(kQB * kKB), lse_rows(kQB), D_rows(kQB);
      for (int64_t it = begin; it < end; ++it) {
        const int64_t i0 = (it % nqb) * kQB, h = (it / nqb) % pr.H, b = it / (nqb * pr.H);
        const int64_t nrows = std::min(kQB, pr.Tq - i0), hkv = h / pr.rep;
        if (!blas_reads_rows_in_place<scalar_t, acc_t>(d, dp)) {
          load_rows(sc.Qs.data(), dp, pr.q_row(pr.q, b, i0, h), pr.q_stride(), nrows, d, kQB, pr.qk_scale);
          load_rows(sc.dO.data(), dp, pr.q_row(bb.dout, b, i0, h), pr.q_stride(), nrows, d, kQB, acc_t(1));
        }
        for (int64_t r = 0; r < nrows; ++r) {
          lse_rows[r] = bb.lse[pr.stat(b, h, i0 + r)];
          D_rows[r] = bb.Dw[pr.stat(b, h, i0 + r)];
        }
        std::fill(sc.acc.begin(), sc.acc.end(), acc_t(0));
        const KeyMask mk = pr.word_mask(b);
        auto [kbeg, kend] = block_key_range(mk, i0, nrows);
        // key blocks aligned as in the single-pass mode, so both modes give bit-identical dq
        kbeg = kbeg / kKB * kKB;
        q_grad_keys(pr, pr.word(pr.k, b, hkv), pr.word(pr.v, b, hkv), mk, kbeg, kend, i0, nrows,
                    pr.q_row(pr.q, b, i0, h), pr.q_row(bb.dout, b, i0, h), lse_rows.data(), D_rows.data(), acc_t(1),
                    sc.acc.data(), sc, dS, dP);
        finish_dq(sc, b, h, i0, nrows, sc.acc.data());
      }
    });
  }

  // pass 3: dpk, dpv per (prompt batch, kv head, prompt block)
  if (pr.has_prompt) {
    const int64_t npb = (pr.K + kKB - 1) / kKB;
    at::parallel_for(0, pr.Bp * pr.Hkv * npb, grain_for(pr.B * pr.rep * pr.Tq * kKB * d),
                     [&](int64_t begin, int64_t end) {
                       SequentialBlasGuard blas_guard;
                       Scratch<acc_t> sc(d, dp);
                       Buffer<acc_t> dK(kKB * dp), dV(kKB * dp);
                       for (int64_t it = begin; it < end; ++it) {
                         const int64_t j0 = (it % npb) * kKB, hkv = (it / npb) % pr.Hkv, bp = it / (npb * pr.Hkv);
                         const int64_t nk = std::min(kKB, pr.K - j0);
                         const int64_t b0 = pr.Bp == 1 ? 0 : bp, b1 = pr.Bp == 1 ? pr.B : bp + 1;
                         // dV = sum_{b, h, i} phi P'^T dout, dK = sum scale dS'^T q from pass 0's P' and dS', in (b, h,
                         // i) order
                         std::fill(dK.begin(), dK.end(), acc_t(0));
                         std::fill(dV.begin(), dV.end(), acc_t(0));
                         for (int64_t b = b0; b < b1; ++b) {
                           for (int64_t h = hkv * pr.rep; h < (hkv + 1) * pr.rep; ++h) {
                             for (int64_t i0 = 0; i0 < pr.Tq; i0 += kQB) {
                               const int64_t nrows = std::min(kQB, pr.Tq - i0);
                               // rows [j0, j0 + nk) of the (b, h) block (keys x queries), columns i0 on
                               const acc_t* Pr = Pst.get() + pr.stat(b, h, 0) * pr.K + j0 * pr.Tq + i0;
                               const acc_t* dSr = dSst.get() + pr.stat(b, h, 0) * pr.K + j0 * pr.Tq + i0;
                               const scalar_t* q_rows = pr.q_row(pr.q, b, i0, h);
                               const scalar_t* do_rows = pr.q_row(bb.dout, b, i0, h);
                               if (blas_reads_rows_in_place<scalar_t, acc_t>(d, dp)) {
                                 gemm_in_place(nk, d, nrows, acc_t(1), Pr, pr.Tq, false, do_rows, pr.q_stride(), false,
                                               acc_t(1), dV.data(), dp);
                                 gemm_in_place(nk, d, nrows, pr.qk_scale, dSr, pr.Tq, false, q_rows, pr.q_stride(),
                                               false, acc_t(1), dK.data(), dp);
                               } else {
                                 load_rows(sc.Qs.data(), dp, q_rows, pr.q_stride(), nrows, d, kQB, pr.qk_scale);
                                 load_rows(sc.dO.data(), dp, do_rows, pr.q_stride(), nrows, d, kQB, acc_t(1));
                                 accum_rows(dV.data(), dp, Pr, pr.Tq, 1, sc.dO.data(), dp, nk, nrows, dp);
                                 accum_rows(dK.data(), dp, dSr, pr.Tq, 1, sc.Qs.data(), dp, nk, nrows, dp);
                               }
                             }
                           }
                         }
                         for (int64_t r = 0; r < nk; ++r) {
                           scalar_t* ko = dpk + ((bp * pr.K + j0 + r) * pr.Hkv + hkv) * d;
                           scalar_t* vo = dpv + ((bp * pr.K + j0 + r) * pr.Hkv + hkv) * d;
                           for (int64_t c = 0; c < d; ++c) {
                             ko[c] = static_cast<scalar_t>(dK[r * dp + c]);
                             vo[c] = static_cast<scalar_t>(dV[r * dp + c]);
                           }
                         }
                       }
                     });
  }
}

// ------------------------------------------------------------------------------------------------- op entry points
constexpr const char* kOp = "lladapter::gated_prompt_attention";
constexpr const char* kBwdOp = "lladapter::gated_prompt_attention_backward";

template <typename scalar_t, typename acc_t>
Problem<scalar_t, acc_t> make_problem(const GatedPromptAttentionProblem& s, const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v, const at::Tensor& pk, const at::Tensor& pv,
                                      const at::Tensor& kv_start, const std::vector<acc_t>& phi) {
  Problem<scalar_t, acc_t> pr{};
  static_cast<GatedPromptAttentionProblem&>(pr) = s;
  constexpr int64_t W = AVec<acc_t>::size();
  pr.dp = (s.d + W - 1) / W * W;
  pr.qk_scale = static_cast<acc_t>(s.scale);
  pr.q = q.const_data_ptr<scalar_t>();
  pr.k = k.const_data_ptr<scalar_t>();
  pr.kv_bstride = k.stride(0);
  pr.v = v.const_data_ptr<scalar_t>();
  pr.pk = s.has_prompt ? pk.const_data_ptr<scalar_t>() : nullptr;
  pr.pv = s.has_prompt ? pv.const_data_ptr<scalar_t>() : nullptr;
  pr.kv_start = kv_start.defined() ? kv_start.const_data_ptr<int64_t>() : nullptr;
  pr.phi = s.has_prompt ? phi.data() : nullptr;
  return pr;
}

struct Prepared {
  GatedPromptAttentionProblem s;
  at::Tensor q, k, v, pk, pv, kv_start;
  std::vector<double> phi, dphi;  // phi(g_h), phi'(g_h)
};

// The gate's H values as double, read in place from a 1-D float, double, bf16 or half tensor (checked by the caller).
std::vector<double> gate_values(const at::Tensor& gate) {
  std::vector<double> out(gate.size(0));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate.scalar_type(), "gate_values", [&] {
    const scalar_t* g = gate.const_data_ptr<scalar_t>();
    for (size_t h = 0; h < out.size(); ++h) out[h] = static_cast<double>(g[h * gate.stride(0)]);
  });
  return out;
}

Prepared prepare(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const std::optional<at::Tensor>& pk, const std::optional<at::Tensor>& pv,
                 const std::optional<at::Tensor>& gate, const std::optional<at::Tensor>& kv_start,
                 const std::string& gate_act, bool causal, double scale) {
  Prepared p;
  p.s = gated_prompt_attention_check_inputs(op, q, k, v, pk, pv, gate, kv_start, gate_act, causal, scale, kCpuKernels);
  p.q = q.contiguous();
  // k and v as given when only their batch stride is not the dense one: a decode step's view of the first Tk rows
  // of a KV cache ([B, max_len, Hkv, d]) is read in place, not copied every step
  if (gated_prompt_attention_kv_rows_dense(k, v, p.s)) {
    p.k = k;
    p.v = v;
  } else {
    p.k = k.contiguous();
    p.v = v.contiguous();
  }
  if (p.s.has_prompt) {
    p.pk = pk->contiguous();
    p.pv = pv->contiguous();
  }
  // clamped once here, so the kernels read bounds in [0, Tk] (a start past Tk masks every key, below 0 none)
  if (kv_start.has_value()) p.kv_start = kv_start->to(at::kLong).clamp(0, p.s.Tk).contiguous();
  if (gate.has_value()) {
    // read in place (H values, any stride): a converted copy costs an allocation and a kernel call per call, a
    // tenth of a decode step's attention call
    const auto gv = gate_values(*gate);
    for (int64_t h = 0; h < p.s.H; ++h) {
      const double t = p.s.tanh_gate ? std::tanh(gv[h]) : gv[h];
      p.phi.push_back(t);
      p.dphi.push_back(p.s.tanh_gate ? 1.0 - t * t : 1.0);
    }
  }
  return p;
}

template <typename F>
void dispatch_attn(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kDouble:
      return f.template operator()<double, double>();
    case at::kFloat:
      return f.template operator()<float, float>();
    case at::kBFloat16:
      return f.template operator()<at::BFloat16, float>();
    case at::kHalf:
      return f.template operator()<at::Half, float>();
    default:
      TORCH_CHECK(false, kOp, ": unsupported dtype ", t);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_prompt_attention_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const std::optional<at::Tensor>& pk_in,
    const std::optional<at::Tensor>& pv_in, const std::optional<at::Tensor>& gate,
    const std::optional<at::Tensor>& kv_start_in, bool causal, std::string gate_act, double scale) {
  Prepared p = prepare(kOp, q_in, k_in, v_in, pk_in, pv_in, gate, kv_start_in, gate_act, causal, scale);
  const auto& s = p.s;
  at::Tensor out = at::empty(p.q.sizes(), p.q.options());
  const auto stat = gated_prompt_attention_stat_dtype(p.q);
  at::Tensor lse = at::empty({s.B, s.H, s.Tq}, p.q.options().dtype(stat));
  at::Tensor plse = at::empty({s.B, s.H, s.Tq}, p.q.options().dtype(stat));
  if (out.numel() == 0) return {out, lse, plse};
  dispatch_attn(p.q.scalar_type(), [&]<typename scalar_t, typename acc_t>() {
    const std::vector<acc_t> phi(p.phi.begin(), p.phi.end());
    auto pr = make_problem<scalar_t, acc_t>(s, p.q, p.k, p.v, p.pk, p.pv, p.kv_start, phi);
    forward_impl(pr, out.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<acc_t>(), plse.mutable_data_ptr<acc_t>());
  });
  return {out, lse, plse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_prompt_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const std::optional<at::Tensor>& pk_in, const std::optional<at::Tensor>& pv_in,
    const std::optional<at::Tensor>& gate, const std::optional<at::Tensor>& kv_start_in, const at::Tensor& out_in,
    const at::Tensor& lse_in, const at::Tensor& plse_in, bool causal, std::string gate_act, double scale) {
  Prepared p = prepare(kBwdOp, q_in, k_in, v_in, pk_in, pv_in, gate, kv_start_in, gate_act, causal, scale);
  const auto& s = p.s;
  gated_prompt_attention_check_backward_inputs(kBwdOp, s, grad_out, q_in, out_in, lse_in, plse_in, kCpuKernels);
  const at::Tensor dout = grad_out.contiguous();
  const at::Tensor out = out_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  const at::Tensor plse = plse_in.contiguous();
  at::Tensor dq, dk, dv, dpk, dpv, dgate;  // lambdas below capture these, so no structured binding
  if (p.q.numel() == 0) return gated_prompt_attention_zero_grads(p.q, p.k, p.v, pk_in, gate, s.H);
  // the kernels write every element of dq, dk, dv, dpk, dpv (every query row, every key and prompt block), so
  // they need no zero fill (the shapes and dtypes of gated_prompt_attention_zero_grads)
  dq = at::empty(p.q.sizes(), p.q.options());
  dk = at::empty(p.k.sizes(), p.k.options());
  dv = at::empty(p.v.sizes(), p.v.options());
  dpk = pk_in.has_value() ? at::empty(pk_in->sizes(), p.q.options()) : p.q.new_empty({0});
  dpv = pk_in.has_value() ? at::empty(pk_in->sizes(), p.q.options()) : p.q.new_empty({0});
  dgate = gate.has_value() ? gate->new_zeros({s.H}) : p.q.new_empty({0}, at::kFloat);
  const auto stat = gated_prompt_attention_stat_dtype(p.q);
  at::Tensor Dw = at::empty({s.B, s.H, s.Tq}, p.q.options().dtype(stat));
  at::Tensor Dp = at::empty({s.B, s.H, s.Tq}, p.q.options().dtype(stat));
  dispatch_attn(p.q.scalar_type(), [&]<typename scalar_t, typename acc_t>() {
    const std::vector<acc_t> phi(p.phi.begin(), p.phi.end());
    auto pr = make_problem<scalar_t, acc_t>(s, p.q, p.k, p.v, p.pk, p.pv, p.kv_start, phi);
    BwdBuffers<scalar_t, acc_t> bb{dout.const_data_ptr<scalar_t>(), out.const_data_ptr<scalar_t>(),
                                   lse.const_data_ptr<acc_t>(),     plse.const_data_ptr<acc_t>(),
                                   Dw.mutable_data_ptr<acc_t>(),    Dp.mutable_data_ptr<acc_t>()};
    backward_impl(pr, bb, dq.mutable_data_ptr<scalar_t>(), dk.mutable_data_ptr<scalar_t>(),
                  dv.mutable_data_ptr<scalar_t>(), s.has_prompt ? dpk.mutable_data_ptr<scalar_t>() : nullptr,
                  s.has_prompt ? dpv.mutable_data_ptr<scalar_t>() : nullptr);
    if (s.has_prompt) {
      // dgate_h = phi'(g_h) * sum_{b, i} dout_i . prompt_out_i, summed in (b, i) order
      at::Tensor dg = at::empty({s.H}, at::TensorOptions().dtype(at::kDouble));
      double* dgp = dg.mutable_data_ptr<double>();
      const acc_t* dpp = Dp.const_data_ptr<acc_t>();
      for (int64_t h = 0; h < s.H; ++h) {
        acc_t tot = 0;
        for (int64_t b = 0; b < s.B; ++b) {
          acc_t part = 0;
          for (int64_t i = 0; i < s.Tq; ++i) part += dpp[(b * s.H + h) * s.Tq + i];
          tot += part;
        }
        dgp[h] = p.dphi[h] * static_cast<double>(tot);
      }
      dgate.copy_(dg);
    }
  });
  return {dq, dk, dv, dpk, dpv, dgate};
}

}  // namespace

void start_recording_attention_products() {
  std::lock_guard<std::mutex> lock(g_recorded_mutex);
  g_recorded.clear();
  g_recording.store(true);
}

at::Tensor stop_recording_attention_products() {
  g_recording.store(false);
  std::lock_guard<std::mutex> lock(g_recorded_mutex);
  auto out = at::empty({static_cast<int64_t>(g_recorded.size()), kProductFields}, at::kLong);
  int64_t* o = out.data_ptr<int64_t>();
  for (const auto& row : g_recorded) o = std::copy(row.begin(), row.end(), o);
  g_recorded.clear();
  return out;
}

void replay_attention_products(const at::Tensor& products) {
  const char* op = "replay_attention_products";
  TORCH_CHECK(products.device().is_cpu() && products.scalar_type() == at::kLong && products.dim() == 2 &&
                  products.size(1) == kProductFields,
              op, ": products must be a CPU int64 tensor [N, ", kProductFields,
              "] (stop_recording_attention_products' rows), got ", shape_str(products), " ", products.scalar_type(),
              " on ", products.device());
  TORCH_CHECK(sgemm_ != nullptr, op, ": this torch build exports no BLAS sgemm (the kernels use their own products)");
  const auto rows = products.contiguous();
  const int64_t* r = rows.data_ptr<int64_t>();
  const int64_t n_products = rows.size(0);
  // One buffer per operand, per worker, as large as the largest product's strided extent needs.
  int64_t a_len = 1, b_len = 1, c_len = 1;
  for (int64_t i = 0; i < n_products; ++i) {
    const int64_t* p = r + i * kProductFields;
    const int64_t m = p[0], n = p[1], k = p[2], lda = p[3], ldb = p[4], ldc = p[5];
    const bool at = p[6] != 0, bt = p[7] != 0;
    const int64_t a_rows = at ? k : m, a_cols = at ? m : k, b_rows = bt ? n : k, b_cols = bt ? k : n;
    TORCH_CHECK(m > 0 && n > 0 && k > 0 && m <= INT32_MAX && n <= INT32_MAX && k <= INT32_MAX && lda >= a_cols &&
                    ldb >= b_cols && ldc >= n && lda <= INT32_MAX && ldb <= INT32_MAX && ldc <= INT32_MAX,
                op, ": products row ", i, " is not a valid product (m, n, k = ", m, ", ", n, ", ", k,
                "; lda, ldb, ldc = ", lda, ", ", ldb, ", ", ldc, ")");
    a_len = std::max(a_len, (a_rows - 1) * lda + a_cols);
    b_len = std::max(b_len, (b_rows - 1) * ldb + b_cols);
    c_len = std::max(c_len, (m - 1) * ldc + n);
  }
  // Products dealt round-robin to the workers (balanced whatever their order), each worker's BLAS sequential as
  // inside the kernels.
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_products));
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    SequentialBlasGuard sequential;
    std::vector<float> A(a_len, 1e-3f), B(b_len, 1e-3f), C(c_len, 0.f);
    for (int64_t w = w0; w < w1; ++w) {
      for (int64_t i = w; i < n_products; i += workers) {
        const int64_t* p = r + i * kProductFields;
        sgemm_rowmajor(p[0], p[1], p[2], 1.f, A.data(), p[3], p[6] != 0, B.data(), p[4], p[7] != 0,
                       p[8] != 0 ? 1.f : 0.f, C.data(), p[5]);
      }
    }
  });
}

TORCH_LIBRARY_IMPL(lladapter, CPU, m) {
  m.impl("gated_prompt_attention", &gated_prompt_attention_cpu);
  m.impl("gated_prompt_attention_backward", &gated_prompt_attention_backward_cpu);
}

}  // namespace lladapter::cpu
