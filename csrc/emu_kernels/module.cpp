// lladapter_ext._emu: csrc/cuda compiled against the SIMT emulator (csrc/emu). Importing it registers the schemas
// of every op under torch.ops.lladapter_emu (the kernels register in the wrappers next to this file) and exposes
// the emulator's knobs, statistics and self-tests (docs/emulator.md).
// pybind11 with torch's Tensor casters, not <torch/extension.h> (all of libtorch's C++ API: 35 s more compile time)
#include <torch/csrc/utils/pybind.h>

#include "../schemas.h"

// csrc/emu/python_bindings.cpp: the emulator's knobs, statistics and self-tests.
void lladapter_emu_bind(pybind11::module_& m);

#include "../cuda/ops_cuda.h"  // wmma_fragment_layouts

TORCH_LIBRARY(lladapter_emu, m) { lladapter::define_op_schemas(m); }

PYBIND11_MODULE(_emu, m) {
  m.doc() = "the lladapter CUDA kernels run on the CPU by the SIMT emulator (ops in torch.ops.lladapter_emu)";
  lladapter_emu_bind(m);
  m.def("wmma_fragment_layouts", &lladapter::cuda_impl::wmma_fragment_layouts,
        "[8, 32, 16]: the matrix element (r * 16 + c) each lane holds in x[i] of each wmma fragment kind, under the "
        "emulator's current layout (csrc/cuda/wmma_layout_probe.cu)");
}
