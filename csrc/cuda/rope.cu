// RoPE CUDA kernel: one pass over q and k in one launch.
// Grid: one block per (batch, seq) row (grid-stride over rows). Block: threadIdx.x walks the row's pair groups
// (PAIRS consecutive pairs each, 16-byte loads of q/k when shapes, strides and pointers allow it), threadIdx.y
// walks the heads of q then k. Each thread loads the cos/sin of its (position, pair group) once into registers
// and reuses them for every head it rotates. Same indexing and fp32 math as the CPU kernel (csrc/cpu/rope.cpp).
// Explicit position ids are range-checked on the device (CUDA_KERNEL_ASSERT, as torch's own indexing kernels
// do) so that no host synchronisation is needed; offset + seq is checked on the host.
#include <ATen/Dispatch.h>

#include <limits>

#include "../rope.h"
#include "compat_host.h"
#include "device_utils.cuh"
#include "ops_cuda.h"

namespace lladapter::cuda_impl {
namespace {

template <typename T, int N, bool VEC>
__device__ __forceinline__ void load_n(const T* p, T (&out)[N]) {
  if constexpr (VEC) {
    const VecT<T, N> v = *reinterpret_cast<const VecT<T, N>*>(p);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = v.v[i];
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = p[i];
  }
}

template <typename T, int N, bool VEC>
__device__ __forceinline__ void store_n(T* p, const T (&in)[N]) {
  if constexpr (VEC) {
    VecT<T, N> v;
#pragma unroll
    for (int i = 0; i < N; ++i) v.v[i] = in[i];
    *reinterpret_cast<VecT<T, N>*>(p) = v;
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) p[i] = in[i];
  }
}

template <typename scalar_t>
struct HeadsView {
  const scalar_t* in;
  scalar_t* out;
  int64_t in_sb, in_st, in_sh;
  int64_t out_sb, out_st, out_sh;
  int heads;
};

template <typename scalar_t>
struct RopeParams {
  HeadsView<scalar_t> q, k;
  const float* cos;
  const float* sin;
  const int64_t* pos;  // nullptr: positions offset + t
  int64_t pos_sb, pos_st;
  int64_t offset;
  int64_t rows, T, P;
  int half, d;
  float sign;      // -1 for the inverse rotation
  bool copy_pass;  // out-of-place: copy features rd..d
};

// PAIRS consecutive pairs per thread; VEC: the loads of q/k (PAIRS elements for rotate_half, 2*PAIRS for
// interleaved) and of cos/sin (PAIRS floats) are single aligned vector accesses.
template <typename scalar_t, int PAIRS, bool INTERLEAVED, bool VEC>
__global__ void rope_kernel(const RopeParams<scalar_t> p) {
  const int groups = p.half / PAIRS;
  const int heads = p.q.heads + p.k.heads;
  const int pass = p.d - 2 * p.half;
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const int64_t b = row / p.T, t = row % p.T;
    const int64_t pos = p.pos ? p.pos[b * p.pos_sb + t * p.pos_st] : p.offset + t;
    CUDA_KERNEL_ASSERT(pos >= 0 && pos < p.P && "lladapter::rope: position_ids outside the cos/sin table");
    for (int g = threadIdx.x; g < groups; g += blockDim.x) {
      float c[PAIRS], s[PAIRS];
      load_n<float, PAIRS, VEC>(p.cos + pos * p.half + g * PAIRS, c);
      load_n<float, PAIRS, VEC>(p.sin + pos * p.half + g * PAIRS, s);
#pragma unroll
      for (int i = 0; i < PAIRS; ++i) s[i] *= p.sign;
      for (int h = threadIdx.y; h < heads; h += blockDim.y) {
        const bool is_q = h < p.q.heads;
        const HeadsView<scalar_t> v = is_q ? p.q : p.k;
        const int hh = is_q ? h : h - p.q.heads;
        const scalar_t* x = v.in + b * v.in_sb + t * v.in_st + hh * v.in_sh;
        scalar_t* y = v.out + b * v.out_sb + t * v.out_st + hh * v.out_sh;
        if constexpr (INTERLEAVED) {
          scalar_t xv[2 * PAIRS];
          load_n<scalar_t, 2 * PAIRS, VEC>(x + 2 * g * PAIRS, xv);
#pragma unroll
          for (int i = 0; i < PAIRS; ++i) {
            const float a = static_cast<float>(xv[2 * i]), bb = static_cast<float>(xv[2 * i + 1]);
            xv[2 * i] = static_cast<scalar_t>(a * c[i] - bb * s[i]);
            xv[2 * i + 1] = static_cast<scalar_t>(a * s[i] + bb * c[i]);
          }
          store_n<scalar_t, 2 * PAIRS, VEC>(y + 2 * g * PAIRS, xv);
        } else {
          scalar_t x1[PAIRS], x2[PAIRS];
          load_n<scalar_t, PAIRS, VEC>(x + g * PAIRS, x1);
          load_n<scalar_t, PAIRS, VEC>(x + p.half + g * PAIRS, x2);
#pragma unroll
          for (int i = 0; i < PAIRS; ++i) {
            const float a = static_cast<float>(x1[i]), bb = static_cast<float>(x2[i]);
            x1[i] = static_cast<scalar_t>(a * c[i] - bb * s[i]);
            x2[i] = static_cast<scalar_t>(a * s[i] + bb * c[i]);
          }
          store_n<scalar_t, PAIRS, VEC>(y + g * PAIRS, x1);
          store_n<scalar_t, PAIRS, VEC>(y + p.half + g * PAIRS, x2);
        }
      }
    }
    if (p.copy_pass && pass > 0) {  // partial rotary, out of place: features rd..d pass through
      const int tid = threadIdx.y * blockDim.x + threadIdx.x, nthreads = blockDim.x * blockDim.y;
      for (int e = tid; e < heads * pass; e += nthreads) {
        const int h = e / pass, j = 2 * p.half + e % pass;
        const bool is_q = h < p.q.heads;
        const HeadsView<scalar_t> v = is_q ? p.q : p.k;
        const int hh = is_q ? h : h - p.q.heads;
        v.out[b * v.out_sb + t * v.out_st + hh * v.out_sh + j] = v.in[b * v.in_sb + t * v.in_st + hh * v.in_sh + j];
      }
    }
  }
}

template <typename scalar_t>
bool view_vectorizable(const HeadsView<scalar_t>& v, int64_t elems) {
  const size_t bytes = sizeof(scalar_t) * elems;
  return ll::aligned_to(v.in, bytes) && ll::aligned_to(v.out, bytes) && v.in_sb % elems == 0 && v.in_st % elems == 0 &&
         v.in_sh % elems == 0 && v.out_sb % elems == 0 && v.out_st % elems == 0 && v.out_sh % elems == 0;
}

template <typename scalar_t, int PAIRS, bool INTERLEAVED, bool VEC>
void launch_kernel(const RopeParams<scalar_t>& p, ll::Stream stream) {
  const int groups = p.half / PAIRS;
  const int heads = p.q.heads + p.k.heads;
  constexpr int kTargetThreads = 256;
  const int tx = std::min(groups, 128);
  // heads per thread first, then as few y-threads as give every thread that many heads (balanced blocks)
  const int max_ty = std::max(1, kTargetThreads / tx);
  const int heads_per_thread = (heads + max_ty - 1) / max_ty;
  const int ty = std::max(1, (heads + heads_per_thread - 1) / heads_per_thread);
  const int64_t max_blocks = ll::device_props().sm_count * 64;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(p.rows, std::max<int64_t>(max_blocks, 1)));
  LL_LAUNCH(blocks, dim3(tx, ty), 0, stream, rope_kernel<scalar_t, PAIRS, INTERLEAVED, VEC>)(p);
  LL_LAUNCH_CHECK();
}

template <typename scalar_t>
void dispatch_launch(const RopeParams<scalar_t>& p, bool interleaved, ll::Stream stream) {
  constexpr int E = 16 / sizeof(scalar_t);  // elements per 16-byte access
  // rotate_half: E pairs per thread (two E-element loads); interleaved: E/2 pairs (one E-element load).
  constexpr int PH = E, PI = E / 2;
  const bool cs_ok = [&](int pairs) {
    return p.half % pairs == 0 && ll::aligned_to(p.cos, sizeof(float) * pairs) &&
           ll::aligned_to(p.sin, sizeof(float) * pairs);
  }(interleaved ? PI : PH);
  const bool vec = cs_ok && view_vectorizable(p.q, E) && view_vectorizable(p.k, E);
  if (interleaved) {
    vec ? launch_kernel<scalar_t, PI, true, true>(p, stream) : launch_kernel<scalar_t, 1, true, false>(p, stream);
  } else {
    vec ? launch_kernel<scalar_t, PH, false, true>(p, stream) : launch_kernel<scalar_t, 1, false, false>(p, stream);
  }
}

template <typename scalar_t>
HeadsView<scalar_t> heads_view(const at::Tensor& in, at::Tensor& out) {
  return HeadsView<scalar_t>{in.const_data_ptr<scalar_t>(),
                             out.mutable_data_ptr<scalar_t>(),
                             in.stride(0),
                             in.stride(1),
                             in.stride(2),
                             out.stride(0),
                             out.stride(1),
                             out.stride(2),
                             static_cast<int>(in.size(2))};
}

void launch(const at::Tensor& q_in, const at::Tensor& k_in, at::Tensor& q_out, at::Tensor& k_out,
            const at::Tensor& cos_in, const at::Tensor& sin_in, const std::optional<at::Tensor>& position_ids,
            int64_t offset, bool interleaved, bool inverse, const RopeGeometry& g, bool copy_pass) {
  if (g.B * g.T == 0 || g.Hq + g.Hk == 0) return;
  TORCH_CHECK(g.Hq + g.Hk <= std::numeric_limits<int>::max() && g.d <= std::numeric_limits<int>::max(),
              "lladapter::rope: head count or head_dim too large for the CUDA kernel");
  const at::Tensor cos = cos_in.contiguous(), sin = sin_in.contiguous();
  const ll::Stream stream = ll::current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q_in.scalar_type(), "lladapter_rope_cuda", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      TORCH_CHECK(false, "lladapter::rope: float64 is CPU-only");
    } else {
      RopeParams<scalar_t> p;
      p.q = heads_view<scalar_t>(q_in, q_out);
      p.k = heads_view<scalar_t>(k_in, k_out);
      p.cos = cos.const_data_ptr<float>();
      p.sin = sin.const_data_ptr<float>();
      p.pos = nullptr;
      p.pos_sb = p.pos_st = 0;
      if (position_ids.has_value()) {
        p.pos = position_ids->const_data_ptr<int64_t>();
        p.pos_sb = position_ids->size(0) == 1 ? 0 : position_ids->stride(0);  // [1, T]: shared by the batch
        p.pos_st = position_ids->stride(1);
      }
      p.offset = offset;
      p.rows = g.B * g.T;
      p.T = g.T;
      p.P = g.P;
      p.half = static_cast<int>(g.half);
      p.d = static_cast<int>(g.d);
      p.sign = inverse ? -1.f : 1.f;
      p.copy_pass = copy_pass;
      dispatch_launch<scalar_t>(p, interleaved, stream);
    }
  });
}

at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> rope_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                             const at::Tensor& sin, const std::optional<at::Tensor>& position_ids,
                                             int64_t offset, bool interleaved, bool inverse) {
  const RopeGeometry g = rope_check_inputs("lladapter::rope", q, k, cos, sin, position_ids, offset, ll::kTarget);
  const ll::DeviceGuard guard(q.device());
  const at::Tensor qi = last_dim_contiguous(q), ki = last_dim_contiguous(k);
  at::Tensor q_out = q.new_empty(q.sizes()), k_out = k.new_empty(k.sizes());
  launch(qi, ki, q_out, k_out, cos, sin, position_ids, offset, interleaved, inverse, g, /*copy_pass=*/true);
  return {q_out, k_out};
}

void rope_inplace_cuda(at::Tensor& q, at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
                       const std::optional<at::Tensor>& position_ids, int64_t offset, bool interleaved, bool inverse) {
  constexpr const char* op = "lladapter::rope_";
  const RopeGeometry g = rope_check_inputs(op, q, k, cos, sin, position_ids, offset, ll::kTarget);
  rope_check_inplace(op, q, k);
  const ll::DeviceGuard guard(q.device());
  at::Tensor qw = last_dim_contiguous(q), kw = last_dim_contiguous(k);
  launch(qw, kw, qw, kw, cos, sin, position_ids, offset, interleaved, inverse, g, /*copy_pass=*/false);
  if (!qw.is_same(q)) q.copy_(qw);
  if (!kw.is_same(k)) k.copy_(kw);
}

}  // namespace lladapter::cuda_impl
