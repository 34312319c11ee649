// Shared argument checks and small helpers for the lladapter kernels (CPU and CUDA).
#pragma once

// Only the Tensor class and its methods, not <ATen/ATen.h>: these headers reach every .cu file, and nvcc parses
// each header three times (cudafe++, cicc, the host compiler). Allocate with the methods (t.new_empty, new_zeros).
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <string>

namespace lladapter {

// Which kernels an op call runs, as the argument checks need to know it: the tensors' device type, and whether the
// kernels are the CPU ones (which also take float64) or the CUDA ones (fp32/bf16/fp16 only). The CUDA kernels run
// on CUDA tensors, or on CPU tensors under the emulator (csrc/emu, torch.ops.lladapter_emu).
struct KernelTarget {
  c10::DeviceType device;
  bool cuda_kernels;
};
inline constexpr KernelTarget kCpuKernels{c10::DeviceType::CPU, false};

inline std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) {
    if (i) s += ", ";
    s += std::to_string(t.size(i));
  }
  return s + "]";
}

// Every argument must live on the device the kernel runs on; the message names the argument.
inline void check_device(const char* op, const char* name, const at::Tensor& t, c10::DeviceType expected) {
  TORCH_CHECK(t.device().type() == expected, op, ": ", name, " must be a ", c10::DeviceTypeName(expected),
              " tensor, got a tensor on ", t.device());
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                              const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device(), "; all arguments must be on the same device");
}

inline void check_dtype_in(const char* op, const char* name, const at::Tensor& t,
                           std::initializer_list<at::ScalarType> allowed) {
  bool ok = false;
  std::string list;
  for (auto s : allowed) {
    ok = ok || t.scalar_type() == s;
    if (!list.empty()) list += ", ";
    list += c10::toString(s);
  }
  TORCH_CHECK(ok, op, ": ", name, " must have dtype in {", list, "}, got ", t.scalar_type());
}

// The dtypes of the target's kernels for a floating-point input (float64 only on the CPU kernels).
inline void check_float_dtype(const char* op, const char* name, const at::Tensor& t, const KernelTarget& target) {
  if (target.cuda_kernels) {
    check_dtype_in(op, name, t, {at::kFloat, at::kBFloat16, at::kHalf});
  } else {
    check_dtype_in(op, name, t, {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble});
  }
}

}  // namespace lladapter
