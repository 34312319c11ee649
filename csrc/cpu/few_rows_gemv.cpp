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
#include <string_view>

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
// Software prefetch, kPrefetchBlocks blocks ahead, spread over a block's k loop (one block's bytes per block): a
// block reads its kBlock rows as interleaved streams of K weights each (2.3 KB for K = 576), too short for the
// hardware prefetcher to ramp up on. Measured on an AMD EPYC, 2 threads, one SmolLM2 decode step's GEMVs, paired
// in one process: AVX-512 fp32 1.03-1.15x, bf16 1.25-1.45x; AVX2 fp32 1.19x, bf16 1.82x faster than without (one
// run with 1 block ahead: 1.07x / 1.29x, 3: 1.13x / 1.37x, against 2: 1.12x / 1.41x).
// LLADAPTER_FEW_ROWS_GEMV_PREFETCH=0 turns it off (read at every call, for A/B measurements in one process).
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

template <typename w_t>
LL_TARGET_AVX2 void gemv_rows_avx2(const float* x, int64_t R, const w_t* w, int64_t K, int64_t N, int64_t n0,
                                   int64_t n1, float* y, bool prefetch) {
  const int64_t k_full = K / 8 * 8;
  for (int64_t n = n0; n < n1; n += kBlock) {
    const int64_t nb = std::min(kBlock, n1 - n);
    const char* ahead = prefetch_ahead(prefetch, w, K, N, n);
    constexpr int64_t kBytesPerIt = 8 * kBlock * sizeof(w_t);
    for (int64_t r = 0; r < R; ++r) {
      const float* xr = x + r * K;
      __m256 a[kBlock] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      for (int64_t k = 0; k < k_full; k += 8) {
        if (r == 0 && ahead != nullptr)
          for (int64_t b = 0; b < kBytesPerIt; b += 64) _mm_prefetch(ahead + k / 8 * kBytesPerIt + b, _MM_HINT_T0);
        const __m256 xv = _mm256_loadu_ps(xr + k);
        for (int64_t j = 0; j < nb; ++j) a[j] = _mm256_fmadd_ps(load8(w + (n + j) * K + k), xv, a[j]);
      }
      for (int64_t j = 0; j < nb; ++j) {
        float s = hsum256(a[j]);
        for (int64_t k = k_full; k < K; ++k) s += static_cast<float>(w[(n + j) * K + k]) * xr[k];
        y[r * N + n + j] = s;
      }
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

at::Tensor few_rows_gemv(const at::Tensor& x, const at::Tensor& weight) {
  constexpr const char* kOp = "lladapter few_rows_gemv";
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), kOp, ": x and weight must be CPU tensors, got ",
              x.device(), " and ", weight.device());
  TORCH_CHECK(
      x.scalar_type() == weight.scalar_type() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
      kOp, ": x and weight must both be float32 or both bfloat16, got ", x.scalar_type(), " and ",
      weight.scalar_type());
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= kFewRowsGemvMaxRows, kOp,
              ": x must be [rows, K] with 1 to ", kFewRowsGemvMaxRows, " rows, got ", x.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1), kOp, ": weight must be [N, K] with K = x's ", x.size(1),
              ", got ", weight.sizes());
  TORCH_CHECK(weight.is_contiguous(), kOp, ": weight must be contiguous (a decode step streams it row by row)");
  TORCH_CHECK(
      !(at::GradMode::is_enabled() && (x.requires_grad() || weight.requires_grad())), kOp,
      ": has no backward of its own; call it with grad off (nn.few_rows_linear wraps it in an autograd function "
      "where a gradient is needed)");
  const at::Tensor xc = x.to(at::kFloat).contiguous();  // (fp32 x: no copy; bf16 x: widened once, exactly)
  const int64_t R = xc.size(0), K = xc.size(1), N = weight.size(0);
  at::Tensor y = at::empty({R, N}, xc.options());  // fp32 sums; a bf16 result is rounded once at the end
  if (N > 0) {
    const float* xp = xc.const_data_ptr<float>();
    float* yp = y.mutable_data_ptr<float>();
    const Isa isa = gemv_isa();
    const char* prefetch_env = std::getenv(kPrefetchEnv);
    const bool prefetch = prefetch_env == nullptr || std::string_view(prefetch_env) != "0";
    const int64_t blocks = (N + kBlock - 1) / kBlock;
    const int64_t grain = std::max<int64_t>(1, kMinWeightsPerTask / std::max<int64_t>(1, K * kBlock));
    auto run = [&](const auto* wp) {
      at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
        const int64_t n0 = b0 * kBlock, n1 = std::min(N, b1 * kBlock);
        switch (isa) {
#if LL_GEMV_X86
          case Isa::kAvx512:
            return gemv_rows_avx512(xp, R, wp, K, N, n0, n1, yp, prefetch);
          case Isa::kAvx2:
            return gemv_rows_avx2(xp, R, wp, K, N, n0, n1, yp, prefetch);
#endif
          default:
            return gemv_rows_scalar(xp, R, wp, K, N, n0, n1, yp);
        }
      });
    };
    if (weight.scalar_type() == at::kFloat)
      run(weight.const_data_ptr<float>());
    else
      run(weight.const_data_ptr<c10::BFloat16>());
  }
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace lladapter
