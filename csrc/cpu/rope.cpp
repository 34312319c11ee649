// RoPE CPU kernels: (batch, seq) rows in parallel (at::parallel_for); within a row the cos/sin of the row's
// position are shared by all q and k heads. fp32 lanes via at::vec (the interleaved layout de-interleaves pairs
// into two vectors and re-interleaves the result); fp64 is a plain loop for gradcheck.
// q/k may be any strided view whose last dim is contiguous (e.g. slices of a fused qkv projection).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstring>

#include "../rope.h"
#include "vec_utils.h"

namespace lladapter::cpu {
namespace {

// One tensor's side of the launch: read from `in`, write to `out` (the same pointer for the in-place variant).
template <typename scalar_t>
struct HeadsView {
  const scalar_t* in;
  scalar_t* out;
  int64_t in_sb, in_st, in_sh;
  int64_t out_sb, out_st, out_sh;
  int64_t heads;
};

// HF rotate_half: pairs (i, i + half).  Every element is loaded before its slot is stored, so x == y is fine.
template <typename scalar_t>
void rotate_half_head(const scalar_t* x, scalar_t* y, const float* c, const float* s, int64_t half, float sign) {
  int64_t i = 0;
  if constexpr (!std::is_same_v<scalar_t, double>) {
    const fVec sg(sign);
    for (; i + kFVecSize <= half; i += kFVecSize) {
      const fVec a = load_as_float(x + i), b = load_as_float(x + half + i);
      const fVec cv = fVec::loadu(c + i), sv = fVec::loadu(s + i) * sg;
      store_from_float(y + i, a * cv - b * sv);
      store_from_float(y + half + i, a * sv + b * cv);
    }
  }
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  for (; i < half; ++i) {
    const acc_t a = static_cast<acc_t>(x[i]), b = static_cast<acc_t>(x[half + i]);
    const acc_t cv = c[i], sv = static_cast<acc_t>(s[i]) * static_cast<acc_t>(sign);
    y[i] = static_cast<scalar_t>(a * cv - b * sv);
    y[half + i] = static_cast<scalar_t>(a * sv + b * cv);
  }
}

// Meta interleaved: pairs (2i, 2i + 1).
template <typename scalar_t>
void rotate_interleaved_head(const scalar_t* x, scalar_t* y, const float* c, const float* s, int64_t half, float sign) {
  int64_t i = 0;
  if constexpr (!std::is_same_v<scalar_t, double>) {
    const fVec sg(sign);
    for (; i + kFVecSize <= half; i += kFVecSize) {
      const auto [a, b] = at::vec::deinterleave2(load_as_float(x + 2 * i), load_as_float(x + 2 * i + kFVecSize));
      const fVec cv = fVec::loadu(c + i), sv = fVec::loadu(s + i) * sg;
      const auto [lo, hi] = at::vec::interleave2(a * cv - b * sv, a * sv + b * cv);
      store_from_float(y + 2 * i, lo);
      store_from_float(y + 2 * i + kFVecSize, hi);
    }
  }
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  for (; i < half; ++i) {
    const acc_t a = static_cast<acc_t>(x[2 * i]), b = static_cast<acc_t>(x[2 * i + 1]);
    const acc_t cv = c[i], sv = static_cast<acc_t>(s[i]) * static_cast<acc_t>(sign);
    y[2 * i] = static_cast<scalar_t>(a * cv - b * sv);
    y[2 * i + 1] = static_cast<scalar_t>(a * sv + b * cv);
  }
}

template <typename scalar_t>
void rope_impl(const HeadsView<scalar_t>& qv, const HeadsView<scalar_t>& kv, const RopeGeometry& g, const float* cos,
               const float* sin, const int64_t* pos, int64_t pos_sb, int64_t pos_st, int64_t offset, bool interleaved,
               bool inverse, bool copy_pass) {
  const int64_t rows = g.B * g.T, half = g.half, rd = 2 * half, pass = g.d - rd;
  const float sign = inverse ? -1.f : 1.f;
  const int64_t per_row = std::max<int64_t>(1, (g.Hq + g.Hk) * g.d);
  const int64_t grain = std::max<int64_t>(1, 32768 / per_row);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / g.T, t = r % g.T;
      const int64_t p = pos ? pos[b * pos_sb + t * pos_st] : offset + t;  // range checked before the launch
      const float* c = cos + p * half;
      const float* s = sin + p * half;
      for (const HeadsView<scalar_t>* v : {&qv, &kv}) {
        const scalar_t* xrow = v->in + b * v->in_sb + t * v->in_st;
        scalar_t* yrow = v->out + b * v->out_sb + t * v->out_st;
        for (int64_t h = 0; h < v->heads; ++h) {
          const scalar_t* x = xrow + h * v->in_sh;
          scalar_t* y = yrow + h * v->out_sh;
          if (interleaved) {
            rotate_interleaved_head(x, y, c, s, half, sign);
          } else {
            rotate_half_head(x, y, c, s, half, sign);
          }
          if (copy_pass && pass > 0) std::memcpy(y + rd, x + rd, sizeof(scalar_t) * pass);
        }
      }
    }
  });
}

// Explicit position ids are checked on the host before anything is written (cheap: B*T int64 reads).
void check_position_ids(const char* op, const at::Tensor& pos, int64_t P) {
  const int64_t* p = pos.const_data_ptr<int64_t>();
  const int64_t n0 = pos.size(0), n1 = pos.size(1), s0 = pos.stride(0), s1 = pos.stride(1);
  for (int64_t i = 0; i < n0; ++i) {
    for (int64_t j = 0; j < n1; ++j) {
      const int64_t v = p[i * s0 + j * s1];
      TORCH_CHECK(v >= 0 && v < P, op, ": position_ids[", i, ", ", j, "] = ", v, " is outside the cos/sin table of ", P,
                  " positions [0, ", P, "); build a longer table");
    }
  }
}

template <typename scalar_t>
HeadsView<scalar_t> heads_view(const at::Tensor& in, at::Tensor& out) {
  return HeadsView<scalar_t>{in.const_data_ptr<scalar_t>(),
                             out.mutable_data_ptr<scalar_t>(),
                             in.stride(0),
                             in.stride(1),
                             in.stride(2),
                             out.stride(0),
                             out.stride(1),
                             out.stride(2),
                             in.size(2)};
}

// q_in/k_in: last dim contiguous. q_out/k_out: the destinations (== inputs for the in-place variant).
void launch(const char* op, const at::Tensor& q_in, const at::Tensor& k_in, at::Tensor& q_out, at::Tensor& k_out,
            const at::Tensor& cos_in, const at::Tensor& sin_in, const std::optional<at::Tensor>& position_ids,
            int64_t offset, bool interleaved, bool inverse, const RopeGeometry& g, bool copy_pass) {
  if (g.B * g.T == 0 || g.Hq + g.Hk == 0) return;
  const at::Tensor cos = cos_in.contiguous(), sin = sin_in.contiguous();
  const int64_t* pos = nullptr;
  int64_t pos_sb = 0, pos_st = 0;
  if (position_ids.has_value()) {
    check_position_ids(op, *position_ids, g.P);
    pos = position_ids->const_data_ptr<int64_t>();
    pos_sb = position_ids->size(0) == 1 ? 0 : position_ids->stride(0);  // [1, T]: shared by the batch
    pos_st = position_ids->stride(1);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q_in.scalar_type(), "lladapter_rope_cpu", [&] {
    rope_impl<scalar_t>(heads_view<scalar_t>(q_in, q_out), heads_view<scalar_t>(k_in, k_out), g,
                        cos.const_data_ptr<float>(), sin.const_data_ptr<float>(), pos, pos_sb, pos_st, offset,
                        interleaved, inverse, copy_pass);
  });
}

at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); }

std::tuple<at::Tensor, at::Tensor> rope_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                            const at::Tensor& sin, const std::optional<at::Tensor>& position_ids,
                                            int64_t offset, bool interleaved, bool inverse) {
  constexpr const char* op = "lladapter::rope";
  const RopeGeometry g = rope_check_inputs(op, q, k, cos, sin, position_ids, offset, kCpuKernels);
  const at::Tensor qi = last_dim_contiguous(q), ki = last_dim_contiguous(k);
  at::Tensor q_out = at::empty(q.sizes(), q.options()), k_out = at::empty(k.sizes(), k.options());
  launch(op, qi, ki, q_out, k_out, cos, sin, position_ids, offset, interleaved, inverse, g, /*copy_pass=*/true);
  return {q_out, k_out};
}

void rope_inplace_cpu(at::Tensor& q, at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
                      const std::optional<at::Tensor>& position_ids, int64_t offset, bool interleaved, bool inverse) {
  constexpr const char* op = "lladapter::rope_";
  const RopeGeometry g = rope_check_inputs(op, q, k, cos, sin, position_ids, offset, kCpuKernels);
  rope_check_inplace(op, q, k);
  // a last dim with a stride is rare: rotate a contiguous copy and write it back
  at::Tensor qw = last_dim_contiguous(q), kw = last_dim_contiguous(k);
  launch(op, qw, kw, qw, kw, cos, sin, position_ids, offset, interleaved, inverse, g, /*copy_pass=*/false);
  if (!qw.is_same(q)) q.copy_(qw);
  if (!kw.is_same(k)) k.copy_(kw);
}

}  // namespace

TORCH_LIBRARY_IMPL(lladapter, CPU, m) {
  m.impl("rope", &rope_cpu);
  m.impl("rope_", &rope_inplace_cpu);
}

}  // namespace lladapter::cpu
