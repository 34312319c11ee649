// SwiGLU: argument checks and the strided-rows view shared by the CPU and CUDA kernels (the checks are mirrored,
// word for word, by the fake implementations in lladapter_ext/ops.py).
//   y = silu(gate) * up = gate * s * up,  s = sigmoid(gate)                       (fp32 math, fp64 for fp64)
//   dgate = grad * up * s * (1 + gate * (1 - s)),  dup = grad * gate * s
// s and 1 - s are formed from e = exp(-|gate|), which never overflows: s = 1 / (1 + e) for gate >= 0, e / (1 + e)
// below (and 1 - s the other one), so s and 1 - s keep their relative accuracy far into the tails (silu(-89) is
// -1.98e-37 in fp32, where x / (1 + exp(-x)) overflows to -0). Non-finite inputs give what
// torch.nn.functional.silu(gate) * up gives: NaN propagates, silu(+inf) = +inf, silu(-inf) = NaN (inf * 0), and
// the gradients at gate = +-inf are NaN (docs/swiglu.md).
// gate and up: the same shape (>= 1 dim), dtype and device; any strides (a view whose leading dims collapse into
// rows with a unit last-dim stride is read in place, e.g. the two halves of a [M, 2F] projection; anything else is
// copied). Outputs are new contiguous tensors of gate's shape and dtype.
#pragma once

#include "common.h"

namespace lladapter {

inline void swiglu_check_inputs(const char* op, const at::Tensor& gate, const at::Tensor& up,
                                const KernelTarget& target) {
  check_device(op, "gate", gate, target.device);
  check_device(op, "up", up, target.device);
  check_same_device(op, "up", up, "gate", gate);
  check_float_dtype(op, "gate", gate, target);
  TORCH_CHECK(up.scalar_type() == gate.scalar_type(), op, ": up must have gate's dtype (", gate.scalar_type(),
              "), got ", up.scalar_type());
  TORCH_CHECK(gate.dim() >= 1, op, ": gate must have at least 1 dimension, got a 0-d tensor");
  TORCH_CHECK(up.sizes() == gate.sizes(), op, ": up must have gate's shape ", shape_str(gate), ", got ", shape_str(up));
}

inline void swiglu_check_backward_inputs(const at::Tensor& grad, const at::Tensor& gate, const at::Tensor& up,
                                         const KernelTarget& target) {
  constexpr const char* op = "lladapter::swiglu_backward";
  swiglu_check_inputs(op, gate, up, target);
  check_device(op, "grad", grad, target.device);
  check_same_device(op, "grad", grad, "gate", gate);
  TORCH_CHECK(grad.scalar_type() == gate.scalar_type(), op, ": grad must have gate's dtype (", gate.scalar_type(),
              "), got ", grad.scalar_type());
  TORCH_CHECK(grad.sizes() == gate.sizes(), op, ": grad must have gate's shape ", shape_str(gate), ", got ",
              shape_str(grad));
}

// t's row stride as a [numel / size(-1), size(-1)] matrix with unit column stride (its leading dims collapse into
// one), or -1 when its strides do not allow that view.
inline int64_t swiglu_row_stride(const at::Tensor& t) {
  const int64_t d = t.dim();
  if (t.size(d - 1) != 1 && t.stride(d - 1) != 1) return -1;
  int64_t row_stride = -1, expected = 0;
  for (int64_t i = d - 2; i >= 0; --i) {
    if (t.size(i) == 1) continue;
    if (row_stride < 0) {
      row_stride = t.stride(i);
    } else if (t.stride(i) != expected) {
      return -1;
    }
    expected = t.stride(i) * t.size(i);
  }
  return row_stride < 0 ? t.size(d - 1) : row_stride;
}

// The operands of one call as [rows, n] matrices: a contiguous tensor set is one row of numel elements; otherwise
// rows of size(-1), each tensor with its own row stride (copied to a contiguous tensor when it has none).
struct SwigluRows {
  int64_t rows = 0, n = 0;
  at::Tensor t[3];
  int64_t stride[3] = {0, 0, 0};
};

// For non-empty tensors of one shape (count: 2 forward, 3 backward).
inline SwigluRows swiglu_rows(std::initializer_list<at::Tensor> tensors) {
  SwigluRows v;
  const at::Tensor& first = *tensors.begin();
  bool all_contiguous = true;
  for (const at::Tensor& t : tensors) all_contiguous = all_contiguous && t.is_contiguous();
  if (all_contiguous) {
    v.rows = 1;
    v.n = first.numel();
  } else {
    v.n = first.size(-1);
    v.rows = first.numel() / v.n;
  }
  int i = 0;
  for (const at::Tensor& t : tensors) {
    int64_t rs = all_contiguous ? v.n : swiglu_row_stride(t);
    v.t[i] = rs < 0 ? t.contiguous() : t;
    v.stride[i] = rs < 0 ? v.n : rs;
    ++i;
  }
  return v;
}

}  // namespace lladapter
