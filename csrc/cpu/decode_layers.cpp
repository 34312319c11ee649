// decode_layers (csrc/decode_layers.h): the decoder layer loop of a no-grad, KV-cached forward in C++. Each step is
// exactly what model.py's TransformerBlock / Attention / FeedForward / KVCache.write / few_rows_linear do, in the
// same order, so the results are the Python loop's, bit for bit (tests/test_generation.py checks torch.equal). On
// the gemv route three steps are merged without changing a bit: q/k/v and w1/w3 are one parallel region each
// (few_rows_gemv_group), and the residual adds are the GEMV's epilogue; the KV-cache write is a memcpy.
#include "decode_layers.h"

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/add.h>
#include <ATen/ops/index_add.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mm.h>
#include <c10/util/Exception.h>

#include <cstring>
#include <tuple>

namespace lladapter {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// The registered ops' signatures (csrc/schemas.h), looked up once (the real kernels' namespace, never the emulator's).
using RmsNormFn = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, double);
using RopeFn = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                          c10::SymInt, bool, bool);
using AttentionFn = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                                       const OptTensor&, const OptTensor&, const OptTensor&, bool,
                                                       std::string, double);
using SwigluFn = Tensor(const Tensor&, const Tensor&);

struct Ops {
  c10::TypedOperatorHandle<RmsNormFn> rms_norm;
  c10::TypedOperatorHandle<RopeFn> rope;
  c10::TypedOperatorHandle<AttentionFn> attention;
  c10::TypedOperatorHandle<SwigluFn> swiglu;

  static const Ops& get() {
    static const Ops ops = [] {
      auto& d = c10::Dispatcher::singleton();
      return Ops{d.findSchemaOrThrow("lladapter::rms_norm", "").typed<RmsNormFn>(),
                 d.findSchemaOrThrow("lladapter::rope", "").typed<RopeFn>(),
                 d.findSchemaOrThrow("lladapter::gated_prompt_attention", "").typed<AttentionFn>(),
                 d.findSchemaOrThrow("lladapter::swiglu", "").typed<SwigluFn>()};
    }();
    return ops;
  }
};

enum class Route { kLinear, kTransposed, kGemv, kOpenblas };

Route parse_route(const std::string& route) {
  if (route == "linear") return Route::kLinear;
  if (route == "transposed") return Route::kTransposed;
  if (route == "gemv") return Route::kGemv;
  if (route == "openblas") return Route::kOpenblas;
  TORCH_CHECK(false, "decode_layers: linear_route must be 'linear', 'transposed', 'gemv' or 'openblas', got '", route,
              "'");
}

// The rows of x as a 2-D [rows, K] matrix (its last dim K), and x's shape with the last dim n (the projection's).
int64_t rows_of(const Tensor& x) {
  const int64_t K = x.size(-1);
  return K ? x.numel() / K : 0;
}

std::vector<int64_t> with_last_dim(const Tensor& x, int64_t n) {
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = n;
  return shape;
}

// nn.linear: x @ w^T, (w @ x^T)^T with at least two rows, few_rows_gemv or openblas_mm, as its route says.
Tensor linear(const Tensor& x, const Tensor& w, Route route) {
  const int64_t rows = rows_of(x);
  if (route == Route::kOpenblas && rows >= 1) {
    return openblas_mm(x.reshape({rows, x.size(-1)}), w.t(), std::nullopt).view(with_last_dim(x, w.size(0)));
  }
  if (route == Route::kGemv && rows >= 1) {
    return few_rows_gemv(x.reshape({rows, x.size(-1)}), w).view(with_last_dim(x, w.size(0)));
  }
  if (route == Route::kTransposed && rows >= 1) {
    Tensor x2 = x.reshape({rows, x.size(-1)});
    if (rows == 1) x2 = at::cat({x2, x2});
    return at::mm(w, x2.t()).slice(1, 0, rows).t().contiguous().view(with_last_dim(x, w.size(0)));
  }
  return at::linear(x, w);
}

// linear(x, w) for each weight, all with x's K (q/k/v, w1/w3): on the gemv route one parallel region for all.
std::vector<Tensor> linears(const Tensor& x, const std::vector<Tensor>& ws, Route route) {
  const int64_t rows = rows_of(x);
  std::vector<Tensor> out;
  if (route == Route::kGemv && rows >= 1) {
    out = few_rows_gemv_group(x.reshape({rows, x.size(-1)}), ws);
    for (size_t j = 0; j < ws.size(); ++j) out[j] = out[j].view(with_last_dim(x, ws[j].size(0)));
    return out;
  }
  for (const Tensor& w : ws) out.push_back(linear(x, w, route));
  return out;
}

// x + linear(a, w): on the gemv route the add is the GEMV's epilogue (same bits as at::add, no separate op call).
Tensor add_linear(const Tensor& x, const Tensor& a, const Tensor& w, Route route) {
  const int64_t rows = rows_of(a);
  if (route == Route::kGemv && rows >= 1 && x.is_contiguous() && x.scalar_type() == a.scalar_type()) {
    return few_rows_gemv(a.reshape({rows, a.size(-1)}), w, x.view({rows, w.size(0)})).view(x.sizes());
  }
  return at::add(x, linear(a, w, route));
}

// KVCache.write: rows [cached, cached + T) of cache [B, max_len, Hkv, d] from src [B, T, Hkv, d]; one memcpy per
// batch row where both are dense there (a decode step's few rows), else Tensor::copy_.
void write_cache(const Tensor& cache, int64_t cached, const Tensor& src) {
  const int64_t B = src.size(0), T = src.size(1), row = src.size(2) * src.size(3);
  if (src.is_contiguous() && src.scalar_type() == cache.scalar_type() && cache.size(0) == B && cache.stride(3) == 1 &&
      cache.stride(2) == src.size(3) && cache.stride(1) == row && cache.size(2) == src.size(2) &&
      cache.size(3) == src.size(3)) {
    const int64_t bytes = T * row * src.element_size();
    const char* from = static_cast<const char*>(src.const_data_ptr());
    char* to = static_cast<char*>(cache.mutable_data_ptr()) + cached * row * cache.element_size();
    for (int64_t b = 0; b < B; ++b)
      std::memcpy(to + b * cache.stride(0) * cache.element_size(), from + b * bytes, bytes);
    return;
  }
  cache.slice(1, cached, cached + T).copy_(src);
}

}  // namespace

Tensor decode_layers(const Tensor& h, const std::vector<Tensor>& weights, const std::vector<double>& norm_eps,
                     const std::vector<Tensor>& k_cache, const std::vector<Tensor>& v_cache,
                     const std::vector<OptTensor>& prompt_k, const std::vector<OptTensor>& prompt_v,
                     const std::vector<OptTensor>& gate, const std::vector<std::vector<RowPromptGroup>>& row_prompts,
                     int64_t cached, const Tensor& positions, const Tensor& cos, const Tensor& sin,
                     const OptTensor& kv_start, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim,
                     bool rope_interleaved, const std::string& gate_act, double scale,
                     const std::string& linear_route) {
  const Route route = parse_route(linear_route);
  const size_t L = k_cache.size();
  TORCH_CHECK(weights.size() == 9 * L && norm_eps.size() == 2 * L && v_cache.size() == L && prompt_k.size() == L &&
                  prompt_v.size() == L && gate.size() == L && row_prompts.size() == L,
              "decode_layers: per layer 9 weights, 2 eps, one k/v cache and prompt_k/prompt_v/gate/row_prompts "
              "entry; got ",
              weights.size(), " weights, ", norm_eps.size(), " eps, ", L, "/", v_cache.size(), " k/v caches, ",
              prompt_k.size(), "/", prompt_v.size(), "/", gate.size(), "/", row_prompts.size(), " prompt entries");
  TORCH_CHECK(h.dim() == 3, "decode_layers: h must be [B, T, D], got ", h.sizes());
  const int64_t B = h.size(0), T = h.size(1), end = cached + T;
  for (size_t i = 0; i < L; ++i) {
    TORCH_CHECK(
        k_cache[i].dim() == 4 && v_cache[i].dim() == 4 && k_cache[i].size(1) >= end && v_cache[i].size(1) >= end,
        "decode_layers: layer ", i, "'s k/v cache must be [B, max_len >= ", end, ", Hkv, d], got ", k_cache[i].sizes(),
        " and ", v_cache[i].sizes());
  }
  const Ops& ops = Ops::get();
  at::AutoDispatchBelowAutograd below_autograd;  // no graph is recorded (the caller runs under no_grad)
  Tensor x = h;
  for (size_t i = 0; i < L; ++i) {
    const Tensor* w = weights.data() + 9 * i;
    // attention: x + wo(attention(rope(wq xn), rope(wk xn), wv xn)), xn = attention_norm(x)
    const Tensor xn = std::get<0>(ops.rms_norm.call(x, w[0], norm_eps[2 * i]));
    const std::vector<Tensor> qkv = linears(xn, {w[1], w[2], w[3]}, route);
    const Tensor q = qkv[0].view({B, T, n_heads, head_dim});
    const Tensor k = qkv[1].view({B, T, n_kv_heads, head_dim});
    const Tensor v = qkv[2].view({B, T, n_kv_heads, head_dim});
    auto [qr_all, kr] = ops.rope.call(q, k, cos, sin, positions, c10::SymInt(0), rope_interleaved, false);
    write_cache(k_cache[i], cached, kr);  // KVCache.write
    write_cache(v_cache[i], cached, v);
    Tensor out = std::get<0>(ops.attention.call(qr_all, k_cache[i].slice(1, 0, end), v_cache[i].slice(1, 0, end),
                                                prompt_k[i], prompt_v[i], gate[i], kv_start, true, gate_act, scale));
    for (const auto& [index, pk, pv, phi] : row_prompts[i]) {  // RowPrompts.add_to
      const Tensor qr = index ? qr_all.index_select(0, *index) : qr_all;
      const Tensor no_keys = pk.new_empty({qr.size(0), 0, pk.size(2), pk.size(3)});
      const Tensor ones = at::ones({qr.size(2)}, qr.options().dtype(at::kFloat));
      const Tensor prompt =
          std::get<0>(ops.attention.call(qr, no_keys, no_keys, pk, pv, ones, std::nullopt, false, "identity", scale));
      const Tensor gated = at::mul(prompt.to(at::kFloat), phi).to(out.scalar_type());
      out = index ? out.index_add(0, *index, gated) : at::add(out, gated);
    }
    x = add_linear(x, out.reshape({B, T, n_heads * head_dim}), w[4], route);
    // feed-forward: x + w2(swiglu(w1 xn, w3 xn)), xn = ffn_norm(x)
    const Tensor fn = std::get<0>(ops.rms_norm.call(x, w[5], norm_eps[2 * i + 1]));
    const std::vector<Tensor> gate_up = linears(fn, {w[6], w[7]}, route);
    const Tensor act = ops.swiglu.call(gate_up[0], gate_up[1]);
    x = add_linear(x, act, w[8], route);
  }
  return x;
}

}  // namespace lladapter
