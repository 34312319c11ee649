// RMSNorm: argument checks shared by the CPU and CUDA kernels.
//   y = w * cast_to_x_dtype(x * rstd),  rstd = 1 / sqrt(mean(x^2) + eps)   (statistics in fp32, fp64 for fp64 x)
// Output dtype is the promotion of x and weight (as in Meta's and HF's LLaMA), so fp32 weight with bf16 x gives fp32.
#pragma once

#include "common.h"

namespace lladapter {

inline void rms_norm_check_inputs(const at::Tensor& x, const at::Tensor& weight, const KernelTarget& target) {
  constexpr const char* op = "lladapter::rms_norm";
  check_device(op, "x", x, target.device);
  check_device(op, "weight", weight, target.device);
  check_same_device(op, "weight", weight, "x", x);
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dimension (the normalised one last), got a 0-d tensor");
  TORCH_CHECK(x.size(-1) > 0, op, ": x's last (normalised) dimension must be non-empty, got x of shape ", shape_str(x));
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), op, ": weight must have shape [", x.size(-1),
              "] (x.size(-1)), got ", shape_str(weight));
  check_float_dtype(op, "x", x, target);
  const bool half_x = x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf;
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() || (half_x && weight.scalar_type() == at::kFloat), op,
              ": weight must have x's dtype (", x.scalar_type(), ")", half_x ? " or float32" : "", ", got ",
              weight.scalar_type());
}

inline void rms_norm_check_backward_inputs(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                           const at::Tensor& rstd, const KernelTarget& target) {
  constexpr const char* op = "lladapter::rms_norm_backward";
  rms_norm_check_inputs(x, weight, target);
  check_device(op, "grad_y", grad_y, target.device);
  check_device(op, "rstd", rstd, target.device);
  check_same_device(op, "grad_y", grad_y, "x", x);
  check_same_device(op, "rstd", rstd, "x", x);
  TORCH_CHECK(grad_y.sizes() == x.sizes(), op, ": grad_y must have x's shape ", shape_str(x), ", got ",
              shape_str(grad_y));
  const auto out_dtype = c10::promoteTypes(x.scalar_type(), weight.scalar_type());
  TORCH_CHECK(grad_y.scalar_type() == out_dtype, op, ": grad_y must have the output dtype ", out_dtype, ", got ",
              grad_y.scalar_type());
  const auto stat_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(rstd.scalar_type() == stat_dtype, op, ": rstd must have dtype ", stat_dtype, ", got ",
              rstd.scalar_type());
  TORCH_CHECK(rstd.numel() == x.numel() / x.size(-1), op, ": rstd must hold one value per row of x (",
              x.numel() / x.size(-1), "), got shape ", shape_str(rstd));
}

}  // namespace lladapter
