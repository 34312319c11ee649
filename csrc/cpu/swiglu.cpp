// SwiGLU CPU kernels (csrc/swiglu.h has the math): one pass forward (read gate and up, write y) and one pass backward
// (read grad, gate and up, write dgate and dup), where eager silu(gate) * up makes two forward and three backward
// passes. The op is compute-bound here (an exp and a divide per element), so lanes count. Two vector paths for
// fp32/bf16/fp16, fp32 math in both:
//   avx512  16 lanes where the CPU has AVX-512 F/BW/VL/DQ (checked at run time; built by GCC where the build targets
//           x86 AVX2, setup.py cpu_isa), in functions of this file alone compiled for that target. ATen's own kernels
//           run 16 lanes on such machines, eager silu and mul included: with 8 the op was barely faster than eager.
//   vec     at::vec (8 lanes under AVX2) everywhere else.
// Both form exp(-|gate|) with an exp of their own on x86 (x <= 0 only: Cody-Waite reduction, a degree-6 polynomial,
// then 2^n by vscalefps (AVX-512) or as two factors (AVX2), so that results down to fp32's subnormals round right;
// <= 1 ulp where normal; with it the 8-lane forward took 28% less time than with the general Sleef expf that
// at::vec calls, which it still does off x86). LLADAPTER_SWIGLU_ISA=auto (default) | avx512 | vec picks a path (read
// per call, cpu_isa.h's cpu_use_avx512; avx512 where the CPU lacks it is an error). fp64 is a plain loop (the gradcheck
// path). The elements are split over threads by at::parallel_for in flat index order; a row's last partial step goes
// through the same vector code (masked, or on a padded copy), so every element is computed by the same instructions
// whatever the split: results do not depend on the thread count.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>

#include "../swiglu.h"
#include "cpu_isa.h"
#include "vec_utils.h"

#if defined(CPU_CAPABILITY_AVX2) && defined(__x86_64__)
#include <immintrin.h>
#define LL_SWIGLU_X86 1
#else
#define LL_SWIGLU_X86 0
#endif
// The AVX-512 path needs GCC's per-region target pragma (clang would need target attributes instead).
#if LL_SWIGLU_X86 && defined(__GNUC__) && !defined(__clang__)
#define LL_SWIGLU_AVX512 1
#else
#define LL_SWIGLU_AVX512 0
#endif

namespace lladapter::cpu {
namespace {

// Each parallel chunk gets at least this many elements (smaller tensors stay on one thread).
constexpr int64_t kGrain = 1 << 15;

// exp(x) for x <= 0 or NaN: under the x86 AVX2 build the same reduction and polynomial as the AVX-512 path's
// exp_nonpositive in 8 lanes (the forward took 28% less time with it than with Sleef's general expf8_u10, which
// at::vec calls; a NaN comes out as 0, as there), elsewhere at::vec's exp.
inline fVec exp_nonpositive(const fVec& xv) {
#if LL_SWIGLU_X86
  const __m256 x = _mm256_max_ps(xv, _mm256_set1_ps(-110.f));
  const __m256 q = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fmadd_ps(q, _mm256_set1_ps(-0.693145751953125f), x);
  r = _mm256_fmadd_ps(q, _mm256_set1_ps(-1.42860682e-6f), r);
  __m256 p = _mm256_set1_ps(1.98263180e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.39460084e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.33343063e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.16662693e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.166666657f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(r, r), p, r), _mm256_set1_ps(1.f));
  const __m256i n = _mm256_cvtps_epi32(q);
  const __m256i n1 = _mm256_srai_epi32(n, 1), n2 = _mm256_sub_epi32(n, n1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 p1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  const __m256 p2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  return fVec(_mm256_mul_ps(_mm256_mul_ps(p, p1), p2));
#else
  return xv.exp();
#endif
}

// s = sigmoid(g) and sn = 1 - s from e = exp(-|g|) (no overflow for any g; NaN stays NaN: g >= 0 is false).
inline void sigmoid_parts(const fVec& g, fVec& s, fVec& sn) {
  const fVec one(1.f);
  const fVec e = exp_nonpositive(g.abs().neg());
  const fVec r = (one + e).reciprocal();
  const fVec er = e * r;
  const fVec pos = g >= fVec(0.f);
  s = fVec::blendv(er, r, pos);
  sn = fVec::blendv(r, er, pos);
}

inline void sigmoid_parts(double g, double& s, double& sn) {
  const double e = std::exp(-std::abs(g));
  const double r = 1.0 / (1.0 + e);
  const double er = e * r;
  s = g >= 0 ? r : er;
  sn = g >= 0 ? er : r;
}

#if LL_SWIGLU_AVX512
// Everything between push_options and pop_options is compiled for AVX-512 and only ever called after the run-time
// check (use_avx512): no function outside it, and no inline function of a shared header, gets AVX-512 code.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 on the intrinsics' own _mm512_undefined_* values
namespace avx512 {

using V = __m512;

inline V load(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline V load(const at::BFloat16* p, __mmask16 m) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
inline V load(const at::Half* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }

inline void store(float* p, V v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
// Round to nearest even, NaN to bf16's quiet NaN 0x7FC0 (as c10::BFloat16's conversion does); one word permute then
// gathers the high halves (6-10% faster than shifting and narrowing with vpmovdw, the same bits).
inline void store(at::BFloat16* p, V v, __mmask16 m) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC00000));
  const __m512i high_halves = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 31, 29, 27, 25, 23, 21,
                                               19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  _mm256_mask_storeu_epi16(p, m, _mm512_castsi512_si256(_mm512_permutexvar_epi16(high_halves, r)));
}
inline void store(at::Half* p, V v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// exp(x) for x <= 0 or NaN. x is clamped at -110 (exp(-110) rounds to 0; a NaN comes out as 0, which is fine here:
// every output multiplies by gate itself, so a NaN gate still gives NaN). n = rint(x log2 e), r = x - n ln 2 in two
// parts (Cody-Waite: ln 2 to 16 bits, so n * that part is exact, plus the rest), e^r = 1 + r + r^2 P(r) with P of
// degree 5 fitted to (e^r - 1 - r) / r^2 on [-ln2/2, ln2/2] (0.77 ulp at most over the interval, fp32 Horner), times
// 2^n by vscalefps, which rounds subnormal results correctly.
inline V exp_nonpositive(V x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-110.f));
  const V q = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  V r = _mm512_fmadd_ps(q, _mm512_set1_ps(-0.693145751953125f), x);
  r = _mm512_fmadd_ps(q, _mm512_set1_ps(-1.42860682e-6f), r);
  V p = _mm512_set1_ps(1.98263180e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.39460084e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.33343063e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.16662693e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.166666657f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(r, r), p, r), _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, q);
}

// s = sigmoid(g), sn = 1 - s, as the vec path forms them (but for the reciprocal).
inline void sigmoid_parts(V g, V& s, V& sn) {
  const V neg_abs = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(g), _mm512_set1_epi32(INT32_MIN)));
  const V e = exp_nonpositive(neg_abs);
  // r = 1 / d, d = 1 + e in [1, 2]: a 14-bit estimate and one Newton step (~2^-28 relative before rounding, within
  // an ulp; the forward took 10% less time than with a 512-bit divide)
  const V d = _mm512_add_ps(_mm512_set1_ps(1.f), e);
  V r = _mm512_rcp14_ps(d);
  r = _mm512_fmadd_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(1.f)), r);
  const V er = _mm512_mul_ps(e, r);
  const __mmask16 pos = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_GE_OQ);
  s = _mm512_mask_blend_ps(pos, er, r);
  sn = _mm512_mask_blend_ps(pos, r, er);
}

// kIn 2: (gate, up) -> y; kIn 3: (grad, gate, up) -> (dgate, dup). Same formulas as Forward / Backward below.
template <int kIn>
inline void math(const V* in, V* out) {
  V s, sn;
  if constexpr (kIn == 2) {
    sigmoid_parts(in[0], s, sn);
    out[0] = _mm512_mul_ps(_mm512_mul_ps(in[0], s), in[1]);
  } else {
    sigmoid_parts(in[1], s, sn);
    const V t = _mm512_mul_ps(s, _mm512_fmadd_ps(in[1], sn, _mm512_set1_ps(1.f)));
    out[0] = _mm512_mul_ps(_mm512_mul_ps(in[0], in[2]), t);
    out[1] = _mm512_mul_ps(in[0], _mm512_mul_ps(in[1], s));
  }
}

template <int kIn, int kOut, typename scalar_t>
void row_segment(const scalar_t* const* in, scalar_t* const* out, int64_t c0, int64_t c1) {
  V a[kIn], b[kOut];
  for (int64_t c = c0; c < c1; c += 16) {
    const __mmask16 m = c1 - c >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (c1 - c)) - 1);
    for (int k = 0; k < kIn; ++k) a[k] = load(in[k] + c, m);
    math<kIn>(a, b);
    for (int k = 0; k < kOut; ++k) store(out[k] + c, b[k], m);
  }
}

}  // namespace avx512
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif  // LL_SWIGLU_AVX512

// Whether this call runs the AVX-512 path (LLADAPTER_SWIGLU_ISA, default auto: where the CPU has it; cpu_isa.h).
bool use_avx512() {
  return cpu_use_avx512("LLADAPTER_SWIGLU_ISA", "vec", LL_SWIGLU_AVX512,
                        "this build has no AVX-512 path (it needs GCC and an x86-64 AVX2 build, setup.py cpu_isa)");
}

struct Forward {
  static constexpr int kIn = 2, kOut = 1;
  // in: gate, up; out: y
  static void vec(const fVec* in, fVec* out) {
    fVec s, sn;
    sigmoid_parts(in[0], s, sn);
    out[0] = in[0] * s * in[1];
  }
  static void scalar(const double* in, double* out) {
    double s, sn;
    sigmoid_parts(in[0], s, sn);
    out[0] = in[0] * s * in[1];
  }
};

struct Backward {
  static constexpr int kIn = 3, kOut = 2;
  // in: grad, gate, up; out: dgate, dup
  static void vec(const fVec* in, fVec* out) {
    fVec s, sn;
    sigmoid_parts(in[1], s, sn);
    const fVec one(1.f);
    out[0] = in[0] * in[2] * (s * at::vec::fmadd(in[1], sn, one));
    out[1] = in[0] * (in[1] * s);
  }
  static void scalar(const double* in, double* out) {
    double s, sn;
    sigmoid_parts(in[1], s, sn);
    out[0] = in[0] * in[2] * (s * std::fma(in[1], sn, 1.0));
    out[1] = in[0] * (in[1] * s);
  }
};

// One step of the vec path: kStep elements of every input (fp32: one vector; bf16/fp16: two, converted together,
// as at::vec converts a full reduced-precision vector to two fp32 ones and back) through Op.
template <typename Op, typename scalar_t>
struct VecStep {
  static constexpr int64_t kStep = std::is_same_v<scalar_t, float> ? kFVecSize : 2 * kFVecSize;
  static void run(const scalar_t* const* in, scalar_t* const* out, int64_t c) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      fVec a[Op::kIn], b[Op::kOut];
      for (int k = 0; k < Op::kIn; ++k) a[k] = fVec::loadu(in[k] + c);
      Op::vec(a, b);
      for (int k = 0; k < Op::kOut; ++k) b[k].store(out[k] + c);
    } else {
      using rVec = at::vec::Vectorized<scalar_t>;
      fVec lo[Op::kIn], hi[Op::kIn], blo[Op::kOut], bhi[Op::kOut];
      for (int k = 0; k < Op::kIn; ++k)
        std::tie(lo[k], hi[k]) = at::vec::convert_to_float<scalar_t>(rVec::loadu(in[k] + c));
      Op::vec(lo, blo);
      Op::vec(hi, bhi);
      for (int k = 0; k < Op::kOut; ++k) at::vec::convert_from_float<scalar_t>(blo[k], bhi[k]).store(out[k] + c);
    }
  }
};

// Elements [c0, c1) of one row: inputs at in[k] (the row's start), outputs at out[k].
template <typename Op, typename scalar_t>
void row_segment(const scalar_t* const* in, scalar_t* const* out, int64_t c0, int64_t c1) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    double a[Op::kIn], b[Op::kOut];
    for (int64_t c = c0; c < c1; ++c) {
      for (int k = 0; k < Op::kIn; ++k) a[k] = in[k][c];
      Op::scalar(a, b);
      for (int k = 0; k < Op::kOut; ++k) out[k][c] = b[k];
    }
  } else {
    using Step = VecStep<Op, scalar_t>;
    constexpr int64_t W = Step::kStep;
    int64_t c = c0;
    for (; c + W <= c1; c += W) Step::run(in, out, c);
    if (c < c1) {  // the partial step: the same code on zero-padded copies
      const int64_t m = c1 - c;
      scalar_t buf[Op::kIn + Op::kOut][W];
      const scalar_t* bin[Op::kIn];
      scalar_t* bout[Op::kOut];
      for (int k = 0; k < Op::kIn; ++k) {
        std::fill_n(buf[k], W, scalar_t(0));
        std::copy_n(in[k] + c, m, buf[k]);
        bin[k] = buf[k];
      }
      for (int k = 0; k < Op::kOut; ++k) bout[k] = buf[Op::kIn + k];
      Step::run(bin, bout, 0);
      for (int k = 0; k < Op::kOut; ++k) std::copy_n(buf[Op::kIn + k], m, out[k] + c);
    }
  }
}

// Runs Op over the [rows, n] view: inputs with their row strides, outputs contiguous.
template <typename Op, typename scalar_t>
void run(const SwigluRows& v, at::Tensor* outs) {
  const scalar_t* in[Op::kIn];
  scalar_t* out[Op::kOut];
  for (int k = 0; k < Op::kIn; ++k) in[k] = v.t[k].const_data_ptr<scalar_t>();
  for (int k = 0; k < Op::kOut; ++k) out[k] = outs[k].mutable_data_ptr<scalar_t>();
  const int64_t n = v.n;
  bool avx512 = false;
  if constexpr (!std::is_same_v<scalar_t, double>) avx512 = use_avx512();
  at::parallel_for(0, v.rows * n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin / n; r * n < end; ++r) {
      const int64_t c0 = std::max(begin - r * n, int64_t(0)), c1 = std::min(end - r * n, n);
      const scalar_t* rin[Op::kIn];
      scalar_t* rout[Op::kOut];
      for (int k = 0; k < Op::kIn; ++k) rin[k] = in[k] + r * v.stride[k];
      for (int k = 0; k < Op::kOut; ++k) rout[k] = out[k] + r * n;
#if LL_SWIGLU_AVX512
      if constexpr (!std::is_same_v<scalar_t, double>) {
        if (avx512) {
          avx512::row_segment<Op::kIn, Op::kOut, scalar_t>(rin, rout, c0, c1);
          continue;
        }
      }
#endif
      row_segment<Op, scalar_t>(rin, rout, c0, c1);
    }
  });
  (void)avx512;
}

at::Tensor swiglu_cpu(const at::Tensor& gate, const at::Tensor& up) {
  swiglu_check_inputs("lladapter::swiglu", gate, up, kCpuKernels);
  at::Tensor y = at::empty(gate.sizes(), gate.options());
  if (gate.numel() == 0) return y;
  const SwigluRows v = swiglu_rows({gate, up});
  dispatch_float_types("lladapter::swiglu", gate.scalar_type(),
                       [&]<typename scalar_t>() { run<Forward, scalar_t>(v, &y); });
  return y;
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward_cpu(const at::Tensor& grad, const at::Tensor& gate,
                                                       const at::Tensor& up) {
  swiglu_check_backward_inputs(grad, gate, up, kCpuKernels);
  at::Tensor outs[2] = {at::empty(gate.sizes(), gate.options()), at::empty(gate.sizes(), gate.options())};
  if (gate.numel() > 0) {
    const SwigluRows v = swiglu_rows({grad, gate, up});
    dispatch_float_types("lladapter::swiglu_backward", gate.scalar_type(),
                         [&]<typename scalar_t>() { run<Backward, scalar_t>(v, outs); });
  }
  return {outs[0], outs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(lladapter, CPU, m) {
  m.impl("swiglu", &swiglu_cpu);
  m.impl("swiglu_backward", &swiglu_backward_cpu);
}

}  // namespace lladapter::cpu
