// RoPE: argument checks and the geometry shared by the CPU and CUDA kernels.
//
// q [B, T, Hq, d] and k [B, T, Hk, d] (Hq != Hk: grouped-query attention) rotate by angle pos * theta_i, read
// from fp32 tables cos/sin [P, rd/2] (rd = rotary dim <= d; features rd..d pass through unchanged).
// pos = offset + t, or position_ids[b, t] (int64, [B, T] or [1, T] shared by the batch).
//   interleaved (Meta): pairs (2i, 2i+1);  rotate_half (HF): pairs (i, i + rd/2);  for each pair (a, b):
//   a' = a cos - b sin,  b' = a sin + b cos   (inverse: sin -> -sin, the backward of the rotation).
// Math in fp32 (fp64 for fp64 inputs on CPU), result in the input dtype.
#pragma once

#include <ATen/MemoryOverlap.h>

#include <optional>

#include "common.h"

namespace lladapter {

struct RopeGeometry {
  int64_t B, T, Hq, Hk, d;
  int64_t half;  // rd / 2: pairs per head that rotate
  int64_t P;     // positions in the cos/sin tables
};

inline RopeGeometry rope_check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                      const at::Tensor& sin, const std::optional<at::Tensor>& position_ids,
                                      int64_t offset, const KernelTarget& target) {
  check_device(op, "q", q, target.device);
  check_device(op, "k", k, target.device);
  check_device(op, "cos", cos, target.device);
  check_device(op, "sin", sin, target.device);
  check_same_device(op, "k", k, "q", q);
  check_same_device(op, "cos", cos, "q", q);
  check_same_device(op, "sin", sin, "q", q);
  TORCH_CHECK(q.dim() == 4, op, ": q must have shape [batch, seq, heads, head_dim], got ", shape_str(q));
  TORCH_CHECK(k.dim() == 4, op, ": k must have shape [batch, seq, kv_heads, head_dim], got ", shape_str(k));
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1), op, ": k must have q's batch and seq sizes [",
              q.size(0), ", ", q.size(1), ", ...], got ", shape_str(k));
  TORCH_CHECK(k.size(3) == q.size(3), op, ": k's head_dim must equal q's head_dim (", q.size(3), "), got ", k.size(3),
              " (k of shape ", shape_str(k), ")");
  const int64_t d = q.size(3);
  TORCH_CHECK(d % 2 == 0, op, ": head_dim must be even (features rotate in pairs), got head_dim ", d, " (q of shape ",
              shape_str(q), ")");
  check_float_dtype(op, "q", q, target);
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), op, ": k must have q's dtype (", q.scalar_type(), "), got ",
              k.scalar_type());
  TORCH_CHECK(cos.scalar_type() == at::kFloat, op, ": cos must be a float32 table, got ", cos.scalar_type());
  TORCH_CHECK(sin.scalar_type() == at::kFloat, op, ": sin must be a float32 table, got ", sin.scalar_type());
  TORCH_CHECK(cos.dim() == 2 && cos.size(1) >= 1, op,
              ": cos must have shape [max_positions, rotary_dim / 2] with rotary_dim >= 2, got ", shape_str(cos));
  TORCH_CHECK(sin.sizes() == cos.sizes(), op, ": sin must have cos's shape ", shape_str(cos), ", got ", shape_str(sin));
  const int64_t half = cos.size(1);
  TORCH_CHECK(half <= d / 2, op, ": rotary_dim (2 * cos.size(1), cos.size(1) = ", half, ") must be <= head_dim (", d,
              "); cos has shape ", shape_str(cos));
  TORCH_CHECK(offset >= 0, op, ": offset must be >= 0, got ", offset);
  const int64_t P = cos.size(0), B = q.size(0), T = q.size(1);
  if (position_ids.has_value()) {
    const at::Tensor& pos = *position_ids;
    check_device(op, "position_ids", pos, target.device);
    check_same_device(op, "position_ids", pos, "q", q);
    TORCH_CHECK(pos.scalar_type() == at::kLong, op, ": position_ids must be int64, got ", pos.scalar_type());
    TORCH_CHECK(pos.dim() == 2 && pos.size(1) == T && (pos.size(0) == B || pos.size(0) == 1), op,
                ": position_ids must have shape [", B, ", ", T, "] or [1, ", T, "] (batch, seq of q), got ",
                shape_str(pos));
  } else {
    // offset <= P first: offset + T could overflow int64 (the positions are then offset .. offset + T - 1 < P)
    TORCH_CHECK(offset <= P && T <= P - offset, op, ": positions offset + seq = ", offset, " + ", T,
                " exceed the cos/sin table of ", P, " positions (cos of shape ", shape_str(cos),
                "); build a longer table");
  }
  return RopeGeometry{B, T, q.size(2), k.size(2), d, half, P};
}

// The in-place variant writes through q and k: they must be distinct and free of self-overlap (expanded dims).
inline void rope_check_inplace(const char* op, const at::Tensor& q, const at::Tensor& k) {
  TORCH_CHECK(at::has_internal_overlap(q) != at::MemOverlap::Yes, op,
              ": q has overlapping elements (an expanded view) and cannot be rotated in place; pass q.contiguous()");
  TORCH_CHECK(at::has_internal_overlap(k) != at::MemOverlap::Yes, op,
              ": k has overlapping elements (an expanded view) and cannot be rotated in place; pass k.contiguous()");
  // (views of one fused qkv buffer are strided, so the check says TooHard for them and lets them through)
  const auto status = (q.numel() == 0 || k.numel() == 0) ? at::MemOverlapStatus::No : at::get_overlap_status(q, k);
  TORCH_CHECK(status != at::MemOverlapStatus::Full && status != at::MemOverlapStatus::Partial, op,
              ": q and k share memory; rotating in place would rotate the shared elements twice");
}

}  // namespace lladapter
