// decode_layers: every decoder layer of a no-grad, KV-cached forward (LlamaForCausalLM.forward's layer loop) in one
// C++ call. A decode step makes ~500 op calls of microseconds each between its weight-streaming GEMVs; from Python
// each also pays the interpreter and module calls, on caches that the GEMVs just flushed. Here the same ops run in
// the same order with the same arguments (the results are bit-identical to the Python loop), through the dispatcher.
// The Python side (model.py, _decode_layers_args) decides when the loop qualifies and prepares the arguments.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace lladapter {

// Per layer i, weights[9 i .. 9 i + 8] = attention_norm, wq, wk, wv, wo, ffn_norm, w1, w3, w2 (nn.Linear layout
// [out, in]); norm_eps[2 i], norm_eps[2 i + 1] the two RMSNorms' eps; k_cache[i], v_cache[i] [B, max_len, Hkv, d]
// (positions [cached, cached + T) are written); prompt_k/prompt_v/gate[i]: the adapter's prompt keys/values and gate,
// or None for a layer without a prompt; row_prompts[i]: serving's per-row prompt groups of the layer
// (kv_cache.RowPrompts.groups: row index or None for every row, prompt keys, values, phi [rows, 1, H, 1]), added
// to the word attention as RowPrompts.add_to does. h [B, T, D]: the embeddings; returns the last layer's output.
// positions [B, T] int64, cos/sin the RoPE tables, kv_start [B] (left padding) or None. linear_route: the route of
// nn.linear that every projection (all have B * T rows) takes, as the Python layers would: "linear" (at::linear),
// "transposed" ((w @ x^T)^T, at least two rows), "gemv" (few_rows_gemv below) or "openblas" (openblas_mm below).
using RowPromptGroup = std::tuple<std::optional<at::Tensor>, at::Tensor, at::Tensor, at::Tensor>;

at::Tensor decode_layers(const at::Tensor& h, const std::vector<at::Tensor>& weights,
                         const std::vector<double>& norm_eps, const std::vector<at::Tensor>& k_cache,
                         const std::vector<at::Tensor>& v_cache, const std::vector<std::optional<at::Tensor>>& prompt_k,
                         const std::vector<std::optional<at::Tensor>>& prompt_v,
                         const std::vector<std::optional<at::Tensor>>& gate,
                         const std::vector<std::vector<RowPromptGroup>>& row_prompts, int64_t cached,
                         const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
                         const std::optional<at::Tensor>& kv_start, int64_t n_heads, int64_t n_kv_heads,
                         int64_t head_dim, bool rope_interleaved, const std::string& gate_act, double scale,
                         const std::string& linear_route);

// few_rows_gemv (csrc/cpu/few_rows_gemv.cpp): x [rows, K] @ weight [N, K]^T for 1 to kFewRowsGemvMaxRows fp32 or bf16
// rows (fp32 sums) on the CPU, the weights streamed on every thread; nn.few_rows_linear's "gemv" route. No autograd of
// its own (refused where grad mode is on and an input requires grad): nn.few_rows_linear wraps it with F.linear's
// backward. With residual [rows, N] (contiguous, x's dtype): residual + x @ weight^T, bit for bit what at::add of the
// residual and the plain result gives (the decode loop's residual adds, done while the rows are in cache).
constexpr int64_t kFewRowsGemvMaxRows = 16;
at::Tensor few_rows_gemv(const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>& residual = std::nullopt);
// x @ w^T for each of several weights with x's K (the decode loop's q/k/v and w1/w3), in one parallel region: the
// same bits as few_rows_gemv on each weight alone.
std::vector<at::Tensor> few_rows_gemv_group(const at::Tensor& x, const std::vector<at::Tensor>& weights);

// openblas_mm (csrc/cpu/openblas_mm.cpp): a [M, K] @ b [K, N] for float32 CPU matrices (row-major or transposed
// views; others are copied) with the sgemm of an OpenBLAS loaded by openblas_load, split over torch's intra-op
// threads; into out [M, N] (row-major, not overlapping a or b) when given. nn.gemm_route's "openblas" route. No
// autograd (nn._OpenblasLinear has it).
std::string openblas_load(const std::string& path);
std::string openblas_library();  // the loaded library's path, "" if none
at::Tensor openblas_mm(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& out);

}  // namespace lladapter
