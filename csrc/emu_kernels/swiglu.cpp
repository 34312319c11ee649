// The emulator build of csrc/cuda/swiglu.cu: the same source, compiled by the host compiler with -DLLADAPTER_EMU
// (compat.h), registers its kernels under torch.ops.lladapter_emu on CPU tensors.
#include "../cuda/swiglu.cu"
