// The CUDA gated prompt attention is three sets of kernels behind one dispatcher (gated_prompt_attention.cu):
//   SIMT           gated_prompt_attention.cu         every dtype and head dim the op takes; forward and backward
//   tensor-core    gated_prompt_attention_mma.cu     bf16/fp16 wmma forward and word-branch backward, sm_80+
//   split-K decode gated_prompt_attention_decode.cu  forward for few query rows over many keys
// This header is how the dispatcher talks to the other two files. See docs/gated_prompt_attention.md.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <optional>

#include "../gated_prompt_attention.h"
#include "compat_host.h"

namespace lladapter::cuda_impl {

// The inputs as every kernel reads them (prepare() in gated_prompt_attention.cu): q, k, v contiguous (except for the
// split-K decode kernels, whose k and v may be a KV cache's first Tk rows: dense rows, a larger batch stride); pk, pv
// contiguous, or undefined when there are no prompt keys; kv_start int64 contiguous ([B] or [B, Tq]) or undefined; phi
// = phi(gate) and dphi = phi'(gate), fp32 [H], or undefined without a gate.
struct AttnTensors {
  at::Tensor q, k, v, pk, pv, kv_start, phi, dphi;
};

// The backward's statistics and outputs: dout contiguous in q's dtype; lse, plse (the forward's), Dw = dout .
// out_word and Dp = dout . prompt_out (the SIMT pre pass), fp32 [B, H, Tq] contiguous; dq, dk, dv zero-filled,
// contiguous, shaped like q, k, v.
struct AttnBackwardTensors {
  at::Tensor dout, lse, plse, Dw, Dp, dq, dk, dv;
};

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<const T*>(t.const_data_ptr()) : nullptr;
}

inline bool aligned16(const at::Tensor& t) {
  return !t.defined() || t.numel() == 0 || ll::aligned_to(t.const_data_ptr(), 16);
}

// ---------------------------------------------------------------- split-K decode forward
// (gated_prompt_attention_decode.cu)
constexpr int64_t kDecodeMaxTq = 4;       // query rows per (b, h) up to which the forward counts as decode
constexpr int64_t kDecodeMinChunk = 128;  // fewest keys per chunk in auto mode (CPU: 2 key blocks of 64)
constexpr int64_t kDecodeTileKeys = 32;   // keys per shared-memory tile: the smallest chunk ("splitk" mode)

// How the word keys are split (passed to the kernels by value).
struct DecodePlan {
  int64_t rows;             // rep * Tq: query rows of one (b, kv head)
  int64_t row_groups;       // blocks over those rows
  int64_t nsplit;           // chunks of the word keys per batch row
  int64_t kv_batch_stride;  // elements between the batch rows of k and v (a KV-cache view's exceeds Tk * Hkv * d)
  bool vec16;               // k and v storage (and every batch row) 16-byte aligned: vector loads
};

// The plan for chunks of at least min_chunk keys on a device with sm_count SMs; nullopt when the grid would not
// fit a launch.
std::optional<DecodePlan> plan_decode(const GatedPromptAttentionProblem& g, const AttnTensors& t, int64_t min_chunk,
                                      int64_t sm_count);
void launch_decode_forward(const GatedPromptAttentionProblem& g, const DecodePlan& plan, const AttnTensors& t,
                           at::Tensor& out, at::Tensor& lse, at::Tensor& plse);

// ---------------------------------------------------------------- tensor cores (gated_prompt_attention_mma.cu)
// Whether the tensor-core kernels take the call: bf16 or fp16, head dim in {64, 80, 96, 128}, kv_start absent or
// [B], an sm_80+ device with enough opt-in shared memory, the grid within launch limits, and every tensor in
// t and in `io` (the outputs, and dout) contiguous and 16-byte aligned.
bool mma_supports(const GatedPromptAttentionProblem& g, const AttnTensors& t,
                  std::initializer_list<const at::Tensor*> io, const ll::DeviceProps& props, bool backward);
// out, lse, plse as the SIMT forward writes them.
void launch_mma_forward(const GatedPromptAttentionProblem& g, const AttnTensors& t, at::Tensor& out, at::Tensor& lse,
                        at::Tensor& plse);
// dq (both branches), dk and dv (word keys); the caller has run the D pass and computes dpk, dpv, dgate itself.
void launch_mma_backward(const GatedPromptAttentionProblem& g, const AttnTensors& t, AttnBackwardTensors& b);

}  // namespace lladapter::cuda_impl
