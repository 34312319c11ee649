// The emulator build of csrc/cuda/gated_prompt_attention_mma.cu: the same source, compiled by the host compiler with
// -DLLADAPTER_EMU (compat.h), registers its kernels under torch.ops.lladapter_emu on CPU tensors.
#include "../cuda/gated_prompt_attention_mma.cu"
