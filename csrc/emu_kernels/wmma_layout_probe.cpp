// The emulator build of csrc/cuda/wmma_layout_probe.cu (see the other wrappers here).
#include "../cuda/wmma_layout_probe.cu"
