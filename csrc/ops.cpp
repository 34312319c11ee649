// Registers the schemas of every lladapter op (csrc/schemas.h). Kernels register per device in csrc/cpu and
// csrc/cuda; autograd and fake (meta) implementations are registered from Python in lladapter_ext/ops.py.
#include "schemas.h"

TORCH_LIBRARY(lladapter, m) { lladapter::define_op_schemas(m); }
