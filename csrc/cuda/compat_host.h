// Host-side launch and dispatch code of csrc/cuda, written once for both builds (see compat.h): the real CUDA build
// (CUDA tensors, torch.ops.lladapter) and the emulator build (-DLLADAPTER_EMU: CPU tensors, the kernels run by
// csrc/emu, torch.ops.lladapter_emu). Everything that differs between the two lives here, behind thin shims:
//   ll::kTarget                   which tensors the kernels take (common.h KernelTarget)
//   ll::Stream, current_stream()  the stream kernels are launched on
//   ll::DeviceGuard               makes the tensors' device current for the call
//   ll::device_props()            SM count, compute capability, shared-memory opt-in limit (emulated profile)
//   ll::allow_dynamic_smem(k, n)  cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, n)
//   LL_LAUNCH_CHECK()             C10_CUDA_KERNEL_LAUNCH_CHECK() (the emulator's launches throw themselves)
#pragma once

#include <cstdint>

#include "../common.h"
#include "compat.h"

#ifndef LLADAPTER_EMU
// CUDAContextLight.h, not CUDAContext.h: the latter brings ATen/Context.h, seconds of nvcc time per .cu file
#include <ATen/cuda/CUDAContextLight.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace lladapter::ll {

struct DeviceProps {
  int major, minor;         // compute capability
  int64_t sm_count;         // streaming multiprocessors
  size_t smem_optin_bytes;  // the most dynamic shared memory one block may opt in to
};

#ifdef LLADAPTER_EMU

inline constexpr KernelTarget kTarget{c10::DeviceType::CPU, true};
using Stream = ::llemu::Stream;
inline Stream current_stream() { return ::llemu::default_stream(); }

class DeviceGuard {
 public:
  explicit DeviceGuard(const c10::Device&) {}
};

inline DeviceProps device_props() {
  const ::llemu::DeviceProfile& p = ::llemu::device_profile();
  return DeviceProps{p.major, p.minor, static_cast<int64_t>(p.sm_count), p.smem_optin_limit};
}

template <typename Kernel>
void allow_dynamic_smem(Kernel kernel, size_t bytes) {
  ::llemu::set_max_dynamic_smem(kernel, static_cast<int>(bytes));
}

#define LL_LAUNCH_CHECK() ((void)0)

#else  // the real CUDA build

inline constexpr KernelTarget kTarget{c10::DeviceType::CUDA, true};
using Stream = cudaStream_t;
inline Stream current_stream() { return c10::cuda::getCurrentCUDAStream(); }
using DeviceGuard = c10::cuda::CUDAGuard;

inline DeviceProps device_props() {
  const cudaDeviceProp* p = at::cuda::getCurrentDeviceProperties();
  return DeviceProps{p->major, p->minor, static_cast<int64_t>(p->multiProcessorCount),
                     static_cast<size_t>(p->sharedMemPerBlockOptin)};
}

template <typename Kernel>
void allow_dynamic_smem(Kernel kernel, size_t bytes) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

#define LL_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()

#endif  // LLADAPTER_EMU

inline bool aligned_to(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

}  // namespace lladapter::ll
