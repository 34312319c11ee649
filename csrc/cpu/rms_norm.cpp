// RMSNorm CPU kernels: rows in parallel (at::parallel_for), fp32 lanes via at::vec, fp64 for gradcheck.
// dweight is reduced deterministically: fixed row chunks (independent of the thread count) each write a
// partial sum, then the partials are added in chunk order.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../rms_norm.h"
#include "vec_utils.h"

namespace lladapter::cpu {
namespace {

constexpr int64_t kMaxDweightChunks = 64;

// A row's sum of per-element terms (vec_fma(i, acc) adds those of elements i .. i + kFVecSize - 1 to acc): fp32
// vector lanes within chunks of kSumChunk elements, the chunk sums added in fp64, so the rounding error is bounded
// by the chunk length, not by the width (a plain fp32 lane sum over a 2^24-wide row was off by 3e-3 against fp64).
// Rows up to one chunk (512 or 1024 wide, by the ISA) are summed as before, plus one fp64 add.
constexpr int64_t kSumChunk = 64 * kFVecSize;

template <typename VecFma, typename ScalarTerm>
double chunked_row_sum(int64_t n, const VecFma& vec_fma, const ScalarTerm& scalar_term) {
  double total = 0;
  int64_t i = 0;
  while (i + kFVecSize <= n) {
    const int64_t chunk_end = std::min(n, i + kSumChunk);
    fVec acc(0.f);
    for (; i + kFVecSize <= chunk_end; i += kFVecSize) acc = vec_fma(i, acc);
    total += static_cast<double>(hsum(acc));
  }
  float tail = 0.f;
  for (; i < n; ++i) tail += scalar_term(i);
  return total + static_cast<double>(tail);
}

template <typename scalar_t, typename weight_t, typename out_t>
void rms_norm_fwd_row(const scalar_t* x, const weight_t* w, out_t* y, float* rstd_out, int64_t n, float eps) {
  const double ss = chunked_row_sum(
      n,
      [&](int64_t i, const fVec& acc) {
        fVec a = load_as_float(x + i);
        return at::vec::fmadd(a, a, acc);
      },
      [&](int64_t i) {
        float a = static_cast<float>(x[i]);
        return a * a;
      });
  const float r = 1.f / std::sqrt(static_cast<float>(ss / static_cast<double>(n)) + eps);
  *rstd_out = r;
  const fVec rv(r);
  int64_t i = 0;
  for (; i + kFVecSize <= n; i += kFVecSize) {
    fVec normed = round_through<scalar_t>(load_as_float(x + i) * rv);
    store_from_float(y + i, normed * load_as_float(w + i));
  }
  for (; i < n; ++i) {
    float normed = static_cast<float>(static_cast<scalar_t>(static_cast<float>(x[i]) * r));
    y[i] = static_cast<out_t>(normed * static_cast<float>(w[i]));
  }
}

// dx = rstd * (dn - nhat * mean(dn * nhat)),  dn = dy * w,  nhat = x * rstd;  dw += dy * cast(nhat)
template <typename scalar_t, typename weight_t, typename out_t>
void rms_norm_bwd_row(const out_t* dy, const scalar_t* x, const weight_t* w, float r, scalar_t* dx, float* dw_acc,
                      int64_t n) {
  const double dot = chunked_row_sum(
      n,
      [&](int64_t i, const fVec& acc) {
        return at::vec::fmadd(load_as_float(dy + i) * load_as_float(w + i), load_as_float(x + i), acc);
      },
      [&](int64_t i) { return static_cast<float>(dy[i]) * static_cast<float>(w[i]) * static_cast<float>(x[i]); });
  const float c = r * static_cast<float>(dot / static_cast<double>(n));  // mean(dn * nhat)
  const fVec rv(r), cv(c);
  int64_t i = 0;
  for (; i + kFVecSize <= n; i += kFVecSize) {
    fVec dyv = load_as_float(dy + i);
    fVec nhat = load_as_float(x + i) * rv;
    fVec dn = dyv * load_as_float(w + i);
    store_from_float(dx + i, rv * (dn - nhat * cv));
    fVec dwv = fVec::loadu(dw_acc + i);
    at::vec::fmadd(dyv, round_through<scalar_t>(nhat), dwv).store(dw_acc + i);
  }
  for (; i < n; ++i) {
    float dyf = static_cast<float>(dy[i]);
    float nhat = static_cast<float>(x[i]) * r;
    float dn = dyf * static_cast<float>(w[i]);
    dx[i] = static_cast<scalar_t>(r * (dn - nhat * c));
    dw_acc[i] += dyf * static_cast<float>(static_cast<scalar_t>(nhat));
  }
}

// Plain fp64 rows: the gradcheck path.
void rms_norm_fwd_row_f64(const double* x, const double* w, double* y, double* rstd_out, int64_t n, double eps) {
  double ss = 0;
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const double r = 1.0 / std::sqrt(ss / n + eps);
  *rstd_out = r;
  for (int64_t i = 0; i < n; ++i) y[i] = (x[i] * r) * w[i];
}

void rms_norm_bwd_row_f64(const double* dy, const double* x, const double* w, double r, double* dx, double* dw_acc,
                          int64_t n) {
  double dot = 0;
  for (int64_t i = 0; i < n; ++i) dot += dy[i] * w[i] * x[i];
  const double c = r * dot / n;
  for (int64_t i = 0; i < n; ++i) {
    double nhat = x[i] * r;
    dx[i] = r * (dy[i] * w[i] - nhat * c);
    dw_acc[i] += dy[i] * nhat;
  }
}

template <typename scalar_t, typename weight_t>
void rms_norm_fwd_impl(const at::Tensor& x, const at::Tensor& w, at::Tensor& y, at::Tensor& rstd, double eps) {
  using out_t = std::conditional_t<std::is_same_v<scalar_t, weight_t>, scalar_t, float>;
  const int64_t n = x.size(-1);
  const int64_t rows = x.numel() / n;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const weight_t* wp = w.const_data_ptr<weight_t>();
  out_t* yp = y.mutable_data_ptr<out_t>();
  using stat_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  stat_t* rp = rstd.mutable_data_ptr<stat_t>();
  const int64_t grain = std::max<int64_t>(1, 32768 / n);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if constexpr (std::is_same_v<scalar_t, double>) {
        rms_norm_fwd_row_f64(xp + r * n, wp, yp + r * n, rp + r, n, eps);
      } else {
        rms_norm_fwd_row<scalar_t, weight_t, out_t>(xp + r * n, wp, yp + r * n, rp + r, n, static_cast<float>(eps));
      }
    }
  });
}

template <typename scalar_t, typename weight_t>
void rms_norm_bwd_impl(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, const at::Tensor& rstd,
                       at::Tensor& dx, at::Tensor& dw) {
  using out_t = std::conditional_t<std::is_same_v<scalar_t, weight_t>, scalar_t, float>;
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t n = x.size(-1);
  const int64_t rows = x.numel() / n;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(rows, kMaxDweightChunks));
  const int64_t rows_per_chunk = rows == 0 ? 0 : (rows + chunks - 1) / chunks;
  std::vector<acc_t> partial(static_cast<size_t>(chunks * n), acc_t(0));
  const out_t* dyp = dy.const_data_ptr<out_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const weight_t* wp = w.const_data_ptr<weight_t>();
  const acc_t* rp = rstd.const_data_ptr<acc_t>();
  scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      acc_t* acc = partial.data() + c * n;
      const int64_t r0 = c * rows_per_chunk, r1 = std::min(rows, r0 + rows_per_chunk);
      for (int64_t r = r0; r < r1; ++r) {
        if constexpr (std::is_same_v<scalar_t, double>) {
          rms_norm_bwd_row_f64(dyp + r * n, xp + r * n, wp, rp[r], dxp + r * n, acc, n);
        } else {
          rms_norm_bwd_row<scalar_t, weight_t, out_t>(dyp + r * n, xp + r * n, wp, rp[r], dxp + r * n, acc, n);
        }
      }
    }
  });
  weight_t* dwp = dw.mutable_data_ptr<weight_t>();
  at::parallel_for(0, n, 1024, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      acc_t s = 0;
      for (int64_t c = 0; c < chunks; ++c) s += partial[c * n + i];
      dwp[i] = static_cast<weight_t>(s);
    }
  });
}

// Calls f.template operator()<scalar_t, weight_t>() for the supported (x, weight) dtype pairs.
template <typename F>
void dispatch_x_w(at::ScalarType xt, at::ScalarType wt, F&& f) {
  switch (xt) {
    case at::kDouble:
      return f.template operator()<double, double>();
    case at::kFloat:
      return f.template operator()<float, float>();
    case at::kBFloat16:
      if (wt == at::kFloat) return f.template operator()<at::BFloat16, float>();
      return f.template operator()<at::BFloat16, at::BFloat16>();
    case at::kHalf:
      if (wt == at::kFloat) return f.template operator()<at::Half, float>();
      return f.template operator()<at::Half, at::Half>();
    default:
      TORCH_CHECK(false, "lladapter::rms_norm: unsupported dtype ", xt);
  }
}

std::tuple<at::Tensor, at::Tensor> rms_norm_cpu(const at::Tensor& x_in, const at::Tensor& weight_in, double eps) {
  rms_norm_check_inputs(x_in, weight_in, kCpuKernels);
  TORCH_CHECK(eps >= 0, "lladapter::rms_norm: eps must be >= 0, got ", eps);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor w = weight_in.contiguous();
  const auto out_dtype = c10::promoteTypes(x.scalar_type(), w.scalar_type());
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(out_dtype));
  auto stat_sizes = x.sizes().vec();
  stat_sizes.pop_back();
  at::Tensor rstd = at::empty(stat_sizes, x.options().dtype(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  if (x.numel() == 0) return {y, rstd};
  dispatch_x_w(x.scalar_type(), w.scalar_type(), [&]<typename scalar_t, typename weight_t>() {
    rms_norm_fwd_impl<scalar_t, weight_t>(x, w, y, rstd, eps);
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x_in,
                                                         const at::Tensor& weight_in, const at::Tensor& rstd_in) {
  rms_norm_check_backward_inputs(grad_y, x_in, weight_in, rstd_in, kCpuKernels);
  const at::Tensor dy = grad_y.contiguous();
  const at::Tensor x = x_in.contiguous();
  const at::Tensor w = weight_in.contiguous();
  const at::Tensor rstd = rstd_in.contiguous();
  at::Tensor dx = at::empty(x.sizes(), x.options());
  at::Tensor dw = at::zeros(w.sizes(), w.options());
  if (x.numel() == 0) return {dx, dw};
  dispatch_x_w(x.scalar_type(), w.scalar_type(), [&]<typename scalar_t, typename weight_t>() {
    rms_norm_bwd_impl<scalar_t, weight_t>(dy, x, w, rstd, dx, dw);
  });
  return {dx, dw};
}

}  // namespace

TORCH_LIBRARY_IMPL(lladapter, CPU, m) {
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("rms_norm_backward", &rms_norm_backward_cpu);
}

}  // namespace lladapter::cpu
