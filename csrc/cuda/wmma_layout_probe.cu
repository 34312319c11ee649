// Which matrix element each lane holds in x[i] of every wmma fragment kind the tensor-core kernels use. The layout
// is officially unspecified; the emulator (csrc/emu) offers the sm_80 one, and the kernels must not depend on it.
// scripts/gpu_check.sh runs this on a GPU and under the emulator (tests/test_emulator_vs_gpu.py): equal tables
// mean that the emulator's default layout is the hardware's.
//
// Each probe loads a 16 x 16 matrix whose element (r, c) is the code r * 16 + c (exact in fp16, bf16 and fp32)
// with load_matrix_sync and writes every lane's x[i] to out[kind, lane, i]; slots past num_elements stay NaN.
#include <ATen/core/Tensor.h>
#ifdef LLADAPTER_EMU
#include <ATen/EmptyTensor.h>
#else
#include <ATen/cuda/EmptyTensor.h>
#endif

#include <cmath>
#include <type_traits>

#include "compat.h"
#include "compat_host.h"
#include "ops_cuda.h"

namespace lladapter::cuda_impl {
namespace {

constexpr int kProbeSlots = 16;  // the most elements a fragment holds per lane (fp16 A/B)

#if LL_MMA_DECLS
namespace wmma = nvcuda::wmma;

template <typename T>
__device__ __forceinline__ T code_as(int code);
template <>
__device__ __forceinline__ __half code_as<__half>(int code) {
  return __float2half_rn(static_cast<float>(code));
}
template <>
__device__ __forceinline__ __nv_bfloat16 code_as<__nv_bfloat16>(int code) {
  return __float2bfloat16_rn(static_cast<float>(code));
}
template <>
__device__ __forceinline__ float code_as<float>(int code) {
  return static_cast<float>(code);
}

__device__ __forceinline__ float slot_value(__half x) { return __half2float(x); }
__device__ __forceinline__ float slot_value(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float slot_value(float x) { return x; }
#endif

// One warp. src: the codes, row-major (ld 16) or column-major per kColMajor; out: [32, kProbeSlots].
template <typename Use, typename T, typename Layout, bool kColMajorMemory>
__global__ void wmma_layout_probe_kernel(float* __restrict__ out) {
#if LL_MMA_CODE
  LL_SHARED(T, src, [256]);
  const int lane = threadIdx.x;
  for (int e = lane; e < 256; e += 32) {
    const int r = e / 16, c = e % 16;
    src[kColMajorMemory ? c * 16 + r : e] = code_as<T>(e);
  }
  __syncwarp();
  if constexpr (std::is_same_v<Use, wmma::accumulator>) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> frag;
    wmma::load_matrix_sync(frag, src, 16, kColMajorMemory ? wmma::mem_col_major : wmma::mem_row_major);
    for (int i = 0; i < frag.num_elements; ++i) out[lane * kProbeSlots + i] = slot_value(frag.x[i]);
  } else {
    wmma::fragment<Use, 16, 16, 16, T, Layout> frag;
    wmma::load_matrix_sync(frag, src, 16);
    for (int i = 0; i < frag.num_elements; ++i) out[lane * kProbeSlots + i] = slot_value(frag.x[i]);
  }
#endif
}

}  // namespace

// [kinds, 32, kProbeSlots] fp32 on the current device (CPU tensors under the emulator); the kinds, in order:
// A fp16 row-major, B fp16 row-major, B fp16 col-major, A bf16 row-major, B bf16 row-major, B bf16 col-major,
// accumulator loaded from row-major memory, accumulator loaded from column-major memory.
at::Tensor wmma_fragment_layouts() {
  constexpr int kKinds = 8;
  // (at::detail's allocators: <ATen/ops/full.h> would cost this file as much compile time as the rest of it)
#ifdef LLADAPTER_EMU
  at::Tensor out = at::detail::empty_cpu({kKinds, 32, kProbeSlots}, at::TensorOptions().dtype(at::kFloat));
#else
  TORCH_CHECK(ll::device_props().major >= 8, "wmma_fragment_layouts: needs an sm_80+ GPU");
  at::Tensor out = at::detail::empty_cuda(
      {kKinds, 32, kProbeSlots}, at::TensorOptions().dtype(at::kFloat).device(at::kCUDA, c10::cuda::current_device()));
#endif
  out.fill_(NAN);
  float* p = out.mutable_data_ptr<float>();
  const ll::Stream stream = ll::current_stream();
  constexpr int n = 32 * kProbeSlots;
#if LL_MMA_DECLS
  using wmma::accumulator;
  using wmma::col_major;
  using wmma::matrix_a;
  using wmma::matrix_b;
  using wmma::row_major;
  LL_LAUNCH(1, 32, 0, stream, wmma_layout_probe_kernel<matrix_a, __half, row_major, false>)(p + 0 * n);
  LL_LAUNCH(1, 32, 0, stream, wmma_layout_probe_kernel<matrix_b, __half, row_major, false>)(p + 1 * n);
  LL_LAUNCH(1, 32, 0, stream, wmma_layout_probe_kernel<matrix_b, __half, col_major, false>)(p + 2 * n);
  LL_LAUNCH(1, 32, 0, stream, wmma_layout_probe_kernel<matrix_a, __nv_bfloat16, row_major, false>)(p + 3 * n);
  LL_LAUNCH(1, 32, 0, stream, wmma_layout_probe_kernel<matrix_b, __nv_bfloat16, row_major, false>)(p + 4 * n);
  LL_LAUNCH(1, 32, 0, stream, wmma_layout_probe_kernel<matrix_b, __nv_bfloat16, col_major, false>)(p + 5 * n);
  LL_LAUNCH(1, 32, 0, stream, wmma_layout_probe_kernel<accumulator, float, void, false>)(p + 6 * n);
  LL_LAUNCH(1, 32, 0, stream, wmma_layout_probe_kernel<accumulator, float, void, true>)(p + 7 * n);
  LL_LAUNCH_CHECK();
#endif
  return out;
}

}  // namespace lladapter::cuda_impl
