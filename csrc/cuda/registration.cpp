// Registers the CUDA kernels' host entry points (ops_cuda.h) with the dispatcher: a .cpp file, compiled once by the
// host compiler, so that no .cu file pays for <torch/library.h>. The emulator build compiles this same file with
// -DLLADAPTER_EMU (csrc/emu_kernels/registration.cpp): the kernels then take CPU tensors under lladapter_emu.
#include <torch/library.h>

#include "ops_cuda.h"

namespace lladapter::cuda_impl {

#ifdef LLADAPTER_EMU
TORCH_LIBRARY_IMPL(lladapter_emu, CPU, m) {
#else
TORCH_LIBRARY_IMPL(lladapter, CUDA, m) {
#endif
  m.impl("rms_norm", &rms_norm_cuda);
  m.impl("rms_norm_backward", &rms_norm_backward_cuda);
  m.impl("rope", &rope_cuda);
  m.impl("rope_", &rope_inplace_cuda);
  m.impl("gated_prompt_attention", &gated_prompt_attention_cuda);
  m.impl("gated_prompt_attention_backward", &gated_prompt_attention_backward_cuda);
  m.impl("quantized_linear", &quantized_linear_cuda);
  m.impl("dequantize_rows", &dequantize_rows_cuda);
  m.impl("swiglu", &swiglu_cuda);
  m.impl("swiglu_backward", &swiglu_backward_cuda);
}

}  // namespace lladapter::cuda_impl
