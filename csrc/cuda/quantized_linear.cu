// Weight-only quantized matmul, CUDA: y [M, N] = x [M, K] @ W^T with W's int8 / int4 codes dequantised in registers
// (csrc/quantized_linear.h has the formats). A plain GEMV for the few rows of a decode step, fp32 accumulation, no
// atomics (each output is summed in a fixed order: deterministic). x rows go in chunks of kRowsChunk per pass over
// the codes.
//   int8: one warp per output row; lanes stride over the inputs (coalesced byte loads), warp_sum at the end.
//   int4: one block of kWarps warps per 32-row block of pack_int4's layout (or the trailing 16-row block); lane r
//         owns row r of the block, so the warp reads each input's 16 (8) code bytes together; warp w takes groups
//         w, w + kWarps, ... and the warps' partial sums are added in warp order through shared memory.
// dequantize_rows: the weight's rows written out in a float dtype for the training / prefill GEMMs (cuBLAS), one block
// per output row (not yet timed on a GPU; run by the emulator).
#include "../quantized_linear.h"
#include "compat_host.h"
#include "device_utils.cuh"
#include "ops_cuda.h"

namespace lladapter::cuda_impl {
namespace {

constexpr int kRowsChunk = 4;  // rows of x per pass over the codes
constexpr int kWarps = 4;      // warps per block

template <typename scalar_t, typename scale_t>
__global__ void quantized_linear_int8_kernel(const scalar_t* __restrict__ x, const int8_t* __restrict__ codes,
                                             const scale_t* __restrict__ scales, scalar_t* __restrict__ y, int64_t M,
                                             int64_t N, int64_t K, int64_t group, bool per_row) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (n >= N) return;  // whole warps leave
  const int lane = threadIdx.x;
  const int8_t* c = codes + n * K;
  const int64_t G = per_row ? 1 : K / group;
  const float row_scale = per_row ? static_cast<float>(scales[n]) : 1.f;
  for (int64_t m0 = 0; m0 < M; m0 += kRowsChunk) {
    const int64_t mt = M - m0 < kRowsChunk ? M - m0 : kRowsChunk;
    float acc[kRowsChunk];
#pragma unroll
    for (int t = 0; t < kRowsChunk; ++t) acc[t] = 0.f;
    for (int64_t k = lane; k < K; k += 32) {
      const float s = per_row ? 1.f : static_cast<float>(scales[n * G + k / group]);
      const float w = static_cast<float>(c[k]) * s;
#pragma unroll
      for (int t = 0; t < kRowsChunk; ++t)
        if (t < mt) acc[t] = fmaf(static_cast<float>(x[(m0 + t) * K + k]), w, acc[t]);
    }
#pragma unroll
    for (int t = 0; t < kRowsChunk; ++t) {
      const float v = warp_sum(acc[t]);  // every lane, every t: the shuffles need the whole warp
      if (lane == 0 && t < mt) y[(m0 + t) * N + n] = static_cast<scalar_t>(v * row_scale);
    }
  }
}

template <typename scalar_t, typename scale_t>
__global__ void quantized_linear_int4_kernel(const scalar_t* __restrict__ x, const uint8_t* __restrict__ codes,
                                             const scale_t* __restrict__ scale_low, scalar_t* __restrict__ y, int64_t M,
                                             int64_t N, int64_t K, int64_t group) {
  LL_SHARED(float, part, [kWarps][kRowsChunk][32]);
  const int r = threadIdx.x, w = threadIdx.y;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * 32;
  const bool tail = n0 + 32 > N;  // pack_int4's trailing block of 16 rows
  const bool active = !tail || r < 16;
  const int64_t n = n0 + r;
  const uint8_t* blk = codes + n0 * (K / 2);
  const int64_t stride = tail ? 8 : 16;  // code bytes per input
  const int byte = tail ? r / 2 : r % 16;
  const int shift = tail ? 4 * (r % 2) : 4 * (r / 16);
  const int64_t G = K / group;
  for (int64_t m0 = 0; m0 < M; m0 += kRowsChunk) {
    const int64_t mt = M - m0 < kRowsChunk ? M - m0 : kRowsChunk;
    float acc[kRowsChunk];
#pragma unroll
    for (int t = 0; t < kRowsChunk; ++t) acc[t] = 0.f;
    if (active) {
      for (int64_t g = w; g < G; g += kWarps) {
        const float s = static_cast<float>(scale_low[(g * N + n) * 2]);
        const float lo = static_cast<float>(scale_low[(g * N + n) * 2 + 1]);
        for (int64_t k = g * group; k < (g + 1) * group; ++k) {
          const float wv = fmaf(static_cast<float>((blk[k * stride + byte] >> shift) & 15), s, lo);
#pragma unroll
          for (int t = 0; t < kRowsChunk; ++t)
            if (t < mt) acc[t] = fmaf(static_cast<float>(x[(m0 + t) * K + k]), wv, acc[t]);
        }
      }
    }
#pragma unroll
    for (int t = 0; t < kRowsChunk; ++t) part[w][t][r] = acc[t];
    __syncthreads();
    if (w == 0 && active) {
      for (int t = 0; t < mt; ++t) {
        float v = 0.f;
        for (int ww = 0; ww < kWarps; ++ww) v += part[ww][t][r];
        y[(m0 + t) * N + n] = static_cast<scalar_t>(v);
      }
    }
    __syncthreads();  // part is rewritten by the next chunk of rows
  }
}

// dequantize_rows: one block per output row, its threads striding over the inputs (coalesced writes, the codes of
// one row read once). Values as quantize.dequantize computes them: code * scale (int8), q * scale + low (int4) with a
// rounded product and a rounded sum (__fmul_rn / __fadd_rn: never an FMA, so the result equals the reference's
// bitwise), rounded once to out's dtype.
constexpr int kDequantThreads = 128;

template <typename out_t, typename scale_t>
__global__ void dequantize_rows_int8_kernel(const int8_t* __restrict__ codes, const scale_t* __restrict__ scales,
                                            out_t* __restrict__ out, int64_t K, int64_t group, bool per_row,
                                            int64_t row_start) {
  const int64_t n = row_start + blockIdx.x;
  const int8_t* c = codes + n * K;
  out_t* o = out + static_cast<int64_t>(blockIdx.x) * K;
  const int64_t G = per_row ? 1 : K / group;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const float s = static_cast<float>(scales[per_row ? n : n * G + k / group]);
    o[k] = static_cast<out_t>(__fmul_rn(static_cast<float>(c[k]), s));
  }
}

template <typename out_t, typename scale_t>
__global__ void dequantize_rows_int4_kernel(const uint8_t* __restrict__ codes, const scale_t* __restrict__ scale_low,
                                            out_t* __restrict__ out, int64_t N, int64_t K, int64_t group,
                                            int64_t row_start) {
  const int64_t n = row_start + blockIdx.x;
  const int64_t n0 = n / 32 * 32;
  const bool tail = n0 + 32 > N;  // pack_int4's trailing block of 16 rows
  const int r = static_cast<int>(n - n0);
  const uint8_t* blk = codes + n0 * (K / 2);
  const int64_t stride = tail ? 8 : 16;  // code bytes per input
  const int byte = tail ? r / 2 : r % 16;
  const int shift = tail ? 4 * (r % 2) : 4 * (r / 16);
  out_t* o = out + static_cast<int64_t>(blockIdx.x) * K;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const int64_t g = k / group;
    const float s = static_cast<float>(scale_low[(g * N + n) * 2]);
    const float lo = static_cast<float>(scale_low[(g * N + n) * 2 + 1]);
    const float q = static_cast<float>((blk[k * stride + byte] >> shift) & 15);
    o[k] = static_cast<out_t>(__fadd_rn(__fmul_rn(q, s), lo));
  }
}

template <typename out_t, typename scale_t>
void launch_dequantize(const DequantizeRowsShape& sh, const at::Tensor& codes, const at::Tensor& scales,
                       at::Tensor& out) {
  const ll::Stream stream = ll::current_stream();
  const dim3 grid(static_cast<unsigned>(sh.row_end - sh.row_start)), block(kDequantThreads);
  auto* op = out.mutable_data_ptr<out_t>();
  const auto* sp = scales.const_data_ptr<scale_t>();
  if (sh.format == QuantFormat::kInt8) {
    LL_LAUNCH(grid, block, 0, stream, dequantize_rows_int8_kernel<out_t, scale_t>)(
        codes.const_data_ptr<int8_t>(), sp, op, sh.K, sh.group, scales.dim() == 1, sh.row_start);
  } else {
    LL_LAUNCH(grid, block, 0, stream, dequantize_rows_int4_kernel<out_t, scale_t>)(
        codes.const_data_ptr<uint8_t>(), sp, op, sh.N, sh.K, sh.group, sh.row_start);
  }
  LL_LAUNCH_CHECK();
}

template <typename out_t>
void launch_dequantize_for_scales(const DequantizeRowsShape& sh, const at::Tensor& codes, const at::Tensor& scales,
                                  at::Tensor& out) {
  switch (scales.scalar_type()) {
    case at::kFloat:
      return launch_dequantize<out_t, float>(sh, codes, scales, out);
    case at::kHalf:
      return launch_dequantize<out_t, at::Half>(sh, codes, scales, out);
    case at::kBFloat16:
      return launch_dequantize<out_t, at::BFloat16>(sh, codes, scales, out);
    default:
      TORCH_CHECK(false, "lladapter::dequantize_rows: unsupported scales dtype ", scales.scalar_type());
  }
}

template <typename scalar_t, typename scale_t>
void launch(const QuantizedLinearShape& sh, const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
            at::Tensor& y) {
  const ll::Stream stream = ll::current_stream();
  const auto* xp = x.const_data_ptr<scalar_t>();
  const auto* sp = scales.const_data_ptr<scale_t>();
  auto* yp = y.mutable_data_ptr<scalar_t>();
  const dim3 block(32, kWarps);
  if (sh.format == QuantFormat::kInt8) {
    const dim3 grid(static_cast<unsigned>((sh.N + kWarps - 1) / kWarps));
    LL_LAUNCH(grid, block, 0, stream, quantized_linear_int8_kernel<scalar_t, scale_t>)(
        xp, codes.const_data_ptr<int8_t>(), sp, yp, sh.M, sh.N, sh.K, sh.group, scales.dim() == 1);
  } else {
    const dim3 grid(static_cast<unsigned>((sh.N + 31) / 32));
    LL_LAUNCH(grid, block, 0, stream, quantized_linear_int4_kernel<scalar_t, scale_t>)(
        xp, codes.const_data_ptr<uint8_t>(), sp, yp, sh.M, sh.N, sh.K, sh.group);
  }
  LL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_for_scales(const QuantizedLinearShape& sh, const at::Tensor& x, const at::Tensor& codes,
                       const at::Tensor& scales, at::Tensor& y) {
  switch (scales.scalar_type()) {
    case at::kFloat:
      return launch<scalar_t, float>(sh, x, codes, scales, y);
    case at::kHalf:
      return launch<scalar_t, at::Half>(sh, x, codes, scales, y);
    case at::kBFloat16:
      return launch<scalar_t, at::BFloat16>(sh, x, codes, scales, y);
    default:
      TORCH_CHECK(false, "lladapter::quantized_linear: unsupported scales dtype ", scales.scalar_type());
  }
}

}  // namespace

at::Tensor quantized_linear_cuda(const at::Tensor& x_in, const at::Tensor& codes_in, const at::Tensor& scales_in) {
  const QuantizedLinearShape sh = quantized_linear_check_inputs(x_in, codes_in, scales_in, ll::kTarget);
  const ll::DeviceGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor codes = codes_in.contiguous();
  const at::Tensor scales = scales_in.contiguous();
  at::Tensor y = x.new_empty({sh.M, sh.N});
  if (sh.M == 0 || sh.N == 0) return y;
  switch (x.scalar_type()) {
    case at::kFloat:
      launch_for_scales<float>(sh, x, codes, scales, y);
      break;
    case at::kBFloat16:
      launch_for_scales<at::BFloat16>(sh, x, codes, scales, y);
      break;
    case at::kHalf:
      launch_for_scales<at::Half>(sh, x, codes, scales, y);
      break;
    default:
      TORCH_CHECK(false, "lladapter::quantized_linear: unsupported dtype ", x.scalar_type());
  }
  return y;
}

void dequantize_rows_cuda(const at::Tensor& codes_in, const at::Tensor& scales_in, int64_t row_start, int64_t row_end,
                          at::Tensor& out) {
  const DequantizeRowsShape sh =
      dequantize_rows_check_inputs(codes_in, scales_in, row_start, row_end, out, ll::kTarget);
  if (row_start == row_end) return;
  const ll::DeviceGuard guard(codes_in.device());
  const at::Tensor codes = codes_in.contiguous();
  const at::Tensor scales = scales_in.contiguous();
  switch (out.scalar_type()) {
    case at::kFloat:
      return launch_dequantize_for_scales<float>(sh, codes, scales, out);
    case at::kBFloat16:
      return launch_dequantize_for_scales<at::BFloat16>(sh, codes, scales, out);
    case at::kHalf:
      return launch_dequantize_for_scales<at::Half>(sh, codes, scales, out);
    default:
      TORCH_CHECK(false, "lladapter::dequantize_rows: unsupported out dtype ", out.scalar_type());
  }
}

}  // namespace lladapter::cuda_impl
