// few_rows_gemv (csrc/decode_layers.h): y = x @ w^T for the 1-16 rows of a CPU decode step, fp32 or bf16 (fp32 sums,
// the result rounded once), split over the threads by blocks of 4 weight rows. A decode step is weight streaming:
// each weight is read once and used for a few multiply-adds, so the kernel's only job is to keep every core reading.
// MKL's one-row GEMV runs on one thread on some CPUs, and W @ x^T (nn.few_rows_linear's "transposed" route) pays a
// GEMM's packing and synchronisation on each of the step's ~200 small matrices; this loop does neither
// (docs/benchmarks.md has the figures).
//
// Each output is summed by one thread, in a fixed order (vector lanes over k, then the lanes, then the tail), so the
// result does not depend on the thread count. Three paths (LLADAPTER_FEW_ROWS_GEMV_ISA = auto | avx512 | avx2 |
// scalar): AVX-512 and AVX2+FMA are compiled into every x86-64 build (target attributes) and run only where the CPU
// has them; the paths differ from each other and from F.linear by fp32 rounding only.
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <optional>
#include <string_view>
#include <vector>

#include "../decode_layers.h"
#include "cpu_isa.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define LL_GEMV_X86 1
#define LL_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))
#define LL_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define LL_GEMV_X86 0
#endif

namespace lladapter {
namespace {

constexpr const char* kIsaEnv = "LLADAPTER_FEW_ROWS_GEMV_ISA";
constexpr int64_t kBlock = 4;                    // weight rows per inner block: 4 independent accumulators
constexpr int64_t kMinWeightsPerTask = 1 << 15;  // 128 KB of fp32 weights: below this a task's fork costs more
// Software prefetch in the AVX-512 path, kPrefetchBlocks blocks ahead, spread over a block's k loop (one block's
// bytes per block): a block reads its kBlock rows as interleaved streams of K weights each (2.3 KB for K = 576), too
// short for the hardware prefetcher to ramp up on. Measured on an AMD EPYC with AVX-512, 2 threads, one SmolLM2
// decode step's GEMVs, paired in one process: fp32 1.03-1.15x, bf16 1.25-1.45x faster than without (one run with 1
// block ahead: 1.07x / 1.29x, 3: 1.13x / 1.37x, against 2: 1.12x / 1.41x). The AVX2 path reads one row at a time
// and needs none (see gemv_rows_avx2). LLADAPTER_FEW_ROWS_GEMV_PREFETCH=0 turns it off (read at every call, for A/B
// measurements in one process).
constexpr int64_t kPrefetchBlocks = 2;
constexpr const char* kPrefetchEnv = "LLADAPTER_FEW_ROWS_GEMV_PREFETCH";

// Where the block at row n prefetches: the start of the block kPrefetchBlocks ahead, whose bytes its k loop then
// prefetches in step with its own reads; nullptr when prefetch is off or that block is not wholly in the matrix.
template <typename w_t>
inline const char* prefetch_ahead(bool prefetch, const w_t* w, int64_t K, int64_t N, int64_t n) {
  return prefetch && n + (kPrefetchBlocks + 1) * kBlock <= N
             ? reinterpret_cast<const char*>(w + (n + kPrefetchBlocks * kBlock) * K)
             : nullptr;
}

// Rows [n0, n1) of y [R, N] (fp32) for x [R, K] (fp32: a bf16 x is widened once per call), w [N, K] (w_t: float or
// bf16, widened as it streams; a bf16 -> fp32 widening is exact), all contiguous.
template <typename w_t>
void gemv_rows_scalar(const float* x, int64_t R, const w_t* w, int64_t K, int64_t N, int64_t n0, int64_t n1, float* y) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t r = 0; r < R; ++r) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += static_cast<float>(w[n * K + k]) * x[r * K + k];
      y[r * N + n] = s;
    }
}

#if LL_GEMV_X86
// GCC 12's _mm512_reduce_add_ps (avx512fintrin.h) trips -Wmaybe-uninitialized on its own _mm256_undefined_pd.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
// 16 weights as fp32: a plain load, or 16 bf16 widened (the bf16 bits are the fp32's top half).
LL_TARGET_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
LL_TARGET_AVX512 inline __m512 load16(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
LL_TARGET_AVX512 inline __m512 load16(__mmask16 m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
LL_TARGET_AVX512 inline __m512 load16(__mmask16 m, const c10::BFloat16* p) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <typename w_t>
LL_TARGET_AVX512 void gemv_rows_avx512(const float* x, int64_t R, const w_t* w, int64_t K, int64_t N, int64_t n0,
                                       int64_t n1, float* y, bool prefetch) {
  const int64_t k_full = K / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (K - k_full)) - 1u);
  int64_t n = n0;
  for (; n + kBlock <= n1; n += kBlock) {
    const w_t* w0 = w + n * K;
    const char* ahead = prefetch_ahead(prefetch, w, K, N, n);
    constexpr int64_t kBytesPerIt = 16 * kBlock * sizeof(w_t);
    for (int64_t r = 0; r < R; ++r) {
      const float* xr = x + r * K;
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t k = 0; k < k_full; k += 16) {
        if (r == 0 && ahead != nullptr)
          for (int64_t b = 0; b < kBytesPerIt; b += 64) _mm_prefetch(ahead + k / 16 * kBytesPerIt + b, _MM_HINT_T0);
        const __m512 xv = _mm512_loadu_ps(xr + k);
        a0 = _mm512_fmadd_ps(load16(w0 + k), xv, a0);
        a1 = _mm512_fmadd_ps(load16(w0 + K + k), xv, a1);
        a2 = _mm512_fmadd_ps(load16(w0 + 2 * K + k), xv, a2);
        a3 = _mm512_fmadd_ps(load16(w0 + 3 * K + k), xv, a3);
      }
      if (tail) {
        const __m512 xv = _mm512_maskz_loadu_ps(tail, xr + k_full);
        a0 = _mm512_fmadd_ps(load16(tail, w0 + k_full), xv, a0);
        a1 = _mm512_fmadd_ps(load16(tail, w0 + K + k_full), xv, a1);
        a2 = _mm512_fmadd_ps(load16(tail, w0 + 2 * K + k_full), xv, a2);
        a3 = _mm512_fmadd_ps(load16(tail, w0 + 3 * K + k_full), xv, a3);
      }
      float* yr = y + r * N + n;
      yr[0] = _mm512_reduce_add_ps(a0), yr[1] = _mm512_reduce_add_ps(a1);
      yr[2] = _mm512_reduce_add_ps(a2), yr[3] = _mm512_reduce_add_ps(a3);
    }
  }
  for (; n < n1; ++n)  // the last rows of the matrix (N not a multiple of 4)
    for (int64_t r = 0; r < R; ++r) {
      const float* xr = x + r * K;
      __m512 a = _mm512_setzero_ps();
      for (int64_t k = 0; k < k_full; k += 16) a = _mm512_fmadd_ps(load16(w + n * K + k), _mm512_loadu_ps(xr + k), a);
      if (tail) a = _mm512_fmadd_ps(load16(tail, w + n * K + k_full), _mm512_maskz_loadu_ps(tail, xr + k_full), a);
      y[r * N + n] = _mm512_reduce_add_ps(a);
    }
}

LL_TARGET_AVX2 inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

LL_TARGET_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
LL_TARGET_AVX2 inline __m256 load8(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// One weight row at a time, read front to back: a single sequential stream per thread, which the hardware prefetcher
// follows without help (the 4-row interleaved blocks of the AVX-512 path, with or without software prefetch, streamed
// 10-15% slower here: AMD EPYC without AVX-512, 2 threads, one SmolLM2 decode step's GEMVs, fp32 and bf16; the
// figures are in docs/benchmarks.md). 4 accumulators over k; the other rows of x read the weight row from L1.
template <typename w_t>
LL_TARGET_AVX2 void gemv_rows_avx2(const float* x, int64_t R, const w_t* w, int64_t K, int64_t N, int64_t n0,
                                   int64_t n1, float* y) {
  const int64_t k32 = K / 32 * 32, k8 = K / 8 * 8;
  for (int64_t n = n0; n < n1; ++n) {
    const w_t* wn = w + n * K;
    for (int64_t r = 0; r < R; ++r) {
      const float* xr = x + r * K;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      int64_t k = 0;
      for (; k < k32; k += 32) {
        a0 = _mm256_fmadd_ps(load8(wn + k), _mm256_loadu_ps(xr + k), a0);
        a1 = _mm256_fmadd_ps(load8(wn + k + 8), _mm256_loadu_ps(xr + k + 8), a1);
        a2 = _mm256_fmadd_ps(load8(wn + k + 16), _mm256_loadu_ps(xr + k + 16), a2);
        a3 = _mm256_fmadd_ps(load8(wn + k + 24), _mm256_loadu_ps(xr + k + 24), a3);
      }
      for (; k < k8; k += 8) a0 = _mm256_fmadd_ps(load8(wn + k), _mm256_loadu_ps(xr + k), a0);
      float s = hsum256(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
      for (; k < K; ++k) s += static_cast<float>(wn[k]) * xr[k];
      y[r * N + n] = s;
    }
  }
}
#pragma GCC diagnostic pop
#endif  // LL_GEMV_X86

enum class Isa { kScalar, kAvx2, kAvx512 };

bool cpu_has_avx2_fma() {
#if LL_GEMV_X86
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

// The path LLADAPTER_FEW_ROWS_GEMV_ISA asks for (read at every call: tests switch it), else the best this CPU has.
Isa gemv_isa() {
  const std::string_view want = cpu::cpu_isa_from_env(kIsaEnv, {"auto", "avx512", "avx2", "scalar"});
  const bool avx512 = LL_GEMV_X86 && cpu::cpu_has_avx512(), avx2 = LL_GEMV_X86 && cpu_has_avx2_fma();
  if (want == "auto") return avx512 ? Isa::kAvx512 : avx2 ? Isa::kAvx2 : Isa::kScalar;
  if (want == "scalar") return Isa::kScalar;
  if (want == "avx2") {
    if (!avx2) cpu::cpu_isa_unavailable(kIsaEnv, want, "this CPU (or a non-x86-64 build) lacks AVX2 and FMA");
    return Isa::kAvx2;
  }
  if (!avx512)
    cpu::cpu_isa_unavailable(kIsaEnv, want, "this CPU (or a non-x86-64 build) lacks AVX-512 (F, BW, VL, DQ)");
  return Isa::kAvx512;
}

}  // namespace

namespace {

constexpr const char* kOp = "lladapter few_rows_gemv";

void check_x(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), kOp, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, kOp,
              ": x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= kFewRowsGemvMaxRows, kOp,
              ": x must be [rows, K] with 1 to ", kFewRowsGemvMaxRows, " rows, got ", x.sizes());
}

void check_weight(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(weight.device().is_cpu(), kOp, ": weight must be a CPU tensor, got ", weight.device());
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), kOp,
              ": x and weight must both be float32 or both bfloat16, got ", x.scalar_type(), " and ",
              weight.scalar_type());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1), kOp, ": weight must be [N, K] with K = x's ", x.size(1),
              ", got ", weight.sizes());
  TORCH_CHECK(weight.is_contiguous(), kOp, ": weight must be contiguous (a decode step streams it row by row)");
  TORCH_CHECK(
      !(at::GradMode::is_enabled() && (x.requires_grad() || weight.requires_grad())), kOp,
      ": has no backward of its own; call it with grad off (nn.few_rows_linear wraps it in an autograd function "
      "where a gradient is needed)");
}

// y_i = x @ weights[i]^T (fp32 [R, N_i]) for every i in one parallel region: the weights' 4-row blocks are numbered
// one after another and split over the threads as one range (one fork and join instead of one per weight, and the
// small k/v projections share the threads with q). Each output row is computed exactly as alone. after(i, n0, n1)
// runs in the task that computed rows [n0, n1) of y_i, once they are done.
template <typename After>
void gemv_weights(const at::Tensor& xc, const std::vector<const at::Tensor*>& weights, const std::vector<float*>& ys,
                  After&& after) {
  const int64_t R = xc.size(0), K = xc.size(1);
  std::vector<int64_t> first_block{0};  // first_block[i]: weight i's first block in the joint numbering
  for (const at::Tensor* w : weights) first_block.push_back(first_block.back() + (w->size(0) + kBlock - 1) / kBlock);
  const int64_t blocks = first_block.back();
  if (blocks == 0) return;
  const float* xp = xc.const_data_ptr<float>();
  const Isa isa = gemv_isa();
  const char* prefetch_env = std::getenv(kPrefetchEnv);
  const bool prefetch = prefetch_env == nullptr || std::string_view(prefetch_env) != "0";
  const int64_t grain = std::max<int64_t>(1, kMinWeightsPerTask / std::max<int64_t>(1, K * kBlock));
  const bool bf16 = weights[0]->scalar_type() == at::kBFloat16;
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    for (size_t i = 0; i < weights.size(); ++i) {
      const int64_t lo = std::max(b0, first_block[i]), hi = std::min(b1, first_block[i + 1]);
      if (lo >= hi) continue;
      const int64_t N = weights[i]->size(0), n0 = (lo - first_block[i]) * kBlock;
      const int64_t n1 = std::min(N, (hi - first_block[i]) * kBlock);
      auto rows = [&](const auto* wp) {
        switch (isa) {
#if LL_GEMV_X86
          case Isa::kAvx512:
            return gemv_rows_avx512(xp, R, wp, K, N, n0, n1, ys[i], prefetch);
          case Isa::kAvx2:
            return gemv_rows_avx2(xp, R, wp, K, N, n0, n1, ys[i]);
#endif
          default:
            return gemv_rows_scalar(xp, R, wp, K, N, n0, n1, ys[i]);
        }
      };
      if (bf16)
        rows(weights[i]->const_data_ptr<c10::BFloat16>());
      else
        rows(weights[i]->const_data_ptr<float>());
      after(i, n0, n1);
    }
  });
}

}  // namespace

at::Tensor few_rows_gemv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& residual) {
  check_x(x);
  check_weight(x, weight);
  const int64_t R = x.size(0), N = weight.size(0);
  if (residual.has_value()) {
    TORCH_CHECK(residual->device().is_cpu() && residual->scalar_type() == x.scalar_type() && residual->dim() == 2 &&
                    residual->size(0) == R && residual->size(1) == N && residual->is_contiguous(),
                kOp, ": residual must be a contiguous CPU tensor [", R, ", ", N, "] of x's dtype ", x.scalar_type(),
                ", got ", residual->scalar_type(), " ", residual->sizes());
    TORCH_CHECK(!(at::GradMode::is_enabled() && residual->requires_grad()), kOp,
                ": residual requires grad, and the fused add has no backward; call it with grad off");
  }
  const at::Tensor xc = x.to(at::kFloat).contiguous();  // (fp32 x: no copy; bf16 x: widened once, exactly)
  at::Tensor y = at::empty({R, N}, xc.options());       // fp32 sums; a bf16 result is rounded once at the end
  // with a residual, the result in x's dtype: residual + (x @ w^T rounded to that dtype), rounded once more, as
  // at::add of the two would compute it (bit for bit), written by each task for its own rows while they are in cache
  at::Tensor out = residual.has_value() && x.scalar_type() != at::kFloat ? at::empty({R, N}, x.options()) : y;
  float* yp = y.mutable_data_ptr<float>();
  gemv_weights(xc, {&weight}, {yp}, [&](size_t, int64_t n0, int64_t n1) {
    if (!residual.has_value()) return;
    if (x.scalar_type() == at::kFloat) {
      const float* rp = residual->const_data_ptr<float>();
      for (int64_t r = 0; r < R; ++r)
        for (int64_t n = n0; n < n1; ++n) yp[r * N + n] = rp[r * N + n] + yp[r * N + n];
    } else {
      const c10::BFloat16* rp = residual->const_data_ptr<c10::BFloat16>();
      c10::BFloat16* op = out.mutable_data_ptr<c10::BFloat16>();
      for (int64_t r = 0; r < R; ++r)
        for (int64_t n = n0; n < n1; ++n)
          op[r * N + n] =
              c10::BFloat16(static_cast<float>(rp[r * N + n]) + static_cast<float>(c10::BFloat16(yp[r * N + n])));
    }
  });
  if (residual.has_value()) return out;
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

std::vector<at::Tensor> few_rows_gemv_group(const at::Tensor& x, const std::vector<at::Tensor>& weights) {
  check_x(x);
  TORCH_CHECK(!weights.empty(), kOp, ": weights must not be empty");
  std::vector<const at::Tensor*> ws;
  std::vector<at::Tensor> ys;
  std::vector<float*> yps;
  const at::Tensor xc = x.to(at::kFloat).contiguous();
  for (const at::Tensor& w : weights) {
    check_weight(x, w);
    ws.push_back(&w);
    ys.push_back(at::empty({x.size(0), w.size(0)}, xc.options()));
    yps.push_back(ys.back().mutable_data_ptr<float>());
  }
  gemv_weights(xc, ws, yps, [](size_t, int64_t, int64_t) {});
  if (x.scalar_type() != at::kFloat)
    for (at::Tensor& y : ys) y = y.to(x.scalar_type());
  return ys;
}

}  // namespace lladapter
