// The schemas of every lladapter op, in one place. Kernels register per device in csrc/cpu and csrc/cuda;
// autograd and fake (meta) implementations are registered from Python in lladapter_ext/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(lladapter, m) {
  // RMSNorm: returns (y, rstd); rstd is fp32 (fp64 for fp64 x) with x's leading shape.
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor rstd) -> (Tensor, Tensor)");
}
