// C++ checks of the CPU kernels through the dispatcher against naive fp64 loops (run by CTest).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <string>

#include "check.h"

namespace {

using lladapter_test::expect;

auto rms_norm_op() {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("lladapter::rms_norm", "")
      .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, double)>();
}

auto rms_norm_bwd_op() {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("lladapter::rms_norm_backward", "")
      .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&)>();
}

void check_rms_norm(int64_t rows, int64_t n, at::ScalarType dtype, double tol) {
  const double eps = 1e-6;
  at::Tensor x = at::randn({rows, n}).to(dtype);
  at::Tensor w = (at::rand({n}) + 0.5).to(dtype);
  at::Tensor gy = at::randn({rows, n}).to(dtype);
  auto [y, rstd] = rms_norm_op().call(x, w, eps);
  auto [dx, dw] = rms_norm_bwd_op().call(gy, x, w, rstd);
  at::Tensor xd = x.to(at::kDouble), wd = w.to(at::kDouble), gd = gy.to(at::kDouble);
  at::Tensor yd = y.to(at::kDouble), dxd = dx.to(at::kDouble), dwd = dw.to(at::kDouble);
  auto X = xd.accessor<double, 2>(), G = gd.accessor<double, 2>();
  auto W = wd.accessor<double, 1>();
  double max_err_y = 0, max_err_dx = 0, max_err_dw = 0, max_dw = 0;
  std::vector<double> dw_ref(n, 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (int64_t i = 0; i < n; ++i) ss += X[r][i] * X[r][i];
    const double rs = 1.0 / std::sqrt(ss / n + eps);
    double dot = 0;
    for (int64_t i = 0; i < n; ++i) dot += G[r][i] * W[i] * X[r][i] * rs;
    for (int64_t i = 0; i < n; ++i) {
      const double nhat = X[r][i] * rs;
      max_err_y = std::max(max_err_y, std::abs(yd[r][i].item<double>() - nhat * W[i]) / (1 + std::abs(nhat * W[i])));
      const double dxr = rs * (G[r][i] * W[i] - nhat * dot / n);
      max_err_dx = std::max(max_err_dx, std::abs(dxd[r][i].item<double>() - dxr) / (1 + std::abs(dxr)));
      dw_ref[i] += G[r][i] * nhat;
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    max_dw = std::max(max_dw, std::abs(dw_ref[i]));
    max_err_dw = std::max(max_err_dw, std::abs(dwd[i].item<double>() - dw_ref[i]));
  }
  const std::string tag =
      "rms_norm rows=" + std::to_string(rows) + " n=" + std::to_string(n) + " " + std::string(c10::toString(dtype));
  expect(max_err_y < tol, tag + " forward err " + std::to_string(max_err_y));
  expect(max_err_dx < 4 * tol, tag + " dx err " + std::to_string(max_err_dx));
  expect(max_err_dw < 4 * tol * (1 + max_dw), tag + " dweight err " + std::to_string(max_err_dw));
}

auto swiglu_op() {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("lladapter::swiglu", "")
      .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
}

auto swiglu_bwd_op() {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("lladapter::swiglu_backward", "")
      .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
}

// y = g s u, dgate = dy u s (1 + g (1 - s)), dup = dy g s against fp64 loops; halves: gate and up are the two halves
// of one [rows, 2n] tensor (strided rows, read in place).
void check_swiglu(int64_t rows, int64_t n, at::ScalarType dtype, double tol, bool halves) {
  at::Tensor gate, up;
  if (halves) {
    at::Tensor both = (3 * at::randn({rows, 2 * n})).to(dtype);
    gate = both.narrow(1, 0, n);
    up = both.narrow(1, n, n);
  } else {
    gate = (3 * at::randn({rows, n})).to(dtype);
    up = at::randn({rows, n}).to(dtype);
  }
  at::Tensor gy = at::randn({rows, n}).to(dtype);
  at::Tensor y = swiglu_op().call(gate, up);
  auto [dg, du] = swiglu_bwd_op().call(gy, gate, up);
  at::Tensor gd = gate.to(at::kDouble), ud = up.to(at::kDouble), dyd = gy.to(at::kDouble);
  at::Tensor yd = y.to(at::kDouble), dgd = dg.to(at::kDouble), dud = du.to(at::kDouble);
  auto G = gd.accessor<double, 2>(), U = ud.accessor<double, 2>(), DY = dyd.accessor<double, 2>();
  auto Y = yd.accessor<double, 2>(), DG = dgd.accessor<double, 2>(), DU = dud.accessor<double, 2>();
  double err_y = 0, err_dg = 0, err_du = 0;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < n; ++i) {
      const double g = G[r][i], u = U[r][i], dy = DY[r][i];
      const double s = 1.0 / (1.0 + std::exp(-g));
      const double y_ref = g * s * u, dg_ref = dy * u * s * (1 + g * (1 - s)), du_ref = dy * g * s;
      // relative to the terms' magnitude (dgate's bracket cancels near g = -1.28)
      err_y = std::max(err_y, std::abs(Y[r][i] - y_ref) / (1e-30 + std::abs(y_ref)));
      err_dg =
          std::max(err_dg, std::abs(DG[r][i] - dg_ref) / (1e-30 + std::abs(dy * u) * s * (1 + std::abs(g) * (1 - s))));
      err_du = std::max(err_du, std::abs(DU[r][i] - du_ref) / (1e-30 + std::abs(du_ref)));
    }
  }
  const std::string tag = "swiglu rows=" + std::to_string(rows) + " n=" + std::to_string(n) + " " +
                          std::string(c10::toString(dtype)) + (halves ? " halves" : "");
  expect(err_y < tol, tag + " forward err " + std::to_string(err_y));
  expect(err_dg < tol, tag + " dgate err " + std::to_string(err_dg));
  expect(err_du < tol, tag + " dup err " + std::to_string(err_du));
}

}  // namespace

int main() {
  at::manual_seed(0);
  for (int64_t n : {1, 7, 64, 1000, 4097}) {
    check_rms_norm(5, n, at::kFloat, 1e-5);
    check_rms_norm(5, n, at::kDouble, 1e-12);
    check_rms_norm(3, n, at::kBFloat16, 2e-2);  // bf16 inputs, bf16 rounding of normed and output
  }
  // bad input: weight of the wrong width must raise, naming weight
  bool threw = false;
  try {
    rms_norm_op().call(at::randn({2, 8}), at::ones({7}), 1e-6);
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("weight must have shape") != std::string::npos;
  }
  expect(threw, "rms_norm rejects a weight of the wrong width, naming weight");
  for (int64_t n : {1, 7, 64, 1003}) {
    for (bool halves : {false, true}) {
      check_swiglu(5, n, at::kFloat, 1e-6, halves);  // fp32 math: a few ulps of the terms
      check_swiglu(5, n, at::kDouble, 1e-14, halves);
      check_swiglu(3, n, at::kBFloat16, 5e-3, halves);  // one rounding to bf16: <= 2^-8 relative
    }
  }
  threw = false;
  try {
    swiglu_op().call(at::randn({2, 8}), at::randn({2, 7}));
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("up must have gate's shape [2, 8], got [2, 7]") != std::string::npos;
  }
  expect(threw, "swiglu rejects an up of another shape, naming up");
  return lladapter_test::finish();
}
