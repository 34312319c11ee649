// Gated prompt attention (LLaMA-Adapter zero-init attention): the problem description and the argument checks
// shared by every attention kernel (CPU, CUDA SIMT, tensor-core and split-K decode).
//
//   out_i = sum_j a_ij v_j + phi(g_h) * sum_p b_ip pv_p
//   a_ij = softmax over allowed word keys j of s*q_i.k_j   (causal: j <= i + Tk - Tq; kv_start [B]: j >= kv_start[b],
//          left padding; kv_start [B, Tq]: j >= kv_start[b, i], per query: with causal, block-diagonal causal
//          attention of packed sequences when kv_start[b, i] is the first index of the sequence holding token i)
//   b_ip = softmax over the K prompt keys of s*q_i.pk_p    (a separate softmax; prompts are never masked)
// Layouts: q [B, Tq, H, d]; k, v [B, Tk, Hkv, d]; pk, pv [Bp, K, Hkv, d], Bp in {1, B}; gate [H];
// query head h reads kv head h / (H / Hkv). A row with no allowed word key gets 0 from the word branch.
// The forward also returns the log-sum-exp (in units of the scaled scores) of each branch per (b, h, i),
// fp32 (fp64 for fp64 q), -inf where the branch has no key; the backward recomputes probabilities from them.
#pragma once

#include <cmath>
#include <optional>
#include <string>
#include <tuple>

#include "common.h"

namespace lladapter {

// One attention call as every kernel sees it (passed by value to the CUDA kernels: plain fields only).
struct GatedPromptAttentionProblem {
  int64_t B, Tq, Tk, H, Hkv, d;
  int64_t K;          // prompt keys (0: plain attention)
  int64_t Bp;         // prompt batch: 1 (one prompt shared by the batch) or B
  int64_t rep;        // H / Hkv: query heads per kv head
  bool causal;        // word keys j <= i + Tk - Tq
  bool has_prompt;    // pk/pv given with K > 0
  bool tanh_gate;     // phi = tanh (else identity)
  bool kv_per_query;  // kv_start given with shape [B, Tq] (else [B] or absent)
  double scale;       // of the scores q.k (the kernels compute in their accumulation type)
};

inline bool gated_prompt_attention_gate_is_tanh(const char* op, const std::string& gate_act) {
  TORCH_CHECK(gate_act == "tanh" || gate_act == "identity", op, ": gate_act must be 'tanh' or 'identity', got '",
              gate_act, "'");
  return gate_act == "tanh";
}

inline at::ScalarType gated_prompt_attention_stat_dtype(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline GatedPromptAttentionProblem gated_prompt_attention_check_inputs(
    const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& pk,
    const std::optional<at::Tensor>& pv, const std::optional<at::Tensor>& gate,
    const std::optional<at::Tensor>& kv_start, const std::string& gate_act, bool causal, double scale,
    const KernelTarget& target) {
  GatedPromptAttentionProblem s{};
  s.causal = causal;
  s.scale = scale;
  s.tanh_gate = gated_prompt_attention_gate_is_tanh(op, gate_act);
  check_device(op, "q", q, target.device);
  check_device(op, "k", k, target.device);
  check_device(op, "v", v, target.device);
  check_same_device(op, "k", k, "q", q);
  check_same_device(op, "v", v, "q", q);
  check_float_dtype(op, "q", q, target);
  TORCH_CHECK(q.dim() == 4, op, ": q must have shape [B, Tq, H, d], got ", shape_str(q));
  TORCH_CHECK(k.dim() == 4, op, ": k must have shape [B, Tk, Hkv, d], got ", shape_str(k));
  TORCH_CHECK(v.sizes() == k.sizes(), op, ": v must have k's shape ", shape_str(k), ", got ", shape_str(v));
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), op, ": k must have q's dtype (", q.scalar_type(), "), got ",
              k.scalar_type());
  TORCH_CHECK(v.scalar_type() == q.scalar_type(), op, ": v must have q's dtype (", q.scalar_type(), "), got ",
              v.scalar_type());
  s.B = q.size(0);
  s.Tq = q.size(1);
  s.H = q.size(2);
  s.d = q.size(3);
  s.Tk = k.size(1);
  s.Hkv = k.size(2);
  TORCH_CHECK(s.d > 0, op, ": head dim d (q.size(3)) must be positive, got ", s.d);
  TORCH_CHECK(k.size(0) == s.B, op, ": k must have q's batch size ", s.B, " in dim 0, got k of shape ", shape_str(k));
  TORCH_CHECK(k.size(3) == s.d, op, ": k must have q's head dim d = ", s.d, " in dim 3, got k of shape ", shape_str(k));
  TORCH_CHECK(s.Hkv > 0 && s.H % s.Hkv == 0, op, ": the number of query heads H = ", s.H,
              " (q.size(2)) must be a multiple of the number of kv heads Hkv = ", s.Hkv, " (k.size(2))");
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  s.rep = s.H / s.Hkv;

  TORCH_CHECK(pk.has_value() == pv.has_value(), op, ": pk and pv must be given together (got pk ",
              pk.has_value() ? "given" : "None", ", pv ", pv.has_value() ? "given" : "None", ")");
  s.K = 0;
  s.Bp = 1;
  if (pk.has_value()) {
    const at::Tensor& P = *pk;
    check_device(op, "pk", P, target.device);
    check_device(op, "pv", *pv, target.device);
    check_same_device(op, "pk", P, "q", q);
    check_same_device(op, "pv", *pv, "q", q);
    TORCH_CHECK(P.dim() == 4, op, ": pk must have shape [Bp, K, Hkv, d], got ", shape_str(P));
    TORCH_CHECK(pv->sizes() == P.sizes(), op, ": pv must have pk's shape ", shape_str(P), ", got ", shape_str(*pv));
    TORCH_CHECK(P.scalar_type() == q.scalar_type(), op, ": pk must have q's dtype (", q.scalar_type(), "), got ",
                P.scalar_type());
    TORCH_CHECK(pv->scalar_type() == q.scalar_type(), op, ": pv must have q's dtype (", q.scalar_type(), "), got ",
                pv->scalar_type());
    TORCH_CHECK(P.size(0) == 1 || P.size(0) == s.B, op, ": pk's batch dim Bp must be 1 (shared prompt) or B = ", s.B,
                ", got pk of shape ", shape_str(P));
    TORCH_CHECK(P.size(2) == s.Hkv, op, ": pk must have k's number of kv heads Hkv = ", s.Hkv,
                " in dim 2, got pk of shape ", shape_str(P));
    TORCH_CHECK(P.size(3) == s.d, op, ": pk must have q's head dim d = ", s.d, " in dim 3, got pk of shape ",
                shape_str(P));
    s.Bp = P.size(0);
    s.K = P.size(1);
  }
  s.has_prompt = s.K > 0;
  if (gate.has_value()) {
    check_device(op, "gate", *gate, target.device);
    check_same_device(op, "gate", *gate, "q", q);
    TORCH_CHECK(gate->dim() == 1 && gate->size(0) == s.H, op, ": gate must have shape [", s.H,
                "] (one value per query head), got ", shape_str(*gate));
    check_dtype_in(op, "gate", *gate, {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf});
  } else {
    TORCH_CHECK(!pk.has_value(), op, ": gate must be given when pk/pv are given");
  }
  if (kv_start.has_value()) {
    check_device(op, "kv_start", *kv_start, target.device);
    check_same_device(op, "kv_start", *kv_start, "q", q);
    const bool per_row = kv_start->dim() == 1 && kv_start->size(0) == s.B;
    const bool per_query = kv_start->dim() == 2 && kv_start->size(0) == s.B && kv_start->size(1) == s.Tq;
    TORCH_CHECK(per_row || per_query, op, ": kv_start must have shape [", s.B,
                "] (one start index per batch row: left padding) or [", s.B, ", ", s.Tq,
                "] (one per query: packed sequences), got ", shape_str(*kv_start));
    check_dtype_in(op, "kv_start", *kv_start, {at::kLong, at::kInt});
    s.kv_per_query = per_query;
  }
  return s;
}

inline void gated_prompt_attention_check_backward_inputs(const char* op, const GatedPromptAttentionProblem& s,
                                                         const at::Tensor& grad_out, const at::Tensor& q,
                                                         const at::Tensor& out, const at::Tensor& lse,
                                                         const at::Tensor& prompt_lse, const KernelTarget& target) {
  check_device(op, "grad_out", grad_out, target.device);
  check_device(op, "out", out, target.device);
  check_device(op, "lse", lse, target.device);
  check_device(op, "prompt_lse", prompt_lse, target.device);
  check_same_device(op, "grad_out", grad_out, "q", q);
  check_same_device(op, "out", out, "q", q);
  check_same_device(op, "lse", lse, "q", q);
  check_same_device(op, "prompt_lse", prompt_lse, "q", q);
  TORCH_CHECK(grad_out.sizes() == q.sizes(), op, ": grad_out must have q's shape ", shape_str(q), ", got ",
              shape_str(grad_out));
  TORCH_CHECK(out.sizes() == q.sizes(), op, ": out must have q's shape ", shape_str(q), ", got ", shape_str(out));
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type(), op, ": grad_out must have q's dtype (", q.scalar_type(),
              "), got ", grad_out.scalar_type());
  TORCH_CHECK(out.scalar_type() == q.scalar_type(), op, ": out must have q's dtype (", q.scalar_type(), "), got ",
              out.scalar_type());
  const auto stat = gated_prompt_attention_stat_dtype(q);
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"lse", &lse}, {"prompt_lse", &prompt_lse}}) {
    TORCH_CHECK(t->dim() == 3 && t->size(0) == s.B && t->size(1) == s.H && t->size(2) == s.Tq, op, ": ", name,
                " must have shape [", s.B, ", ", s.H, ", ", s.Tq, "] ([B, H, Tq]), got ", shape_str(*t));
    TORCH_CHECK(t->scalar_type() == stat, op, ": ", name, " must have dtype ", stat, ", got ", t->scalar_type());
  }
}

// Whether k and v [B, Tk, Hkv, d] can be read in place although they need not be contiguous: dense rows (keys Hkv * d
// apart, heads d apart, unit stride) and one batch stride for both, at least a dense batch row: a KV cache's first Tk
// rows ([B, max_len, Hkv, d][:, :Tk]) as a decode step passes them, which would otherwise be copied every step.
inline bool gated_prompt_attention_kv_rows_dense(const at::Tensor& k, const at::Tensor& v,
                                                 const GatedPromptAttentionProblem& s) {
  const auto dense = [&](const at::Tensor& t) {
    return (s.d <= 1 || t.stride(3) == 1) && (s.Hkv <= 1 || t.stride(2) == s.d) &&
           (s.Tk <= 1 || t.stride(1) == s.Hkv * s.d) && (s.B <= 1 || t.stride(0) >= s.Tk * s.Hkv * s.d);
  };
  return dense(k) && dense(v) && k.stride(0) == v.stride(0);
}

// Zero-filled gradient buffers of the backward, as its schema returns them: dq, dk, dv like the (contiguous)
// inputs; dpk, dpv like pk (or [0] when there is no prompt); dgate [H] like gate (or fp32 [0] without a gate).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gated_prompt_attention_zero_grads(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const std::optional<at::Tensor>& pk, const std::optional<at::Tensor>& gate,
                                  int64_t H) {
  auto prompt_grad = [&] { return pk.has_value() ? q.new_zeros(pk->sizes()) : q.new_empty({0}); };
  return {q.new_zeros(q.sizes()), k.new_zeros(k.sizes()),
          v.new_zeros(v.sizes()), prompt_grad(),
          prompt_grad(),          gate.has_value() ? gate->new_zeros({H}) : q.new_empty({0}, at::kFloat)};
}

}  // namespace lladapter

namespace lladapter::cpu {

// The CPU kernels' BLAS block products, for the benchmark's matmul floor (benchmarks/bench_e2e.py times them alone):
// between start and stop, every sgemm call of the CPU attention kernels (forward and backward, every thread) is
// recorded as a row (m, n, k, lda, ldb, ldc, a_trans, b_trans, accumulate) of the returned int64 [N, 9] tensor.
void start_recording_attention_products();
at::Tensor stop_recording_attention_products();
// The recorded products again, same shapes, strides and transposes, on per-worker buffers of fixed values, dealt
// round-robin over torch's threads with each worker's BLAS sequential, as the kernels run them.
void replay_attention_products(const at::Tensor& products);

}  // namespace lladapter::cpu
