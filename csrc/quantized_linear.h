// Weight-only quantized matmul: argument checks shared by the CPU and CUDA kernels (and mirrored, word for word, by
// the fake implementation in lladapter_ext/ops.py).
//   y [M, N] = x [M, K] @ W^T, W dequantised on the fly (never materialised), fp32 accumulation, y in x's dtype.
// The format follows from codes' dtype (as lladapter_ext.quantize.QuantizedLinear stores them):
//   int8   codes int8 [N, K]; scales [N] (one per output row) or [N, K / g] (one per block of g inputs: GGUF Q8_0,
//          g = 32); w[n, k] = codes[n, k] * scale
//   int4   codes uint8 [N, K / 2] packed two per byte in quantize.pack_int4's layout (N a multiple of 16: rows in
//          blocks of 32 stored input by input, 16 bytes per input, row i in the low nibble and row 16 + i in the high
//          one; a last block of 16 rows pairs row 2p (low) with 2p + 1 (high)); scales [G, N, 2] = (scale, low) per
//          group of K / G inputs; w[n, k] = q * scale + low
// scales: float32, float16 or bfloat16.
#pragma once

#include <string>

#include "common.h"

namespace lladapter {

enum class QuantFormat { kInt8, kInt4 };

struct QuantizedLinearShape {
  QuantFormat format;
  int64_t M, N, K;
  int64_t group;  // inputs per scale (int8 with per-row scales: K)
};

// The scales' shape for codes of a weight [N, K] in either format (and int4's 16-row blocks); returns the inputs per
// scale (int8 with one scale per row: K). Shared by quantized_linear's and dequantize_rows' checks.
inline int64_t check_quantized_scales(const char* op, const at::Tensor& codes, const at::Tensor& scales, int64_t N,
                                      int64_t K) {
  if (codes.scalar_type() == at::kChar) {
    if (scales.dim() == 1) {
      TORCH_CHECK(scales.size(0) == N, op, ": scales (int8, one per row) must have shape [", N,
                  "] (codes.size(0)), got ", shape_str(scales));
      return K;
    }
    TORCH_CHECK(scales.dim() == 2 && scales.size(0) == N && scales.size(1) > 0 && K % scales.size(1) == 0, op,
                ": scales (int8) must have shape [", N, "] (one per row) or [", N,
                ", K / g] with g inputs per block dividing K = ", K, ", got ", shape_str(scales));
    return K / scales.size(1);
  }
  TORCH_CHECK(N % 16 == 0, op, ": codes (int4) must have a multiple of 16 rows (the packed layout's blocks), got ",
              shape_str(codes));
  TORCH_CHECK(
      scales.dim() == 3 && scales.size(1) == N && scales.size(2) == 2 && scales.size(0) > 0 && K % scales.size(0) == 0,
      op, ": scales (int4) must have shape [G, ", N, ", 2] (scale and low of each of G groups, G dividing K = ", K,
      "), got ", shape_str(scales));
  return K / scales.size(0);
}

inline QuantizedLinearShape quantized_linear_check_inputs(const at::Tensor& x, const at::Tensor& codes,
                                                          const at::Tensor& scales, const KernelTarget& target) {
  constexpr const char* op = "lladapter::quantized_linear";
  check_device(op, "x", x, target.device);
  check_device(op, "codes", codes, target.device);
  check_device(op, "scales", scales, target.device);
  check_same_device(op, "codes", codes, "x", x);
  check_same_device(op, "scales", scales, "x", x);
  check_float_dtype(op, "x", x, target);
  TORCH_CHECK(x.dim() == 2, op, ": x must have shape [M, K], got ", shape_str(x));
  check_dtype_in(op, "codes", codes, {at::kChar, at::kByte});
  check_dtype_in(op, "scales", scales, {at::kFloat, at::kHalf, at::kBFloat16});
  TORCH_CHECK(codes.dim() == 2, op, ": codes must have shape [N, K] (int8) or [N, K / 2] (int4, packed), got ",
              shape_str(codes));
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0);
  TORCH_CHECK(K > 0, op, ": x's input dimension K (x.size(1)) must be positive, got x of shape ", shape_str(x));
  QuantizedLinearShape s{QuantFormat::kInt8, M, N, K, K};
  if (codes.scalar_type() == at::kChar) {
    TORCH_CHECK(codes.size(1) == K, op, ": codes (int8) must have shape [N, ", K, "] (K = x.size(1)), got ",
                shape_str(codes));
  } else {
    s.format = QuantFormat::kInt4;
    TORCH_CHECK(codes.size(1) * 2 == K, op, ": codes (int4, two per byte) must have shape [N, ", K / 2,
                "] (K / 2, K = x.size(1) even), got ", shape_str(codes), " for K = ", K);
  }
  s.group = check_quantized_scales(op, codes, scales, N, K);
  return s;
}

// dequantize_rows: rows [row_start, row_end) of the weight W (the formats above) written into out [rows, K], in
// out's dtype (fp32, bf16, fp16; fp64 on the CPU kernels), one pass: the codes are read once, each value computed in
// fp32 (fp64 for fp64 out) and rounded once to out's dtype. K follows from codes (int8: codes.size(1); int4: twice
// it). int4 ranges start on a 32-row block of pack_int4's layout and end on one or at N (the trailing 16-row block).
struct DequantizeRowsShape {
  QuantFormat format;
  int64_t N, K;
  int64_t group;  // inputs per scale (int8 with per-row scales: K)
  int64_t row_start, row_end;
};

inline DequantizeRowsShape dequantize_rows_check_inputs(const at::Tensor& codes, const at::Tensor& scales,
                                                        int64_t row_start, int64_t row_end, const at::Tensor& out,
                                                        const KernelTarget& target) {
  constexpr const char* op = "lladapter::dequantize_rows";
  check_device(op, "codes", codes, target.device);
  check_device(op, "scales", scales, target.device);
  check_device(op, "out", out, target.device);
  check_same_device(op, "scales", scales, "codes", codes);
  check_same_device(op, "out", out, "codes", codes);
  check_dtype_in(op, "codes", codes, {at::kChar, at::kByte});
  check_dtype_in(op, "scales", scales, {at::kFloat, at::kHalf, at::kBFloat16});
  check_float_dtype(op, "out", out, target);
  TORCH_CHECK(codes.dim() == 2, op, ": codes must have shape [N, K] (int8) or [N, K / 2] (int4, packed), got ",
              shape_str(codes));
  const bool int4 = codes.scalar_type() == at::kByte;
  const int64_t N = codes.size(0), K = int4 ? codes.size(1) * 2 : codes.size(1);
  TORCH_CHECK(K > 0, op, ": codes must have at least one input column (K > 0), got ", shape_str(codes));
  DequantizeRowsShape s{int4 ? QuantFormat::kInt4 : QuantFormat::kInt8, N, K, K, row_start, row_end};
  s.group = check_quantized_scales(op, codes, scales, N, K);
  TORCH_CHECK(0 <= row_start && row_start <= row_end && row_end <= N, op,
              ": rows [row_start, row_end) must lie within the weight's ", N, " rows (0 <= row_start <= row_end <= ", N,
              "), got row_start = ", row_start, ", row_end = ", row_end);
  if (int4) {
    TORCH_CHECK((row_start % 32 == 0 || row_start == N) && (row_end % 32 == 0 || row_end == N), op,
                ": int4 rows [row_start, row_end) must start and end on the packed layout's 32-row blocks (or at N = ",
                N, "), got row_start = ", row_start, ", row_end = ", row_end);
  }
  TORCH_CHECK(out.dim() == 2 && out.size(0) == row_end - row_start && out.size(1) == K, op, ": out must have shape [",
              row_end - row_start, ", ", K, "] (row_end - row_start, K), got ", shape_str(out));
  TORCH_CHECK(out.is_contiguous(), op, ": out must be contiguous (its rows are written in place), got strides ",
              out.strides());
  return s;
}

namespace cpu {
// The CPU kernel's path (csrc/cpu/quantized_linear.cpp): "avx512", "avx2" or "scalar". isa "" asks which one runs;
// a name forces that path for this process (an error when this build or CPU cannot run it: the message says why);
// "auto" goes back to the default: the environment variable LLADAPTER_QUANTIZED_LINEAR_ISA (read once) when it is
// set, else the best path this CPU has. Returns the path that ran before the call. Registered as the op
// lladapter::quantized_linear_cpu_isa (csrc/ops.cpp).
std::string quantized_linear_cpu_isa(std::string isa);
}  // namespace cpu

}  // namespace lladapter
