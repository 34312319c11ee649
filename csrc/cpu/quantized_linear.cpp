// Weight-only quantized matmul, CPU: y [M, N] = x [M, K] @ W^T with W's int8 / int4 codes turned into fp32 in
// registers as they stream by (csrc/quantized_linear.h has the formats). Meant for the few rows of a decode step:
// each output row's codes (int4: each block of 32 rows) are converted once per tile of x rows (int8: 8 / 4 / 2 / 1
// rows on AVX-512, 4 / 2 / 1 on AVX2; int4: 4 / 2 / 1 on AVX-512, 2 / 1 on AVX2), and read from memory once.
// Output rows (int4: blocks of 32) are split over threads with at::parallel_for; every output element is summed by
// one thread in a fixed order, so results do not depend on the thread count.
//
// Three paths (docs/quantization.md), chosen at run time (quantized_linear_cpu_isa below):
//   avx512  16 fp32 lanes (AVX-512 F/BW/VL/DQ, compiled with target attributes whatever the build's flags, taken
//           only when the CPU has them: cpu_isa.h's cpu_has_avx512), software prefetch of the codes, and x in L1-sized
//           chunks when several long rows of it would not fit;
//   avx2    8 fp32 lanes (AVX2 + FMA + F16C: only when the build targets them, setup.py cpu_isa);
//   scalar  plain loops (also the fp64 gradcheck path on every ISA, which sums in fp64).
// All sum fp32 products into fp32; they differ only in the order of the additions (16 lanes against 8, the number of
// accumulators, the masked tail on AVX-512 against the scalar tail on AVX2, the chunks of x), within the tests'
// rounding-error bound. The default is the best path the CPU has; LLADAPTER_QUANTIZED_LINEAR_ISA (read once) or
// quantized_linear_cpu_isa picks another.
//
// dequantize_rows (the weight for the training and prefill GEMMs, written into the caller's buffer) lives here too: it
// shares the formats and the path switch (avx512: 16 codes per step, int4's 32-row blocks transposed in registers;
// avx2 and scalar: plain loops, which the compiler vectorises as it can). Every path gives the same bits.
//
// int4 arithmetic per group of g inputs: sum_k x_k (q_k scale + low) = scale * sum_k x_k q_k + low * sum_k x_k, so
// the inner loop is one FMA per code and the group's scale and low are applied once per group and row.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "../quantized_linear.h"
#include "cpu_isa.h"

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#define LL_QL_AVX2 1
#else
#define LL_QL_AVX2 0
#endif

// The AVX-512 kernels are compiled into every x86-64 build (GCC / Clang target attributes) and run only where the CPU
// has the instructions.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define LL_QL_AVX512 1
#define LL_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#else
#define LL_QL_AVX512 0
#endif

namespace lladapter::cpu {
namespace {

// Each parallel chunk gets at least this many weights (smaller matmuls stay on one thread).
constexpr int64_t kMinWeightsPerTask = 1 << 15;

template <typename scale_t>
inline float scale_to_float(scale_t v) {
#if LL_QL_AVX2
  if constexpr (std::is_same_v<scale_t, at::Half>) return _cvtsh_ss(v.x);
#endif
  return static_cast<float>(v);
}

// x as a contiguous acc_t [M, K] copy (the kernels read it many times; converting once keeps the loops simple).
template <typename acc_t, typename scalar_t>
std::vector<acc_t> x_as(const at::Tensor& x) {
  const int64_t n = x.numel();
  std::vector<acc_t> out(static_cast<size_t>(n));
  const scalar_t* p = x.const_data_ptr<scalar_t>();
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<acc_t>(p[i]);
  return out;
}

// ------------------------------------------------------------------------------------------- int8, plain loops
template <typename acc_t, typename scale_t, typename scalar_t>
void int8_rows_plain(const acc_t* x, int64_t M, int64_t K, int64_t N, const int8_t* codes, const scale_t* scales,
                     bool per_row, int64_t group, int64_t n0, int64_t n1, scalar_t* y) {
  const int64_t G = per_row ? 1 : K / group;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* c = codes + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const acc_t* xm = x + m * K;
      acc_t total = 0;
      for (int64_t g = 0; g < G; ++g) {
        acc_t part = 0;
        for (int64_t k = g * group; k < (g + 1) * group; ++k) part += xm[k] * static_cast<acc_t>(c[k]);
        total += per_row ? part : part * static_cast<acc_t>(scale_to_float(scales[n * G + g]));
      }
      if (per_row) total *= static_cast<acc_t>(scale_to_float(scales[n]));
      y[m * N + n] = static_cast<scalar_t>(total);
    }
  }
}

// ------------------------------------------------------------------------------------------- int4, plain loops
// The code of row n (of N), input k, in pack_int4's layout.
inline int int4_code(const uint8_t* codes, int64_t N, int64_t K, int64_t n, int64_t k) {
  const int64_t full = N / 32 * 32;
  if (n < full) {
    const int64_t r = n % 32;
    const uint8_t b = codes[(n / 32) * 16 * K + k * 16 + r % 16];
    return r < 16 ? (b & 15) : (b >> 4);
  }
  const int64_t r = n - full;
  const uint8_t b = codes[full * K / 2 + k * 8 + r / 2];
  return r % 2 == 0 ? (b & 15) : (b >> 4);
}

// xsum [M, G]: the sum of each group of each x row (the low values' factor).
template <typename acc_t>
std::vector<acc_t> group_sums(const acc_t* x, int64_t M, int64_t K, int64_t group) {
  const int64_t G = K / group;
  std::vector<acc_t> out(static_cast<size_t>(M * G));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      acc_t s = 0;
      for (int64_t k = g * group; k < (g + 1) * group; ++k) s += x[m * K + k];
      out[m * G + g] = s;
    }
  return out;
}

template <typename acc_t, typename scale_t, typename scalar_t>
void int4_rows_plain(const acc_t* x, const acc_t* xsum, int64_t M, int64_t K, int64_t N, const uint8_t* codes,
                     const scale_t* sl, int64_t group, int64_t n0, int64_t n1, scalar_t* y) {
  const int64_t G = K / group;
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < M; ++m) {
      const acc_t* xm = x + m * K;
      acc_t total = 0;
      for (int64_t g = 0; g < G; ++g) {
        acc_t part = 0;
        for (int64_t k = g * group; k < (g + 1) * group; ++k)
          part += xm[k] * static_cast<acc_t>(int4_code(codes, N, K, n, k));
        const acc_t s = scale_to_float(sl[(g * N + n) * 2]), lo = scale_to_float(sl[(g * N + n) * 2 + 1]);
        total += s * part + lo * xsum[m * G + g];
      }
      y[m * N + n] = static_cast<scalar_t>(total);
    }
  }
}

#if LL_QL_AVX2
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// ------------------------------------------------------------------------------------------- int8, AVX2
// One output row against MT rows of x (x, out: MT rows, stride K / 1); U independent accumulators per x row.
template <int MT, int U, typename scale_t>
inline void int8_row_avx2(const float* x, int64_t K, const int8_t* c, const scale_t* s, bool per_row, int64_t group,
                          float* out) {
  const int64_t G = per_row ? 1 : K / group;
  __m256 total[MT];
  float total_tail[MT];
  for (int mt = 0; mt < MT; ++mt) total[mt] = _mm256_setzero_ps(), total_tail[mt] = 0.f;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t k1 = (g + 1) * group;
    int64_t k = g * group;
    __m256 acc[MT][U];
    for (int mt = 0; mt < MT; ++mt)
      for (int u = 0; u < U; ++u) acc[mt][u] = _mm256_setzero_ps();
    for (; k + 8 * U <= k1; k += 8 * U) {
      for (int u = 0; u < U; ++u) {
        const __m256 w =
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + k + 8 * u))));
        for (int mt = 0; mt < MT; ++mt)
          acc[mt][u] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + mt * K + k + 8 * u), acc[mt][u]);
      }
    }
    for (; k + 8 <= k1; k += 8) {
      const __m256 w =
          _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + k))));
      for (int mt = 0; mt < MT; ++mt) acc[mt][0] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + mt * K + k), acc[mt][0]);
    }
    float tail[MT];
    for (int mt = 0; mt < MT; ++mt) tail[mt] = 0.f;
    for (; k < k1; ++k)
      for (int mt = 0; mt < MT; ++mt) tail[mt] += x[mt * K + k] * static_cast<float>(c[k]);
    const float sc = per_row ? 1.f : scale_to_float(s[g]);
    const __m256 scv = _mm256_set1_ps(sc);
    for (int mt = 0; mt < MT; ++mt) {
      __m256 a = acc[mt][0];
      for (int u = 1; u < U; ++u) a = _mm256_add_ps(a, acc[mt][u]);
      total[mt] = _mm256_fmadd_ps(a, scv, total[mt]);
      total_tail[mt] += tail[mt] * sc;
    }
  }
  const float row_scale = per_row ? scale_to_float(s[0]) : 1.f;
  for (int mt = 0; mt < MT; ++mt) out[mt] = (hsum8(total[mt]) + total_tail[mt]) * row_scale;
}

// ------------------------------------------------------------------------------------------- int4, AVX2
template <typename scale_t>
inline __m256 load8_as_float(const scale_t* p) {
  if constexpr (std::is_same_v<scale_t, float>) {
    return _mm256_loadu_ps(p);
  } else if constexpr (std::is_same_v<scale_t, at::Half>) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  } else {
    static_assert(std::is_same_v<scale_t, at::BFloat16>, "load8_as_float: unsupported type");
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
}

// (scale, low) of 8 consecutive rows, stored interleaved (s0 l0 s1 l1 ... s7 l7), as two vectors s0..s7, l0..l7.
template <typename scale_t>
inline void load_scale_low8(const scale_t* p, __m256& s, __m256& l) {
  const __m256 a = load8_as_float(p), b = load8_as_float(p + 8);
  // within each 128-bit lane: (a0 a2 b0 b2) -> s0 s1 s4 s5 | s2 s3 s6 s7; then 64-bit chunks in order 0 2 1 3
  const __m256 se = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));
  const __m256 lo = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1));
  s = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(se), _MM_SHUFFLE(3, 1, 2, 0)));
  l = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(lo), _MM_SHUFFLE(3, 1, 2, 0)));
}

// One block of 32 output rows (blk: its 16 * K bytes, input by input) against MT rows of x. sl: the block's first
// (scale, low) pair of group 0; sl_stride: elements from one group to the next (2 N). out: MT x 32 floats.
template <int MT, typename scale_t>
inline void int4_block32_avx2(const float* x, const float* xsum, int64_t K, int64_t group, const uint8_t* blk,
                              const scale_t* sl, int64_t sl_stride, float* out) {
  const int64_t G = K / group;
  const __m256i nibble = _mm256_set1_epi32(0x0F);
  // byte j of the lane's 16 (bytes 0-3 in the low lane, 4-7 in the high one; then 8-11, 12-15) -> dword lane
  const __m256i spread_lo = _mm256_setr_epi8(0, -1, -1, -1, 1, -1, -1, -1, 2, -1, -1, -1, 3, -1, -1, -1, 4, -1, -1, -1,
                                             5, -1, -1, -1, 6, -1, -1, -1, 7, -1, -1, -1);
  const __m256i spread_hi = _mm256_setr_epi8(8, -1, -1, -1, 9, -1, -1, -1, 10, -1, -1, -1, 11, -1, -1, -1, 12, -1, -1,
                                             -1, 13, -1, -1, -1, 14, -1, -1, -1, 15, -1, -1, -1);
  __m256 tot[MT][4];
  for (int mt = 0; mt < MT; ++mt)
    for (int i = 0; i < 4; ++i) tot[mt][i] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256 acc[MT][4];
    for (int mt = 0; mt < MT; ++mt)
      for (int i = 0; i < 4; ++i) acc[mt][i] = _mm256_setzero_ps();
    const int64_t k1 = (g + 1) * group;
    for (int64_t k = g * group; k < k1; ++k) {
      // the input's 16 code bytes in both 128-bit lanes; one byte shuffle per 8 rows puts byte j of the block in
      // dword lane j % 8 (rows 0-7 / 8-15 in its low nibble, rows 16-23 / 24-31 in its high one). Shuffles have
      // fewer ports than the arithmetic: 2 per input instead of 6 with pmovzx
      const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + k * 16)));
      const __m256i b0 = _mm256_shuffle_epi8(v, spread_lo), b1 = _mm256_shuffle_epi8(v, spread_hi);
      const __m256 w0 = _mm256_cvtepi32_ps(_mm256_and_si256(b0, nibble));
      const __m256 w1 = _mm256_cvtepi32_ps(_mm256_and_si256(b1, nibble));
      const __m256 w2 = _mm256_cvtepi32_ps(_mm256_srli_epi32(b0, 4));
      const __m256 w3 = _mm256_cvtepi32_ps(_mm256_srli_epi32(b1, 4));
      for (int mt = 0; mt < MT; ++mt) {
        const __m256 xv = _mm256_broadcast_ss(x + mt * K + k);
        acc[mt][0] = _mm256_fmadd_ps(w0, xv, acc[mt][0]);
        acc[mt][1] = _mm256_fmadd_ps(w1, xv, acc[mt][1]);
        acc[mt][2] = _mm256_fmadd_ps(w2, xv, acc[mt][2]);
        acc[mt][3] = _mm256_fmadd_ps(w3, xv, acc[mt][3]);
      }
    }
    const scale_t* p = sl + g * sl_stride;
    for (int i = 0; i < 4; ++i) {
      __m256 s, l;
      load_scale_low8(p + 16 * i, s, l);
      for (int mt = 0; mt < MT; ++mt) {
        tot[mt][i] = _mm256_fmadd_ps(acc[mt][i], s, tot[mt][i]);
        tot[mt][i] = _mm256_fmadd_ps(_mm256_set1_ps(xsum[mt * G + g]), l, tot[mt][i]);
      }
    }
  }
  for (int mt = 0; mt < MT; ++mt)
    for (int i = 0; i < 4; ++i) _mm256_storeu_ps(out + mt * 32 + 8 * i, tot[mt][i]);
}

// Output rows [n0, n1) against all M rows of x, in tiles of 4, 2 and 1 rows of x.
template <typename scale_t, typename scalar_t>
void int8_rows_avx2(const float* x, int64_t M, int64_t K, int64_t N, const int8_t* codes, const scale_t* scales,
                    bool per_row, int64_t group, int64_t n0, int64_t n1, scalar_t* y) {
  float out[4];
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* c = codes + n * K;
    const scale_t* s = per_row ? scales + n : scales + n * (K / group);
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) {
      int8_row_avx2<4, 1>(x + m * K, K, c, s, per_row, group, out);
      for (int t = 0; t < 4; ++t) y[(m + t) * N + n] = static_cast<scalar_t>(out[t]);
    }
    for (; m + 2 <= M; m += 2) {
      int8_row_avx2<2, 2>(x + m * K, K, c, s, per_row, group, out);
      for (int t = 0; t < 2; ++t) y[(m + t) * N + n] = static_cast<scalar_t>(out[t]);
    }
    for (; m < M; ++m) {
      int8_row_avx2<1, 4>(x + m * K, K, c, s, per_row, group, out);
      y[m * N + n] = static_cast<scalar_t>(out[0]);
    }
  }
}

// Full 32-row blocks [b0, b1) against all M rows of x, in tiles of 2 and 1 rows.
template <typename scale_t, typename scalar_t>
void int4_blocks_avx2(const float* x, const float* xsum, int64_t M, int64_t K, int64_t N, int64_t group,
                      const uint8_t* codes, const scale_t* sl, int64_t b0, int64_t b1, scalar_t* y) {
  const int64_t G = K / group;
  alignas(32) float out[2 * 32];
  for (int64_t b = b0; b < b1; ++b) {
    const uint8_t* blk = codes + b * 16 * K;
    const scale_t* bsl = sl + b * 32 * 2;
    int64_t m = 0;
    for (; m + 2 <= M; m += 2) {
      int4_block32_avx2<2>(x + m * K, xsum + m * G, K, group, blk, bsl, 2 * N, out);
      for (int t = 0; t < 2; ++t)
        for (int r = 0; r < 32; ++r) y[(m + t) * N + b * 32 + r] = static_cast<scalar_t>(out[t * 32 + r]);
    }
    for (; m < M; ++m) {
      int4_block32_avx2<1>(x + m * K, xsum + m * G, K, group, blk, bsl, 2 * N, out);
      for (int r = 0; r < 32; ++r) y[m * N + b * 32 + r] = static_cast<scalar_t>(out[r]);
    }
  }
}
#endif  // LL_QL_AVX2

#if LL_QL_AVX512
// GCC 12's avx512fintrin.h fills the unused source of unmasked conversions with _mm512_undefined_*, which
// -W(maybe-)uninitialized then report at every call (GCC bug 105593): silenced for these kernels only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
// Software prefetch of the codes this many bytes ahead of the loads, once per 64-byte line (the int8 rows and int4
// blocks are contiguous, so "ahead" runs on into the next rows). A decode step streams every weight from DRAM
// once: without it one thread read 7 GB/s of int8 codes on the Xeon of docs/quantization.md, with it 11 GB/s
// (2 KiB ahead: 10, 4 KiB: 11, 8 KiB: 11.5, 16 KiB: 11, 32 KiB: 10; L1 and L2 hints alike).
constexpr int64_t kPrefetchBytes = 8192;

LL_TARGET_AVX512 inline __attribute__((always_inline)) void prefetch_ahead(const void* p) {
  _mm_prefetch(static_cast<const char*>(p) + kPrefetchBytes, _MM_HINT_T0);
}

// ------------------------------------------------------------------------------------------- int8, AVX-512
// As int8_row_avx2 with 16 lanes, over the inputs [ka, kb) only (whole scale blocks): one output row against MT rows
// of x (x: their inputs ka.., rows ldx apart), U accumulators per x row, added into total (MT x 16 floats: per lane,
// the row's sums so far). A block's last (k1 - k) % 16 inputs by masked loads (the masked-off lanes add zeros), so
// there is no scalar tail. Per-row scales: the accumulators of the span are added to total (AVX2: FMA'd with a scale of
// 1 per group, the same sums).
template <int MT, int U, typename scale_t>
LL_TARGET_AVX512 void int8_span_avx512(const float* x, int64_t ldx, const int8_t* c, const scale_t* s, bool per_row,
                                       int64_t group, int64_t ka, int64_t kb, float* total_out) {
  const int64_t span = per_row ? kb - ka : group;
  __m512 total[MT];
  for (int mt = 0; mt < MT; ++mt) total[mt] = _mm512_loadu_ps(total_out + 16 * mt);
  for (int64_t k0 = ka; k0 < kb; k0 += span) {
    const int64_t k1 = k0 + span;
    int64_t k = k0;
    __m512 acc[MT][U];
    for (int mt = 0; mt < MT; ++mt)
      for (int u = 0; u < U; ++u) acc[mt][u] = _mm512_setzero_ps();
    for (; k + 16 * U <= k1; k += 16 * U) {
      if ((k & 63) < 16 * U) prefetch_ahead(c + k);
      for (int u = 0; u < U; ++u) {
        const __m512 w =
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + k + 16 * u))));
        for (int mt = 0; mt < MT; ++mt)
          acc[mt][u] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + mt * ldx + (k - ka) + 16 * u), acc[mt][u]);
      }
    }
    for (; k + 16 <= k1; k += 16) {
      if ((k & 63) < 16) prefetch_ahead(c + k);
      const __m512 w =
          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + k))));
      for (int mt = 0; mt < MT; ++mt)
        acc[mt][0] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + mt * ldx + (k - ka)), acc[mt][0]);
    }
    if (k < k1) {
      const __mmask16 mask = static_cast<__mmask16>((1u << (k1 - k)) - 1u);
      const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, c + k)));
      for (int mt = 0; mt < MT; ++mt)
        acc[mt][0] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(mask, x + mt * ldx + (k - ka)), acc[mt][0]);
    }
    if (per_row) {
      for (int mt = 0; mt < MT; ++mt)
        for (int u = 0; u < U; ++u) total[mt] = _mm512_add_ps(total[mt], acc[mt][u]);
    } else {
      const __m512 scv = _mm512_set1_ps(scale_to_float(s[k0 / group]));
      for (int mt = 0; mt < MT; ++mt) {
        __m512 a = acc[mt][0];
        for (int u = 1; u < U; ++u) a = _mm512_add_ps(a, acc[mt][u]);
        total[mt] = _mm512_fmadd_ps(a, scv, total[mt]);
      }
    }
  }
  for (int mt = 0; mt < MT; ++mt) _mm512_storeu_ps(total_out + 16 * mt, total[mt]);
}

// Output rows [n0, n1) against all M rows of x, in tiles of 8, 4, 2 and 1 rows of x. When x does not fit in L1
// (kXFitsBytes: several rows, or long ones), the inputs are taken in chunks of about kXChunkBytes of x, each chunk
// against a block of kRowsPerChunkPass output rows (whose codes stay in L2), so that the chunk of x stays in L1
// instead of being read again from L2 for every output row (1 thread, best of 15, on a busy machine: 8 rows of
// 2048 x 5632 5.5 -> 2.1 ms, of 5632 x 2048 2.7 -> 2.1; 16 rows 11 -> 4.3-5.9 ms). Every output's sum is added up
// in the same order for any split of the rows over threads.
constexpr int64_t kXFitsBytes = 48 * 1024, kXChunkBytes = 32 * 1024;
constexpr int64_t kRowsPerChunkPass = 16;

template <typename scale_t, typename scalar_t>
LL_TARGET_AVX512 void int8_rows_avx512(const float* x, int64_t M, int64_t K, int64_t N, const int8_t* codes,
                                       const scale_t* scales, bool per_row, int64_t group, int64_t n0, int64_t n1,
                                       scalar_t* y) {
  int64_t kc = K, nb = 1;  // inputs per chunk, output rows per pass
  if (M * K * 4 > kXFitsBytes) {
    const int64_t chunks = (M * K * 4 + kXChunkBytes - 1) / kXChunkBytes;
    kc = ((K + chunks - 1) / chunks + 63) / 64 * 64;
    if (!per_row) kc = group >= kc ? group : kc / group * group;  // whole scale blocks
    kc = std::min(kc, K);
    nb = kc < K ? kRowsPerChunkPass : 1;
  }
  // chunked: x's columns [ka, kb) of every row copied next to each other (at M * ka), so that a chunk is contiguous:
  // pieces of rows K floats apart share L1 sets when K is a power of 2 (16 rows of 2048 x 2048: 2.2 -> 1.6 ms)
  std::vector<float> xc(kc < K ? static_cast<size_t>(M * K) : 0);
  for (int64_t ka = 0; kc < K && ka < K; ka += kc) {
    const int64_t w = std::min(K, ka + kc) - ka;
    for (int64_t m = 0; m < M; ++m) std::copy(x + m * K + ka, x + m * K + ka + w, xc.data() + M * ka + m * w);
  }
  std::vector<float> totals(static_cast<size_t>(nb * M * 16));
  for (int64_t b0 = n0; b0 < n1; b0 += nb) {
    const int64_t b1 = std::min(n1, b0 + nb);
    std::fill(totals.begin(), totals.end(), 0.f);
    for (int64_t ka = 0; ka < K; ka += kc) {
      const int64_t kb = std::min(K, ka + kc);
      const float* xa = kc < K ? xc.data() + M * ka : x;
      const int64_t ld = kc < K ? kb - ka : K;
      for (int64_t n = b0; n < b1; ++n) {
        const int8_t* c = codes + n * K;
        const scale_t* s = per_row ? scales + n : scales + n * (K / group);
        float* t = totals.data() + (n - b0) * M * 16;
        int64_t m = 0;
        for (; m + 8 <= M; m += 8) int8_span_avx512<8, 1>(xa + m * ld, ld, c, s, per_row, group, ka, kb, t + m * 16);
        for (; m + 4 <= M; m += 4) int8_span_avx512<4, 1>(xa + m * ld, ld, c, s, per_row, group, ka, kb, t + m * 16);
        for (; m + 2 <= M; m += 2) int8_span_avx512<2, 2>(xa + m * ld, ld, c, s, per_row, group, ka, kb, t + m * 16);
        for (; m < M; ++m) int8_span_avx512<1, 4>(xa + m * ld, ld, c, s, per_row, group, ka, kb, t + m * 16);
      }
    }
    for (int64_t n = b0; n < b1; ++n) {
      const float row_scale = per_row ? scale_to_float(scales[n]) : 1.f;
      const float* t = totals.data() + (n - b0) * M * 16;
      for (int64_t m = 0; m < M; ++m)
        y[m * N + n] = static_cast<scalar_t>(_mm512_reduce_add_ps(_mm512_loadu_ps(t + m * 16)) * row_scale);
    }
  }
}

// ------------------------------------------------------------------------------------------- int4, AVX-512
// 16 consecutive values of scale_t as fp32.
template <typename scale_t>
LL_TARGET_AVX512 inline __m512 load16_as_float(const scale_t* p) {
  if constexpr (std::is_same_v<scale_t, float>) {
    return _mm512_loadu_ps(p);
  } else if constexpr (std::is_same_v<scale_t, at::Half>) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  } else {
    static_assert(std::is_same_v<scale_t, at::BFloat16>, "load16_as_float: unsupported type");
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
}

// One input k of a 32-row block into the accumulators acc[mt][p] (rows 0-15, 16-31).
template <int MT>
LL_TARGET_AVX512 inline __attribute__((always_inline)) void int4_input_avx512(const float* x, int64_t K,
                                                                              const uint8_t* blk, int64_t k,
                                                                              __m512 (*acc)[2][2], int p) {
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + k * 16)));
  const __m512 w0 = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(0x0F)));
  const __m512 w1 = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
  for (int mt = 0; mt < MT; ++mt) {
    const __m512 xv = _mm512_set1_ps(x[mt * K + k]);
    acc[mt][p][0] = _mm512_fmadd_ps(w0, xv, acc[mt][p][0]);
    acc[mt][p][1] = _mm512_fmadd_ps(w1, xv, acc[mt][p][1]);
  }
}

// One block of 32 output rows against MT rows of x (arguments as int4_block32_avx2). An input's 16 code bytes
// zero-extend to 16 dword lanes: the low nibbles are rows 0-15, the high ones rows 16-31, one FMA each with the
// broadcast x. Inputs alternate between two sets of accumulators (so that MT = 1 has four independent FMA chains),
// added at the end of the group.
template <int MT, typename scale_t>
LL_TARGET_AVX512 void int4_block32_avx512(const float* x, const float* xsum, int64_t K, int64_t group,
                                          const uint8_t* blk, const scale_t* sl, int64_t sl_stride, float* out) {
  const int64_t G = K / group;
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  __m512 tot[MT][2];
  for (int mt = 0; mt < MT; ++mt) tot[mt][0] = tot[mt][1] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512 acc[MT][2][2];
    for (int mt = 0; mt < MT; ++mt)
      for (int p = 0; p < 2; ++p) acc[mt][p][0] = acc[mt][p][1] = _mm512_setzero_ps();
    const int64_t k1 = (g + 1) * group;
    int64_t k = g * group;
    for (; k + 2 <= k1; k += 2) {
      if ((k & 3) == 0) prefetch_ahead(blk + k * 16);
      int4_input_avx512<MT>(x, K, blk, k, acc, 0);
      int4_input_avx512<MT>(x, K, blk, k + 1, acc, 1);
    }
    if (k < k1) int4_input_avx512<MT>(x, K, blk, k, acc, 0);
    // (scale, low) of the 32 rows, interleaved s0 l0 s1 l1 ...: rows 0-15 from the first 32 values, 16-31 next
    const scale_t* p = sl + g * sl_stride;
    for (int h = 0; h < 2; ++h) {
      const __m512 a = load16_as_float(p + 32 * h), b = load16_as_float(p + 32 * h + 16);
      const __m512 s = _mm512_permutex2var_ps(a, even, b), l = _mm512_permutex2var_ps(a, odd, b);
      for (int mt = 0; mt < MT; ++mt) {
        const __m512 sum = _mm512_add_ps(acc[mt][0][h], acc[mt][1][h]);
        tot[mt][h] = _mm512_fmadd_ps(sum, s, tot[mt][h]);
        tot[mt][h] = _mm512_fmadd_ps(_mm512_set1_ps(xsum[mt * G + g]), l, tot[mt][h]);
      }
    }
  }
  for (int mt = 0; mt < MT; ++mt)
    for (int h = 0; h < 2; ++h) _mm512_storeu_ps(out + mt * 32 + 16 * h, tot[mt][h]);
}

// Full 32-row blocks [b0, b1) against all M rows of x, in tiles of 4, 2 and 1 rows.
template <typename scale_t, typename scalar_t>
LL_TARGET_AVX512 void int4_blocks_avx512(const float* x, const float* xsum, int64_t M, int64_t K, int64_t N,
                                         int64_t group, const uint8_t* codes, const scale_t* sl, int64_t b0, int64_t b1,
                                         scalar_t* y) {
  const int64_t G = K / group;
  alignas(64) float out[4 * 32];
  for (int64_t b = b0; b < b1; ++b) {
    const uint8_t* blk = codes + b * 16 * K;
    const scale_t* bsl = sl + b * 32 * 2;
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) {
      int4_block32_avx512<4>(x + m * K, xsum + m * G, K, group, blk, bsl, 2 * N, out);
      for (int t = 0; t < 4; ++t)
        for (int r = 0; r < 32; ++r) y[(m + t) * N + b * 32 + r] = static_cast<scalar_t>(out[t * 32 + r]);
    }
    for (; m + 2 <= M; m += 2) {
      int4_block32_avx512<2>(x + m * K, xsum + m * G, K, group, blk, bsl, 2 * N, out);
      for (int t = 0; t < 2; ++t)
        for (int r = 0; r < 32; ++r) y[(m + t) * N + b * 32 + r] = static_cast<scalar_t>(out[t * 32 + r]);
    }
    for (; m < M; ++m) {
      int4_block32_avx512<1>(x + m * K, xsum + m * G, K, group, blk, bsl, 2 * N, out);
      for (int r = 0; r < 32; ++r) y[m * N + b * 32 + r] = static_cast<scalar_t>(out[r]);
    }
  }
}
#pragma GCC diagnostic pop
#endif  // LL_QL_AVX512

// ------------------------------------------------------------------------------------------- dequantize_rows
// Rows [row_start, row_end) of W written into out [rows, K] (csrc/quantized_linear.h), one pass: each code is read
// once and its value computed in fp32 (fp64 for fp64 out) as quantize.dequantize computes it (int8: code * scale;
// int4: q * scale, rounded, + low, rounded: no FMA, so the result is bitwise that of the reference) and rounded once
// to out's dtype (round to nearest even, as torch's .to() does).

// The rounded product, kept from being contracted with the add that follows into an FMA (GCC contracts a * b + c
// at -O2 even in ISO mode, which would round once instead of twice and differ from the reference).
template <typename acc_t>
inline acc_t no_contract(acc_t v) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  asm("" : "+x"(v));
#else
  volatile acc_t t = v;
  v = t;
#endif
  return v;
}

template <typename acc_t, typename scale_t, typename out_t>
void dequantize_int8_rows_plain(const int8_t* codes, const scale_t* scales, bool per_row, int64_t K, int64_t group,
                                int64_t n0, int64_t n1, int64_t row_start, out_t* out) {
  const int64_t G = per_row ? 1 : K / group;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* c = codes + n * K;
    out_t* o = out + (n - row_start) * K;
    for (int64_t g = 0; g < G; ++g) {
      const acc_t s = static_cast<acc_t>(scale_to_float(per_row ? scales[n] : scales[n * G + g]));
      const int64_t k1 = per_row ? K : (g + 1) * group;
      for (int64_t k = per_row ? 0 : g * group; k < k1; ++k) o[k] = static_cast<out_t>(static_cast<acc_t>(c[k]) * s);
    }
  }
}

template <typename acc_t, typename scale_t, typename out_t>
void dequantize_int4_rows_plain(const uint8_t* codes, const scale_t* sl, int64_t N, int64_t K, int64_t group,
                                int64_t n0, int64_t n1, int64_t row_start, out_t* out) {
  const int64_t G = K / group;
  // whole 32-row blocks: row by row, each row's byte of every input (16 bytes apart), both nibbles at once
  for (; n0 % 32 == 0 && n0 + 32 <= std::min(n1, N / 32 * 32); n0 += 32) {
    const uint8_t* blk = codes + n0 * (K / 2);
    for (int64_t r = 0; r < 16; ++r) {
      out_t* o0 = out + (n0 + r - row_start) * K;
      out_t* o1 = o0 + 16 * K;
      for (int64_t g = 0; g < G; ++g) {
        const scale_t* p0 = sl + (g * N + n0 + r) * 2;
        const scale_t* p1 = p0 + 32;
        const acc_t s0 = static_cast<acc_t>(scale_to_float(p0[0])), l0 = static_cast<acc_t>(scale_to_float(p0[1]));
        const acc_t s1 = static_cast<acc_t>(scale_to_float(p1[0])), l1 = static_cast<acc_t>(scale_to_float(p1[1]));
        for (int64_t k = g * group; k < (g + 1) * group; ++k) {
          const uint8_t b = blk[k * 16 + r];
          o0[k] = static_cast<out_t>(no_contract(static_cast<acc_t>(b & 15) * s0) + l0);
          o1[k] = static_cast<out_t>(no_contract(static_cast<acc_t>(b >> 4) * s1) + l1);
        }
      }
    }
  }
  for (int64_t n = n0; n < n1; ++n) {  // the trailing 16-row block
    out_t* o = out + (n - row_start) * K;
    for (int64_t g = 0; g < G; ++g) {
      const acc_t s = static_cast<acc_t>(scale_to_float(sl[(g * N + n) * 2]));
      const acc_t lo = static_cast<acc_t>(scale_to_float(sl[(g * N + n) * 2 + 1]));
      for (int64_t k = g * group; k < (g + 1) * group; ++k)
        o[k] = static_cast<out_t>(no_contract(static_cast<acc_t>(int4_code(codes, N, K, n, k)) * s) + lo);
    }
  }
}

#if LL_QL_AVX512
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
// 16 fp32 values stored as out_t (the lanes of mask only), rounded to nearest even: bf16 as c10::BFloat16 rounds
// (bits + 0x7FFF + lsb) >> 16, NaN -> 0x7FC0; fp16 by the F16C conversion.
template <typename out_t>
LL_TARGET_AVX512 inline __attribute__((always_inline)) void store16_as(out_t* p, __m512 v, __mmask16 mask) {
  if constexpr (std::is_same_v<out_t, float>) {
    _mm512_mask_storeu_ps(p, mask, v);
  } else if constexpr (std::is_same_v<out_t, at::Half>) {
    _mm256_mask_storeu_epi16(p, mask, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    static_assert(std::is_same_v<out_t, at::BFloat16>, "store16_as: unsupported type");
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    _mm256_mask_storeu_epi16(p, mask, _mm512_cvtepi32_epi16(r));
  }
}

constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;  // explicit rounding: never fused into an FMA

// int8 rows [n0, n1): per scale block (the whole row for per-row scales) 16 codes at a time, a masked last piece.
template <typename scale_t, typename out_t>
LL_TARGET_AVX512 void dequantize_int8_rows_avx512(const int8_t* codes, const scale_t* scales, bool per_row, int64_t K,
                                                  int64_t group, int64_t n0, int64_t n1, int64_t row_start,
                                                  out_t* out) {
  const int64_t G = per_row ? 1 : K / group, span = per_row ? K : group;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* c = codes + n * K;
    out_t* o = out + (n - row_start) * K;
    for (int64_t g = 0; g < G; ++g) {
      const __m512 s = _mm512_set1_ps(scale_to_float(per_row ? scales[n] : scales[n * G + g]));
      int64_t k = g * span;
      const int64_t k1 = k + span;
      for (; k + 16 <= k1; k += 16) {
        const __m512 w =
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + k))));
        store16_as(o + k, _mm512_mul_round_ps(w, s, kRound), 0xFFFF);
      }
      if (k < k1) {
        const __mmask16 mask = static_cast<__mmask16>((1u << (k1 - k)) - 1u);
        const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, c + k)));
        store16_as(o + k, _mm512_mul_round_ps(w, s, kRound), mask);
      }
    }
  }
}

// Full 32-row int4 blocks [b0, b1) (group and K multiples of 16). pack_int4's block holds, per input, 16 bytes (row r
// low nibble, row 16 + r high); 16 inputs are a 16 x 16 byte matrix [input][r], transposed in registers (four
// rounds of unpacks) so that each row's 16 codes lie in one register, then widened, scaled and stored: 32 rows x 16
// inputs per step, every code byte loaded once.
template <typename scale_t, typename out_t>
LL_TARGET_AVX512 void dequantize_int4_blocks_avx512(const uint8_t* codes, const scale_t* sl, int64_t N, int64_t K,
                                                    int64_t group, int64_t b0, int64_t b1, int64_t row_start,
                                                    out_t* out) {
  const int64_t G = K / group;
  // after the transpose, the row r's bytes are in register kRev[r] (the four unpack rounds reverse the index bits)
  constexpr int kRev[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};
  alignas(64) float s[32], lo[32];
  for (int64_t b = b0; b < b1; ++b) {
    const uint8_t* blk = codes + b * 16 * K;
    out_t* o = out + (b * 32 - row_start) * K;
    for (int64_t g = 0; g < G; ++g) {
      const scale_t* p = sl + (g * N + b * 32) * 2;
      for (int r = 0; r < 32; ++r) s[r] = scale_to_float(p[2 * r]), lo[r] = scale_to_float(p[2 * r + 1]);
      for (int64_t k = g * group; k < (g + 1) * group; k += 16) {
        prefetch_ahead(blk + k * 16);
        prefetch_ahead(blk + k * 16 + 64);
        prefetch_ahead(blk + k * 16 + 128);
        prefetch_ahead(blk + k * 16 + 192);
        __m128i x[16], t[16];
        for (int i = 0; i < 16; ++i) x[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + (k + i) * 16));
        for (int i = 0; i < 8; ++i)
          t[i] = _mm_unpacklo_epi8(x[2 * i], x[2 * i + 1]), t[i + 8] = _mm_unpackhi_epi8(x[2 * i], x[2 * i + 1]);
        for (int i = 0; i < 8; ++i)
          x[i] = _mm_unpacklo_epi16(t[2 * i], t[2 * i + 1]), x[i + 8] = _mm_unpackhi_epi16(t[2 * i], t[2 * i + 1]);
        for (int i = 0; i < 8; ++i)
          t[i] = _mm_unpacklo_epi32(x[2 * i], x[2 * i + 1]), t[i + 8] = _mm_unpackhi_epi32(x[2 * i], x[2 * i + 1]);
        for (int i = 0; i < 8; ++i)
          x[i] = _mm_unpacklo_epi64(t[2 * i], t[2 * i + 1]), x[i + 8] = _mm_unpackhi_epi64(t[2 * i], t[2 * i + 1]);
        for (int r = 0; r < 16; ++r) {
          const __m512i v = _mm512_cvtepu8_epi32(x[kRev[r]]);
          const __m512 q0 = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(0x0F)));
          const __m512 q1 = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
          store16_as(
              o + r * K + k,
              _mm512_add_round_ps(_mm512_mul_round_ps(q0, _mm512_set1_ps(s[r]), kRound), _mm512_set1_ps(lo[r]), kRound),
              0xFFFF);
          store16_as(o + (16 + r) * K + k,
                     _mm512_add_round_ps(_mm512_mul_round_ps(q1, _mm512_set1_ps(s[16 + r]), kRound),
                                         _mm512_set1_ps(lo[16 + r]), kRound),
                     0xFFFF);
        }
      }
    }
  }
}
#pragma GCC diagnostic pop
#endif  // LL_QL_AVX512

// ------------------------------------------------------------------------------------------- path selection
enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };
constexpr const char* kIsaNames[] = {"scalar", "avx2", "avx512"};
constexpr const char* kIsaEnv = "LLADAPTER_QUANTIZED_LINEAR_ISA";

// Empty when this build and CPU can run the path, else why not.
std::string isa_unavailable(Isa isa) {
  switch (isa) {
    case Isa::kScalar:
      return "";
    case Isa::kAvx2:
      return LL_QL_AVX2
                 ? ""
                 : "this build was compiled without AVX2 (setup.py: LLADAPTER_CPU_ISA; CMake: LLADAPTER_CMAKE_AVX2)";
    case Isa::kAvx512:
#if LL_QL_AVX512
      return cpu_has_avx512() ? "" : "this CPU lacks AVX-512 (F, BW, VL and DQ)";
#else
      return "this build has no AVX-512 kernels (not an x86-64 GCC/Clang build)";
#endif
  }
  return "unknown path";
}

// The path called name (kIsaNames); any other name is an error that names its source, what.
Isa parse_isa(std::string_view name, const char* what) {
  for (int i = 0; i < 3; ++i)
    if (name == kIsaNames[i]) return static_cast<Isa>(i);
  TORCH_CHECK(false, "lladapter::quantized_linear: ", what, " must be 'avx512', 'avx2' or 'scalar' (or ",
              "unset / 'auto': the best this CPU has), got '", name, "'");
}

// The path the environment asks for (read once, cpu_isa.h's cpu_isa_from_env), else the best available one. A path
// that cannot run here is an error (cpu_isa_unavailable), at every call: a throwing initialiser is retried.
Isa default_isa() {
  static const Isa isa = [] {
    const std::string_view env = cpu_isa_from_env(kIsaEnv, {"auto", "avx512", "avx2", "scalar"});
    if (env == "auto") {
      for (Isa i : {Isa::kAvx512, Isa::kAvx2})
        if (isa_unavailable(i).empty()) return i;
      return Isa::kScalar;
    }
    const Isa want = parse_isa(env, kIsaEnv);
    const std::string why = isa_unavailable(want);
    if (!why.empty()) cpu_isa_unavailable(kIsaEnv, env, why);
    return want;
  }();
  return isa;
}

std::atomic<int> g_forced_isa{-1};  // set by quantized_linear_cpu_isa; -1: default_isa()

Isa current_isa() {
  const int forced = g_forced_isa.load(std::memory_order_relaxed);
  return forced >= 0 ? static_cast<Isa>(forced) : default_isa();
}

template <typename scalar_t, typename scale_t>
void quantized_linear_impl(const QuantizedLinearShape& sh, const at::Tensor& x, const at::Tensor& codes,
                           const at::Tensor& scales, at::Tensor& y) {
  const int64_t M = sh.M, N = sh.N, K = sh.K, group = sh.group;
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  const scale_t* sp = scales.const_data_ptr<scale_t>();
  constexpr bool fp64 = std::is_same_v<scalar_t, double>;
  using acc_t = std::conditional_t<fp64, double, float>;
  const std::vector<acc_t> xf = x_as<acc_t, scalar_t>(x);
  const bool per_row = scales.dim() == 1;
  [[maybe_unused]] const Isa isa = fp64 ? Isa::kScalar : current_isa();
  if (sh.format == QuantFormat::kInt8) {
    const int8_t* cp = codes.const_data_ptr<int8_t>();
    const int64_t grain = std::max<int64_t>(1, kMinWeightsPerTask / K);
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      if constexpr (!fp64) {
#if LL_QL_AVX512
        if (isa == Isa::kAvx512)
          return int8_rows_avx512<scale_t, scalar_t>(xf.data(), M, K, N, cp, sp, per_row, group, n0, n1, yp);
#endif
#if LL_QL_AVX2
        if (isa == Isa::kAvx2)
          return int8_rows_avx2<scale_t, scalar_t>(xf.data(), M, K, N, cp, sp, per_row, group, n0, n1, yp);
#endif
      }
      int8_rows_plain<acc_t, scale_t, scalar_t>(xf.data(), M, K, N, cp, sp, per_row, group, n0, n1, yp);
    });
    return;
  }
  const uint8_t* cp = codes.const_data_ptr<uint8_t>();
  const std::vector<acc_t> xsum = group_sums(xf.data(), M, K, group);
  const int64_t full_blocks = N / 32, blocks = (N + 31) / 32;  // the last one may be the 16-row block
  const int64_t grain = std::max<int64_t>(1, kMinWeightsPerTask / (32 * K));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    if constexpr (!fp64) {
      if (isa != Isa::kScalar) {
#if LL_QL_AVX512
        if (isa == Isa::kAvx512)
          int4_blocks_avx512<scale_t, scalar_t>(xf.data(), xsum.data(), M, K, N, group, cp, sp, b0,
                                                std::min(b1, full_blocks), yp);
#endif
#if LL_QL_AVX2
        if (isa == Isa::kAvx2)
          int4_blocks_avx2<scale_t, scalar_t>(xf.data(), xsum.data(), M, K, N, group, cp, sp, b0,
                                              std::min(b1, full_blocks), yp);
#endif
        if (b1 > full_blocks)  // the trailing 16-row block
          int4_rows_plain<acc_t, scale_t, scalar_t>(xf.data(), xsum.data(), M, K, N, cp, sp, group, full_blocks * 32, N,
                                                    yp);
        return;
      }
    }
    int4_rows_plain<acc_t, scale_t, scalar_t>(xf.data(), xsum.data(), M, K, N, cp, sp, group, b0 * 32,
                                              std::min(N, b1 * 32), yp);
  });
}

// f.template operator()<scalar_t, scale_t>() for x's (or out's) dtype xt (double, float, bf16, half) and the scales'
// dtype st (float, bf16, half): cpu_isa.h's dispatch_float_types, twice.
template <typename F>
void dispatch_x_scales(at::ScalarType xt, at::ScalarType st, F&& f) {
  constexpr const char* kOp = "lladapter::quantized_linear";
  dispatch_float_types(kOp, xt, [&]<typename scalar_t>() {
    dispatch_float_types<false>(
        kOp, st, [&]<typename scale_t>() { f.template operator()<scalar_t, scale_t>(); }, "scales dtype");
  });
}

at::Tensor quantized_linear_cpu(const at::Tensor& x_in, const at::Tensor& codes_in, const at::Tensor& scales_in) {
  const QuantizedLinearShape sh = quantized_linear_check_inputs(x_in, codes_in, scales_in, kCpuKernels);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor codes = codes_in.contiguous();
  const at::Tensor scales = scales_in.contiguous();
  at::Tensor y = at::empty({sh.M, sh.N}, x.options());
  if (sh.M == 0 || sh.N == 0) return y;
  dispatch_x_scales(x.scalar_type(), scales.scalar_type(), [&]<typename scalar_t, typename scale_t>() {
    quantized_linear_impl<scalar_t, scale_t>(sh, x, codes, scales, y);
  });
  return y;
}

// Each parallel chunk of dequantize_rows gets at least this many weights.
constexpr int64_t kMinDequantWeightsPerTask = 1 << 16;

template <typename out_t, typename scale_t>
void dequantize_rows_impl(const DequantizeRowsShape& sh, const at::Tensor& codes, const at::Tensor& scales,
                          at::Tensor& out) {
  const int64_t N = sh.N, K = sh.K, group = sh.group, r0 = sh.row_start, r1 = sh.row_end;
  out_t* op = out.mutable_data_ptr<out_t>();
  const scale_t* sp = scales.const_data_ptr<scale_t>();
  constexpr bool fp64 = std::is_same_v<out_t, double>;
  using acc_t = std::conditional_t<fp64, double, float>;
  [[maybe_unused]] const Isa isa = fp64 ? Isa::kScalar : current_isa();
  if (sh.format == QuantFormat::kInt8) {
    const int8_t* cp = codes.const_data_ptr<int8_t>();
    const bool per_row = scales.dim() == 1;
    at::parallel_for(r0, r1, std::max<int64_t>(1, kMinDequantWeightsPerTask / K), [&](int64_t n0, int64_t n1) {
      if constexpr (!fp64) {
#if LL_QL_AVX512
        if (isa == Isa::kAvx512)
          return dequantize_int8_rows_avx512<scale_t, out_t>(cp, sp, per_row, K, group, n0, n1, r0, op);
#endif
      }
      dequantize_int8_rows_plain<acc_t, scale_t, out_t>(cp, sp, per_row, K, group, n0, n1, r0, op);
    });
    return;
  }
  const uint8_t* cp = codes.const_data_ptr<uint8_t>();
  const int64_t full_blocks = N / 32;  // the block past them, if any, is the 16-row one
  const int64_t grain = std::max<int64_t>(1, kMinDequantWeightsPerTask / (32 * K));
  at::parallel_for(r0 / 32, (r1 + 31) / 32, grain, [&](int64_t b0, int64_t b1) {
    int64_t plain_from = b0 * 32;
    if constexpr (!fp64) {
#if LL_QL_AVX512
      if (isa == Isa::kAvx512 && group % 16 == 0) {
        const int64_t b_end = std::min(b1, full_blocks);
        if (b_end > b0) dequantize_int4_blocks_avx512<scale_t, out_t>(cp, sp, N, K, group, b0, b_end, r0, op);
        plain_from = std::max(b0, b_end) * 32;
      }
#endif
    }
    const int64_t plain_to = std::min(r1, b1 * 32);
    if (plain_from < plain_to)
      dequantize_int4_rows_plain<acc_t, scale_t, out_t>(cp, sp, N, K, group, plain_from, plain_to, r0, op);
  });
}

void dequantize_rows_cpu(const at::Tensor& codes_in, const at::Tensor& scales_in, int64_t row_start, int64_t row_end,
                         at::Tensor& out) {
  const DequantizeRowsShape sh =
      dequantize_rows_check_inputs(codes_in, scales_in, row_start, row_end, out, kCpuKernels);
  if (row_start == row_end) return;
  const at::Tensor codes = codes_in.contiguous();
  const at::Tensor scales = scales_in.contiguous();
  dispatch_x_scales(out.scalar_type(), scales.scalar_type(), [&]<typename out_t, typename scale_t>() {
    dequantize_rows_impl<out_t, scale_t>(sh, codes, scales, out);
  });
}

}  // namespace

std::string quantized_linear_cpu_isa(std::string isa) {
  const std::string before = kIsaNames[static_cast<int>(current_isa())];
  if (isa.empty()) return before;
  if (isa == "auto") {
    g_forced_isa.store(-1);
    return before;
  }
  const Isa want = parse_isa(isa, "quantized_linear_cpu_isa's isa");
  const std::string why = isa_unavailable(want);
  TORCH_CHECK(why.empty(), "lladapter::quantized_linear: cannot run the '", isa, "' path: ", why);
  g_forced_isa.store(static_cast<int>(want));
  return before;
}

TORCH_LIBRARY_IMPL(lladapter, CPU, m) {
  m.impl("quantized_linear", &quantized_linear_cpu);
  m.impl("dequantize_rows", &dequantize_rows_cpu);
}

}  // namespace lladapter::cpu
