// Tensor-core (wmma) forward and word-branch backward of gated prompt attention; the SIMT kernels in
// prompt_attention.cu call them and keep every case they do not take. See prompt_attention_mma.cu and
// docs/attention.md.
#pragma once

#include <ATen/ATen.h>

namespace lladapter::cuda_impl {

// Runs the tensor-core forward into out / lse / prompt_lse and returns true when the call is eligible:
// bf16 or fp16, head dim in {64, 80, 96, 128}, kv_start absent or [B] int64, an sm_80+ device, contiguous 16-byte
// aligned inputs, and LLADAPTER_CUDA_ATTN unset, empty or "mma" (read on every call; "simt" forces the SIMT
// kernel, any other value is an error). Otherwise it does nothing and returns false.
// Inputs as the SIMT forward prepares them: q, k, v contiguous; pk/pv contiguous or undefined (no prompt keys);
// kv_start int64 or undefined; phi = phi(gate) fp32 [H] or undefined; out [B, Tq, H, d] in q's dtype; lse and
// prompt_lse fp32 [B, H, Tq].
bool try_prompt_attn_mma_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pk,
                                 const at::Tensor& pv, const at::Tensor& kv_start, const at::Tensor& phi, bool causal,
                                 double scale, at::Tensor& out, at::Tensor& lse, at::Tensor& prompt_lse);

// Runs the tensor-core backward of the word branch into dq, dk, dv and returns true when the call is eligible
// (the same conditions as the forward, with dout in place of out). dq gets both branches (the prompt part is a
// second loop of the same kernel); dk, dv the word keys. The caller has already run the D pass (Dw = dout .
// out_word, Dp = dout . prompt_out, fp32 [B, H, Tq]) and computes dpk, dpv and dgate itself. Otherwise it does
// nothing and returns false (the caller runs the SIMT dq and dk/dv kernels).
// Inputs as for the forward; dout contiguous in q's dtype; lse, prompt_lse, Dw, Dp fp32 [B, H, Tq] contiguous;
// dq, dk, dv contiguous, shaped like q, k, v.
bool try_prompt_attn_mma_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pk,
                                  const at::Tensor& pv, const at::Tensor& kv_start, const at::Tensor& phi,
                                  const at::Tensor& dout, const at::Tensor& lse, const at::Tensor& prompt_lse,
                                  const at::Tensor& Dw, const at::Tensor& Dp, bool causal, double scale,
                                  at::Tensor& dq, at::Tensor& dk, at::Tensor& dv);

}  // namespace lladapter::cuda_impl
