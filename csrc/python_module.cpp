// The Python module lladapter_ext._C: importing it loads the op registrations; build_info() says what was built.
// pybind11 with torch's Tensor casters, not <torch/extension.h> (all of libtorch's C++ API: 35 s more compile time)
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/version.h>

#include "decode_layers.h"
#include "gated_prompt_attention.h"
#include "host_heap.h"

#ifndef LLADAPTER_CUDA_ARCHS
#define LLADAPTER_CUDA_ARCHS ""
#endif
#ifndef LLADAPTER_CPU_ISA
#define LLADAPTER_CPU_ISA "default"
#endif

#ifdef LLADAPTER_WITH_CUDA
#include "cuda/ops_cuda.h"  // wmma_fragment_layouts
#endif

namespace {

pybind11::dict build_info() {
  pybind11::dict d;
#ifdef LLADAPTER_WITH_CUDA
  d["with_cuda"] = true;
#else
  d["with_cuda"] = false;
#endif
  d["cuda_archs"] = std::string(LLADAPTER_CUDA_ARCHS);
  d["cpu_isa"] = std::string(LLADAPTER_CPU_ISA);
  d["torch_version"] = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
                       std::to_string(TORCH_VERSION_PATCH);
#ifdef NDEBUG
  d["debug"] = false;
#else
  d["debug"] = true;
#endif
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "lladapter compiled kernels (ops live in torch.ops.lladapter)";
  m.def("build_info", &build_info, "What this extension was compiled with.");
  m.def("decode_layers", &lladapter::decode_layers,
        "Every decoder layer of a no-grad, KV-cached forward in one call (csrc/decode_layers.h; model.py calls it).");
  m.def("few_rows_gemv", &lladapter::few_rows_gemv,
        "x [rows, K] @ weight [N, K]^T for 1-16 float32 or bfloat16 CPU rows, grad off (nn.few_rows_linear's 'gemv' "
        "route); residual [rows, N]: residual + x @ weight^T, as at::add of the two rounds it.",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("residual") = pybind11::none());
  m.def("openblas_load", &lladapter::openblas_load,
        "Load the OpenBLAS at path for openblas_mm (once per process; its own threads set to one); returns the "
        "loaded library's path (the first one loaded, on later calls). Raises if path is not an OpenBLAS.",
        pybind11::arg("path"));
  m.def("openblas_library", &lladapter::openblas_library, "The loaded OpenBLAS's path, '' if none.");
  m.def("openblas_mm", &lladapter::openblas_mm,
        "a [M, K] @ b [K, N], float32 CPU, with the loaded OpenBLAS's sgemm split over torch's threads "
        "(nn.gemm_route's 'openblas' route); into out [M, N] (row-major) when given. No autograd.",
        pybind11::arg("a"), pybind11::arg("b"), pybind11::arg("out") = pybind11::none());
  m.def("install_exact_fit_allocator", &lladapter::install_exact_fit_allocator,
        "Make the exact-fit allocator torch's CPU allocator for the rest of the process (csrc/host_heap.h; "
        "host_heap.keep_freed_heap calls it); False when it already was.");
  m.def("exact_fit_allocator_installed", &lladapter::exact_fit_allocator_installed,
        "Whether install_exact_fit_allocator() has run in this process.");
  m.def("start_recording_attention_products", &lladapter::cpu::start_recording_attention_products,
        "Record every BLAS product the CPU attention kernels make from now on (bench_e2e's matmul floor).");
  m.def("stop_recording_attention_products", &lladapter::cpu::stop_recording_attention_products,
        "Stop recording; the products since the start as int64 [N, 9] rows (m, n, k, lda, ldb, ldc, a_trans, "
        "b_trans, accumulate).");
  m.def("replay_attention_products", &lladapter::cpu::replay_attention_products,
        "Run the recorded products alone (same shapes, strides, transposes; sequential BLAS per worker, dealt "
        "round-robin over torch's threads), for timing.",
        pybind11::arg("products"));
#ifdef LLADAPTER_WITH_CUDA
  m.def("wmma_fragment_layouts", &lladapter::cuda_impl::wmma_fragment_layouts,
        "[8, 32, 16]: the matrix element (r * 16 + c) each lane holds in x[i] of each wmma fragment kind, on the "
        "current GPU (csrc/cuda/wmma_layout_probe.cu)");
#endif
}
