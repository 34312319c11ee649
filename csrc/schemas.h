// The schemas of every lladapter op, in one place. The real kernels register them under torch.ops.lladapter
// (csrc/ops.cpp); the CUDA emulator registers the same schemas under torch.ops.lladapter_emu, so that the CUDA
// kernels, run on the CPU, are called with exactly the signatures the GPU build has.
#pragma once

#include <torch/library.h>

namespace lladapter {

inline void define_op_schemas(torch::Library& m) {
  // RMSNorm: returns (y, rstd); rstd is fp32 (fp64 for fp64 x) with x's leading shape.
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor rstd) -> (Tensor, Tensor)");

  // RoPE: rotate q [B, T, Hq, d] and k [B, T, Hk, d] by pos * theta_i from fp32 tables cos/sin [P, rd/2];
  // pos = offset + t or position_ids [B|1, T] (int64). interleaved: Meta pairs (2i, 2i+1), else HF rotate_half
  // pairs (i, i + rd/2); features rd..d pass through. inverse: rotate by the negated angle (the backward).
  m.def(
      "rope(Tensor q, Tensor k, Tensor cos, Tensor sin, Tensor? position_ids, SymInt offset, bool interleaved, "
      "bool inverse) -> (Tensor, Tensor)");
  // In place, for inference: writes through q and k, allocates nothing when their last dim is contiguous.
  m.def(
      "rope_(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin, Tensor? position_ids, SymInt offset, "
      "bool interleaved, bool inverse) -> ()");

  // Gated prompt attention (LLaMA-Adapter). Returns (out, lse, prompt_lse): lse / prompt_lse are the fp32 (fp64 for
  // fp64 q) log-sum-exps of the scaled scores of the word and the prompt branch, [B, H, Tq], -inf where empty.
  // The backward returns (dq, dk, dv, dpk, dpv, dgate); dpk/dpv are [0] when pk is None, dgate [0] when gate is.
  m.def(
      "gated_prompt_attention(Tensor q, Tensor k, Tensor v, Tensor? pk, Tensor? pv, Tensor? gate, "
      "Tensor? kv_start, bool causal, str gate_act, float scale) -> (Tensor, Tensor, Tensor)");
  m.def(
      "gated_prompt_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? pk, Tensor? pv, "
      "Tensor? gate, Tensor? kv_start, Tensor out, Tensor lse, Tensor prompt_lse, bool causal, str gate_act, "
      "float scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");

  // Weight-only quantized matmul: y [M, N] = x [M, K] @ W^T with W dequantised on the fly (csrc/quantized_linear.h:
  // int8 codes [N, K] with scales [N] or [N, K / g]; int4 codes uint8 [N, K / 2] in quantize.pack_int4's layout with
  // (scale, low) [G, N, 2]); fp32 accumulation (fp64 for fp64 x), y in x's dtype. No gradient to codes or scales.
  m.def("quantized_linear(Tensor x, Tensor codes, Tensor scales) -> Tensor");
  // The same weight's rows [row_start, row_end) dequantised into out [row_end - row_start, K] in out's dtype (fp32
  // math, fp64 for fp64 out; int4 ranges on 32-row block boundaries or ending at N), one pass over the codes: the
  // training GEMMs' weight, written into the caller's reused buffer. Not differentiable (frozen weights).
  m.def("dequantize_rows(Tensor codes, Tensor scales, int row_start, int row_end, Tensor(a!) out) -> ()");

  // SwiGLU (csrc/swiglu.h): y = silu(gate) * up, elementwise over any shape (gate and up alike, >= 1 dim), fp32 math
  // (fp64 for fp64), y in gate's dtype. The backward returns (dgate, dup).
  m.def("swiglu(Tensor gate, Tensor up) -> Tensor");
  m.def("swiglu_backward(Tensor grad, Tensor gate, Tensor up) -> (Tensor, Tensor)");
}

}  // namespace lladapter
