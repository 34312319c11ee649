// Registers the schemas of every lladapter op (csrc/schemas.h). Kernels register per device in csrc/cpu and
// csrc/cuda; autograd and fake (meta) implementations are registered from Python in lladapter_ext/ops.py.
#include "quantized_linear.h"
#include "schemas.h"

TORCH_LIBRARY(lladapter, m) {
  lladapter::define_op_schemas(m);
  // Not a tensor op, and not in schemas.h (the emulator's namespace shares those): which CPU path
  // quantized_linear takes, for the tests and benchmarks (lladapter_ext.ops.quantized_linear_cpu_isa).
  m.def("quantized_linear_cpu_isa(str isa='') -> str", &lladapter::cpu::quantized_linear_cpu_isa);
}
