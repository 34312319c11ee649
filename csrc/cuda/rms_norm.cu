// RMSNorm CUDA kernels.
// Forward and dx: one row per warp (narrow rows) or per block (wide rows), 16-byte vector loads when the width
// and the pointers allow it (else scalar), fp32 accumulation, rsqrt of the fp32 mean square.
// dweight: a deterministic two-stage column reduction (fixed row splits -> fp32 partials -> ordered sum), no atomics.
#include "../rms_norm.h"
#include "compat_host.h"
#include "device_utils.cuh"
#include "ops_cuda.h"

namespace lladapter::cuda_impl {
namespace {

// Sum over threadIdx.x (the threads of one row). blockDim.x is 32 (warp per row) or a multiple of 32 with
// blockDim.y == 1 (block per row), so the __syncthreads below are reached by the whole block.
__device__ __forceinline__ float row_sum(float v, float* smem) {
  v = warp_sum(v);
  if (blockDim.x == 32) return v;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = lane < nwarps ? smem[lane] : 0.f;
  v = warp_sum(v);
  __syncthreads();
  return v;
}

// A thread's share of a row sum, Kahan-compensated: a thread of a 2^24-wide row adds 16k terms, whose plain fp32
// sum drifts with their count; the compensated one stays within a few ulps whatever the width (three more adds per
// element in a memory-bound loop).
struct CompensatedSum {
  float sum = 0.f, err = 0.f;
  __device__ __forceinline__ void add(float v) {
    const float y = v - err;
    const float t = sum + y;
    err = (t - sum) - y;
    sum = t;
  }
  __device__ __forceinline__ float value() const { return sum - err; }
};

template <typename scalar_t, typename weight_t, typename out_t, int VEC>
__global__ void rms_norm_fwd_kernel(const scalar_t* __restrict__ x, const weight_t* __restrict__ w,
                                    out_t* __restrict__ y, float* __restrict__ rstd, int64_t rows, int64_t n,
                                    float eps) {
  LL_SHARED(float, smem, [32]);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= rows) return;  // warp mode: whole warps leave; block mode (blockDim.y == 1): the whole block
  using XV = VecT<scalar_t, VEC>;
  using WV = VecT<weight_t, VEC>;
  using YV = VecT<out_t, VEC>;
  const XV* xr = reinterpret_cast<const XV*>(x + row * n);
  const WV* wv = reinterpret_cast<const WV*>(w);
  YV* yr = reinterpret_cast<YV*>(y + row * n);
  const int64_t nvec = n / VEC;
  CompensatedSum part;
  for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
    XV a = xr[i];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      float f = static_cast<float>(a.v[k]);
      part.add(f * f);
    }
  }
  const float ss = row_sum(part.value(), smem);
  const float r = rsqrtf(ss / static_cast<float>(n) + eps);
  if (threadIdx.x == 0) rstd[row] = r;
  for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
    XV a = xr[i];
    WV b = wv[i];
    YV o;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      // cast the normalised value back to x's dtype before the weight multiply (Meta/HF semantics)
      float normed = static_cast<float>(static_cast<scalar_t>(static_cast<float>(a.v[k]) * r));
      o.v[k] = static_cast<out_t>(normed * static_cast<float>(b.v[k]));
    }
    yr[i] = o;
  }
}

template <typename scalar_t, typename weight_t, typename out_t, int VEC>
__global__ void rms_norm_bwd_dx_kernel(const out_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                       const weight_t* __restrict__ w, const float* __restrict__ rstd,
                                       scalar_t* __restrict__ dx, int64_t rows, int64_t n) {
  LL_SHARED(float, smem, [32]);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= rows) return;
  using XV = VecT<scalar_t, VEC>;
  using WV = VecT<weight_t, VEC>;
  using YV = VecT<out_t, VEC>;
  const XV* xr = reinterpret_cast<const XV*>(x + row * n);
  const YV* dyr = reinterpret_cast<const YV*>(dy + row * n);
  const WV* wv = reinterpret_cast<const WV*>(w);
  XV* dxr = reinterpret_cast<XV*>(dx + row * n);
  const int64_t nvec = n / VEC;
  const float r = rstd[row];
  CompensatedSum part;
  for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
    XV a = xr[i];
    YV g = dyr[i];
    WV b = wv[i];
#pragma unroll
    for (int k = 0; k < VEC; ++k)
      part.add(static_cast<float>(g.v[k]) * static_cast<float>(b.v[k]) * static_cast<float>(a.v[k]));
  }
  const float dot = row_sum(part.value(), smem);
  const float c = r * dot / static_cast<float>(n);  // mean(dn * nhat)
  for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
    XV a = xr[i];
    YV g = dyr[i];
    WV b = wv[i];
    XV o;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      float dn = static_cast<float>(g.v[k]) * static_cast<float>(b.v[k]);
      float nhat = static_cast<float>(a.v[k]) * r;
      o.v[k] = static_cast<scalar_t>(r * (dn - nhat * c));
    }
    dxr[i] = o;
  }
}

// Stage 1: partial[split, col] = sum over the split's rows of dy * cast(x * rstd). Consecutive threads read
// consecutive columns of one row (coalesced).
template <typename scalar_t, typename out_t>
__global__ void rms_norm_bwd_dw_partial_kernel(const out_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                               const float* __restrict__ rstd, float* __restrict__ partial,
                                               int64_t rows, int64_t n, int64_t rows_per_split) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= n) return;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t r1 = min(rows, r0 + rows_per_split);
  float acc = 0.f;
  for (int64_t r = r0; r < r1; ++r) {
    float nhat = static_cast<float>(static_cast<scalar_t>(static_cast<float>(x[r * n + col]) * rstd[r]));
    acc += static_cast<float>(dy[r * n + col]) * nhat;
  }
  partial[static_cast<int64_t>(blockIdx.y) * n + col] = acc;
}

// Stage 2: dw[col] = sum of the partials in split order.
template <typename weight_t>
__global__ void rms_norm_bwd_dw_final_kernel(const float* __restrict__ partial, weight_t* __restrict__ dw,
                                             int64_t splits, int64_t n) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= n) return;
  float s = 0.f;
  for (int64_t p = 0; p < splits; ++p) s += partial[p * n + col];
  dw[col] = static_cast<weight_t>(s);
}

struct RowLaunch {
  dim3 grid, block;
};

// Warp per row while a row is at most 128 vectors; otherwise a block per row with enough threads that each
// handles a few vectors (at most 1024 threads).
RowLaunch row_launch(int64_t rows, int64_t n, int vec) {
  const int64_t nvec = n / vec;
  RowLaunch l;
  if (nvec <= 128) {
    const int rows_per_block = 8;
    l.block = dim3(32, rows_per_block);
    l.grid = dim3(static_cast<unsigned>((rows + rows_per_block - 1) / rows_per_block));
  } else {
    int64_t threads = (nvec + 3) / 4;  // ~4 vectors per thread
    threads = std::min<int64_t>(1024, std::max<int64_t>(64, (threads + 31) / 32 * 32));
    l.block = dim3(static_cast<unsigned>(threads), 1);
    l.grid = dim3(static_cast<unsigned>(rows));
  }
  return l;
}

template <typename scalar_t, typename weight_t, typename out_t>
int pick_vec(int64_t n, const void* a, const void* b, const void* c) {
  constexpr int V = 16 / sizeof(scalar_t);
  if (n % V == 0 && ll::aligned_to(a, sizeof(scalar_t) * V) && ll::aligned_to(b, sizeof(weight_t) * V) &&
      ll::aligned_to(c, sizeof(out_t) * V))
    return V;
  return 1;
}

template <typename scalar_t, typename weight_t>
void fwd_launch(const at::Tensor& x, const at::Tensor& w, at::Tensor& y, at::Tensor& rstd, double eps) {
  using out_t = std::conditional_t<std::is_same_v<scalar_t, weight_t>, scalar_t, float>;
  constexpr int V = 16 / sizeof(scalar_t);
  const int64_t n = x.size(-1), rows = x.numel() / n;
  const auto* xp = x.const_data_ptr<scalar_t>();
  const auto* wp = w.const_data_ptr<weight_t>();
  auto* yp = y.mutable_data_ptr<out_t>();
  auto* rp = rstd.mutable_data_ptr<float>();
  const int vec = pick_vec<scalar_t, weight_t, out_t>(n, xp, wp, yp);
  const RowLaunch l = row_launch(rows, n, vec);
  const ll::Stream stream = ll::current_stream();
  if (vec == V) {
    LL_LAUNCH(l.grid, l.block, 0, stream, rms_norm_fwd_kernel<scalar_t, weight_t, out_t, V>)(xp, wp, yp, rp, rows, n,
                                                                                             static_cast<float>(eps));
  } else {
    LL_LAUNCH(l.grid, l.block, 0, stream, rms_norm_fwd_kernel<scalar_t, weight_t, out_t, 1>)(xp, wp, yp, rp, rows, n,
                                                                                             static_cast<float>(eps));
  }
  LL_LAUNCH_CHECK();
}

template <typename scalar_t, typename weight_t>
void bwd_launch(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, const at::Tensor& rstd, at::Tensor& dx,
                at::Tensor& dw) {
  using out_t = std::conditional_t<std::is_same_v<scalar_t, weight_t>, scalar_t, float>;
  constexpr int V = 16 / sizeof(scalar_t);
  const int64_t n = x.size(-1), rows = x.numel() / n;
  const auto* dyp = dy.const_data_ptr<out_t>();
  const auto* xp = x.const_data_ptr<scalar_t>();
  const auto* wp = w.const_data_ptr<weight_t>();
  const auto* rp = rstd.const_data_ptr<float>();
  auto* dxp = dx.mutable_data_ptr<scalar_t>();
  const ll::Stream stream = ll::current_stream();
  int vec = pick_vec<scalar_t, weight_t, out_t>(n, xp, wp, dyp);
  if (!ll::aligned_to(dxp, sizeof(scalar_t) * V)) vec = 1;
  const RowLaunch l = row_launch(rows, n, vec);
  if (vec == V) {
    LL_LAUNCH(l.grid, l.block, 0, stream, rms_norm_bwd_dx_kernel<scalar_t, weight_t, out_t, V>)(dyp, xp, wp, rp, dxp,
                                                                                                rows, n);
  } else {
    LL_LAUNCH(l.grid, l.block, 0, stream, rms_norm_bwd_dx_kernel<scalar_t, weight_t, out_t, 1>)(dyp, xp, wp, rp, dxp,
                                                                                                rows, n);
  }
  LL_LAUNCH_CHECK();

  constexpr int kColThreads = 256;
  const int64_t col_blocks = (n + kColThreads - 1) / kColThreads;
  const int64_t sms = ll::device_props().sm_count;
  int64_t splits = std::max<int64_t>(1, (4 * sms + col_blocks - 1) / col_blocks);
  splits = std::min<int64_t>({splits, rows, 1024});
  const int64_t rows_per_split = (rows + splits - 1) / splits;
  splits = (rows + rows_per_split - 1) / rows_per_split;
  at::Tensor partial = x.new_empty({splits, n}, at::kFloat);
  LL_LAUNCH(dim3(static_cast<unsigned>(col_blocks), static_cast<unsigned>(splits)), kColThreads, 0, stream,
            rms_norm_bwd_dw_partial_kernel<scalar_t, out_t>)(dyp, xp, rp, partial.mutable_data_ptr<float>(), rows, n,
                                                             rows_per_split);
  LL_LAUNCH_CHECK();
  LL_LAUNCH(static_cast<unsigned>(col_blocks), kColThreads, 0, stream, rms_norm_bwd_dw_final_kernel<weight_t>)(
      partial.const_data_ptr<float>(), dw.mutable_data_ptr<weight_t>(), splits, n);
  LL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_cuda(const at::Tensor& x_in, const at::Tensor& weight_in, double eps) {
  rms_norm_check_inputs(x_in, weight_in, ll::kTarget);
  TORCH_CHECK(eps >= 0, "lladapter::rms_norm: eps must be >= 0, got ", eps);
  const ll::DeviceGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor w = weight_in.contiguous();
  at::Tensor y = x.new_empty(x.sizes(), c10::promoteTypes(x.scalar_type(), w.scalar_type()));
  auto stat_sizes = x.sizes().vec();
  stat_sizes.pop_back();
  at::Tensor rstd = x.new_empty(stat_sizes, at::kFloat);
  if (x.numel() == 0) return {y, rstd};
  const bool wf = w.scalar_type() == at::kFloat;
  switch (x.scalar_type()) {
    case at::kFloat:
      fwd_launch<float, float>(x, w, y, rstd, eps);
      break;
    case at::kBFloat16:
      wf ? fwd_launch<at::BFloat16, float>(x, w, y, rstd, eps)
         : fwd_launch<at::BFloat16, at::BFloat16>(x, w, y, rstd, eps);
      break;
    case at::kHalf:
      wf ? fwd_launch<at::Half, float>(x, w, y, rstd, eps) : fwd_launch<at::Half, at::Half>(x, w, y, rstd, eps);
      break;
    default:
      TORCH_CHECK(false, "lladapter::rms_norm: unsupported dtype ", x.scalar_type());
  }
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x_in,
                                                          const at::Tensor& weight_in, const at::Tensor& rstd_in) {
  rms_norm_check_backward_inputs(grad_y, x_in, weight_in, rstd_in, ll::kTarget);
  const ll::DeviceGuard guard(x_in.device());
  const at::Tensor dy = grad_y.contiguous();
  const at::Tensor x = x_in.contiguous();
  const at::Tensor w = weight_in.contiguous();
  const at::Tensor rstd = rstd_in.contiguous();
  at::Tensor dx = x.new_empty(x.sizes());
  at::Tensor dw = w.new_zeros(w.sizes());
  if (x.numel() == 0) return {dx, dw};
  const bool wf = w.scalar_type() == at::kFloat;
  switch (x.scalar_type()) {
    case at::kFloat:
      bwd_launch<float, float>(dy, x, w, rstd, dx, dw);
      break;
    case at::kBFloat16:
      wf ? bwd_launch<at::BFloat16, float>(dy, x, w, rstd, dx, dw)
         : bwd_launch<at::BFloat16, at::BFloat16>(dy, x, w, rstd, dx, dw);
      break;
    case at::kHalf:
      wf ? bwd_launch<at::Half, float>(dy, x, w, rstd, dx, dw) : bwd_launch<at::Half, at::Half>(dy, x, w, rstd, dx, dw);
      break;
    default:
      TORCH_CHECK(false, "lladapter::rms_norm_backward: unsupported dtype ", x.scalar_type());
  }
  return {dx, dw};
}

}  // namespace lladapter::cuda_impl
