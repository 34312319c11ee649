// The emulator build of csrc/cuda/registration.cpp: registers the emulated kernels under torch.ops.lladapter_emu.
#include "../cuda/registration.cpp"
