// SwiGLU CUDA kernels (csrc/swiglu.h has the math): elementwise, one pass each way, grid-stride over the [rows, n]
// view of the operands (a contiguous set is one row; strided inputs keep their row strides, so the two halves of a
// [M, 2F] projection are read in place). 16-byte vector loads and stores when n, the row strides and the pointers
// allow it, else one element per step. Same fp32 formulas as the CPU kernel (csrc/cpu/swiglu.cpp).
#include <algorithm>
#include <initializer_list>

#include "../swiglu.h"
#include "compat_host.h"
#include "device_utils.cuh"
#include "ops_cuda.h"

namespace lladapter::cuda_impl {
namespace {

constexpr int kThreads = 256;

template <typename T, int N>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[N]) {
  const VecT<T, N> v = *reinterpret_cast<const VecT<T, N>*>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = static_cast<float>(v.v[i]);
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[N]) {
  VecT<T, N> v;
#pragma unroll
  for (int i = 0; i < N; ++i) v.v[i] = static_cast<T>(in[i]);
  *reinterpret_cast<VecT<T, N>*>(p) = v;
}

// s = sigmoid(g) and sn = 1 - s from e = exp(-|g|) (no overflow for any g; NaN stays NaN: g >= 0 is false).
__device__ __forceinline__ void sigmoid_parts(float g, float& s, float& sn) {
  const float e = expf(-fabsf(g));
  const float r = 1.f / (1.f + e);
  const float er = e * r;
  const bool pos = g >= 0.f;
  s = pos ? r : er;
  sn = pos ? er : r;
}

// The flat vector index i of the [rows, nv] view as (row, first element of the vector).
__device__ __forceinline__ void row_col(int64_t i, int64_t rows, int64_t nv, int vec, int64_t& r, int64_t& c) {
  r = rows == 1 ? 0 : i / nv;
  c = (i - r * nv) * vec;
}

template <typename scalar_t, int VEC>
__global__ void swiglu_fwd_kernel(const scalar_t* __restrict__ gate, int64_t gate_rs, const scalar_t* __restrict__ up,
                                  int64_t up_rs, scalar_t* __restrict__ y, int64_t rows, int64_t n) {
  const int64_t nv = n / VEC, total = rows * nv;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    int64_t r, c;
    row_col(i, rows, nv, VEC, r, c);
    float g[VEC], u[VEC], out[VEC];
    load_vec<scalar_t, VEC>(gate + r * gate_rs + c, g);
    load_vec<scalar_t, VEC>(up + r * up_rs + c, u);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      float s, sn;
      sigmoid_parts(g[k], s, sn);
      out[k] = g[k] * s * u[k];
    }
    store_vec<scalar_t, VEC>(y + r * n + c, out);
  }
}

template <typename scalar_t, int VEC>
__global__ void swiglu_bwd_kernel(const scalar_t* __restrict__ grad, int64_t grad_rs, const scalar_t* __restrict__ gate,
                                  int64_t gate_rs, const scalar_t* __restrict__ up, int64_t up_rs,
                                  scalar_t* __restrict__ dgate, scalar_t* __restrict__ dup, int64_t rows, int64_t n) {
  const int64_t nv = n / VEC, total = rows * nv;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    int64_t r, c;
    row_col(i, rows, nv, VEC, r, c);
    float dy[VEC], g[VEC], u[VEC], dg[VEC], du[VEC];
    load_vec<scalar_t, VEC>(grad + r * grad_rs + c, dy);
    load_vec<scalar_t, VEC>(gate + r * gate_rs + c, g);
    load_vec<scalar_t, VEC>(up + r * up_rs + c, u);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      float s, sn;
      sigmoid_parts(g[k], s, sn);
      dg[k] = dy[k] * u[k] * (s * fmaf(g[k], sn, 1.f));
      du[k] = dy[k] * (g[k] * s);
    }
    store_vec<scalar_t, VEC>(dgate + r * n + c, dg);
    store_vec<scalar_t, VEC>(dup + r * n + c, du);
  }
}

// Vector width V (16 bytes) when n, every row stride and every pointer allow it, else 1.
template <typename scalar_t>
bool can_vectorize(const SwigluRows& v, int count, std::initializer_list<const void*> outs) {
  constexpr int V = 16 / sizeof(scalar_t);
  if (v.n % V != 0) return false;
  for (int k = 0; k < count; ++k)
    if (v.stride[k] % V != 0 || !ll::aligned_to(v.t[k].const_data_ptr(), 16)) return false;
  for (const void* p : outs)
    if (!ll::aligned_to(p, 16)) return false;
  return true;
}

dim3 grid_for(int64_t work) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  const int64_t max_blocks = ll::device_props().sm_count * 8;
  return dim3(static_cast<unsigned>(std::max<int64_t>(1, std::min(blocks, max_blocks))));
}

template <typename scalar_t>
void fwd_launch(const SwigluRows& v, at::Tensor& y) {
  constexpr int V = 16 / sizeof(scalar_t);
  const auto* g = v.t[0].const_data_ptr<scalar_t>();
  const auto* u = v.t[1].const_data_ptr<scalar_t>();
  auto* yp = y.mutable_data_ptr<scalar_t>();
  const ll::Stream stream = ll::current_stream();
  if (can_vectorize<scalar_t>(v, 2, {yp})) {
    LL_LAUNCH(grid_for(v.rows * (v.n / V)), kThreads, 0, stream, swiglu_fwd_kernel<scalar_t, V>)(
        g, v.stride[0], u, v.stride[1], yp, v.rows, v.n);
  } else {
    LL_LAUNCH(grid_for(v.rows * v.n), kThreads, 0, stream, swiglu_fwd_kernel<scalar_t, 1>)(
        g, v.stride[0], u, v.stride[1], yp, v.rows, v.n);
  }
  LL_LAUNCH_CHECK();
}

template <typename scalar_t>
void bwd_launch(const SwigluRows& v, at::Tensor& dgate, at::Tensor& dup) {
  constexpr int V = 16 / sizeof(scalar_t);
  const auto* dy = v.t[0].const_data_ptr<scalar_t>();
  const auto* g = v.t[1].const_data_ptr<scalar_t>();
  const auto* u = v.t[2].const_data_ptr<scalar_t>();
  auto* dgp = dgate.mutable_data_ptr<scalar_t>();
  auto* dup_p = dup.mutable_data_ptr<scalar_t>();
  const ll::Stream stream = ll::current_stream();
  if (can_vectorize<scalar_t>(v, 3, {dgp, dup_p})) {
    LL_LAUNCH(grid_for(v.rows * (v.n / V)), kThreads, 0, stream, swiglu_bwd_kernel<scalar_t, V>)(
        dy, v.stride[0], g, v.stride[1], u, v.stride[2], dgp, dup_p, v.rows, v.n);
  } else {
    LL_LAUNCH(grid_for(v.rows * v.n), kThreads, 0, stream, swiglu_bwd_kernel<scalar_t, 1>)(
        dy, v.stride[0], g, v.stride[1], u, v.stride[2], dgp, dup_p, v.rows, v.n);
  }
  LL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor swiglu_cuda(const at::Tensor& gate, const at::Tensor& up) {
  swiglu_check_inputs("lladapter::swiglu", gate, up, ll::kTarget);
  const ll::DeviceGuard guard(gate.device());
  at::Tensor y = gate.new_empty(gate.sizes());  // contiguous
  if (gate.numel() == 0) return y;
  const SwigluRows v = swiglu_rows({gate, up});
  switch (gate.scalar_type()) {
    case at::kFloat:
      fwd_launch<float>(v, y);
      break;
    case at::kBFloat16:
      fwd_launch<at::BFloat16>(v, y);
      break;
    case at::kHalf:
      fwd_launch<at::Half>(v, y);
      break;
    default:
      TORCH_CHECK(false, "lladapter::swiglu: unsupported dtype ", gate.scalar_type());
  }
  return y;
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward_cuda(const at::Tensor& grad, const at::Tensor& gate,
                                                        const at::Tensor& up) {
  swiglu_check_backward_inputs(grad, gate, up, ll::kTarget);
  const ll::DeviceGuard guard(gate.device());
  at::Tensor dgate = gate.new_empty(gate.sizes());  // contiguous
  at::Tensor dup = gate.new_empty(gate.sizes());
  if (gate.numel() == 0) return {dgate, dup};
  const SwigluRows v = swiglu_rows({grad, gate, up});
  switch (gate.scalar_type()) {
    case at::kFloat:
      bwd_launch<float>(v, dgate, dup);
      break;
    case at::kBFloat16:
      bwd_launch<at::BFloat16>(v, dgate, dup);
      break;
    case at::kHalf:
      bwd_launch<at::Half>(v, dgate, dup);
      break;
    default:
      TORCH_CHECK(false, "lladapter::swiglu_backward: unsupported dtype ", gate.scalar_type());
  }
  return {dgate, dup};
}

}  // namespace lladapter::cuda_impl
