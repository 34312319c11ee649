// The host entry points of the CUDA kernels, as registration.cpp registers them: under torch.ops.lladapter (CUDA
// tensors) in the real build, under torch.ops.lladapter_emu (CPU tensors) in the emulator build. They are declared
// here and registered from a .cpp file so that no .cu file includes <torch/library.h>: nvcc parses every header
// three times, and that one alone cost about 20 s per .cu file.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>

namespace lladapter::cuda_impl {

// rms_norm.cu
std::tuple<at::Tensor, at::Tensor> rms_norm_cuda(const at::Tensor& x, const at::Tensor& weight, double eps);
std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                                          const at::Tensor& weight, const at::Tensor& rstd);

// rope.cu
std::tuple<at::Tensor, at::Tensor> rope_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                             const at::Tensor& sin, const std::optional<at::Tensor>& position_ids,
                                             int64_t offset, bool interleaved, bool inverse);
void rope_inplace_cuda(at::Tensor& q, at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
                       const std::optional<at::Tensor>& position_ids, int64_t offset, bool interleaved, bool inverse);

// gated_prompt_attention.cu
std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_prompt_attention_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& pk,
    const std::optional<at::Tensor>& pv, const std::optional<at::Tensor>& gate,
    const std::optional<at::Tensor>& kv_start, bool causal, std::string gate_act, double scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_prompt_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& pk, const std::optional<at::Tensor>& pv, const std::optional<at::Tensor>& gate,
    const std::optional<at::Tensor>& kv_start, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& prompt_lse, bool causal, std::string gate_act, double scale);

// quantized_linear.cu
at::Tensor quantized_linear_cuda(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales);
void dequantize_rows_cuda(const at::Tensor& codes, const at::Tensor& scales, int64_t row_start, int64_t row_end,
                          at::Tensor& out);

// swiglu.cu
at::Tensor swiglu_cuda(const at::Tensor& gate, const at::Tensor& up);
std::tuple<at::Tensor, at::Tensor> swiglu_backward_cuda(const at::Tensor& grad, const at::Tensor& gate,
                                                        const at::Tensor& up);

// wmma_layout_probe.cu (bound with pybind11 by python_module.cpp and emu_kernels/module.cpp, not an op)
at::Tensor wmma_fragment_layouts();

}  // namespace lladapter::cuda_impl
