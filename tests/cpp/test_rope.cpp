// C++ checks of the RoPE CPU kernel through the dispatcher against naive fp64 loops (run by CTest).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <optional>
#include <string>

#include "check.h"

namespace {

using lladapter_test::expect;

using RopeSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                   const at::Tensor&, const std::optional<at::Tensor>&, c10::SymInt,
                                                   bool, bool);
using RopeInplaceSig = void(at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const std::optional<at::Tensor>&, c10::SymInt, bool, bool);

auto rope_op() { return c10::Dispatcher::singleton().findSchemaOrThrow("lladapter::rope", "").typed<RopeSig>(); }
auto rope_inplace_op() {
  return c10::Dispatcher::singleton().findSchemaOrThrow("lladapter::rope_", "").typed<RopeInplaceSig>();
}

// Tables built independently of the Python reference: angle = pos * base^(-2i/rd) in fp64.
std::pair<at::Tensor, at::Tensor> tables(int64_t P, int64_t rd, double base) {
  at::Tensor c = at::empty({P, rd / 2}, at::kFloat), s = at::empty({P, rd / 2}, at::kFloat);
  auto C = c.accessor<float, 2>(), S = s.accessor<float, 2>();
  for (int64_t p = 0; p < P; ++p) {
    for (int64_t i = 0; i < rd / 2; ++i) {
      const double ang = static_cast<double>(p) * std::pow(base, -2.0 * i / rd);
      C[p][i] = static_cast<float>(std::cos(ang));
      S[p][i] = static_cast<float>(std::sin(ang));
    }
  }
  return {c, s};
}

// Naive rotation of x [B, T, H, d] in fp64 with the given tables and positions.
at::Tensor naive(const at::Tensor& x_in, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& pos,
                 bool interleaved, bool inverse) {
  at::Tensor x = x_in.to(at::kDouble).contiguous();
  at::Tensor y = x.clone();
  auto X = x.accessor<double, 4>(), Y = y.accessor<double, 4>();
  auto C = cos.accessor<float, 2>(), S = sin.accessor<float, 2>();
  auto Pp = pos.accessor<int64_t, 2>();
  const int64_t half = cos.size(1);
  for (int64_t b = 0; b < x.size(0); ++b)
    for (int64_t t = 0; t < x.size(1); ++t)
      for (int64_t h = 0; h < x.size(2); ++h)
        for (int64_t i = 0; i < half; ++i) {
          const int64_t ia = interleaved ? 2 * i : i, ib = interleaved ? 2 * i + 1 : i + half;
          const double c = C[Pp[b][t]][i], s = (inverse ? -1.0 : 1.0) * S[Pp[b][t]][i];
          const double a = X[b][t][h][ia], bb = X[b][t][h][ib];
          Y[b][t][h][ia] = a * c - bb * s;
          Y[b][t][h][ib] = a * s + bb * c;
        }
  return y;
}

double max_rel_err(const at::Tensor& got, const at::Tensor& want) {
  return ((got.to(at::kDouble) - want).abs() / (want.abs() + 1)).max().item<double>();
}

void check_rope(int64_t B, int64_t T, int64_t Hq, int64_t Hk, int64_t d, int64_t rd, at::ScalarType dtype,
                bool interleaved, bool with_ids, bool inverse, double tol) {
  const int64_t P = 40, offset = 3;
  auto [cos, sin] = tables(P, rd, 10000.0);
  at::Tensor q = at::randn({B, T, Hq, d}).to(dtype), k = at::randn({B, T, Hk, d}).to(dtype);
  at::Tensor pos = with_ids ? at::randint(0, P, {B, T}, at::kLong)
                            : (at::arange(T, at::kLong) + offset).unsqueeze(0).expand({B, T}).contiguous();
  std::optional<at::Tensor> ids = with_ids ? std::optional<at::Tensor>(pos) : std::nullopt;
  auto [qo, ko] = rope_op().call(q, k, cos, sin, ids, c10::SymInt(with_ids ? 0 : offset), interleaved, inverse);
  const std::string tag = std::string("rope ") + c10::toString(dtype) + (interleaved ? " interleaved" : " half") +
                          " d=" + std::to_string(d) + " rd=" + std::to_string(rd) + (with_ids ? " ids" : " offset") +
                          (inverse ? " inverse" : "");
  const double eq = max_rel_err(qo, naive(q, cos, sin, pos, interleaved, inverse));
  const double ek = max_rel_err(ko, naive(k, cos, sin, pos, interleaved, inverse));
  expect(eq < tol, tag + " q err " + std::to_string(eq));
  expect(ek < tol, tag + " k err " + std::to_string(ek));
  at::Tensor qi = q.clone(), ki = k.clone();
  rope_inplace_op().call(qi, ki, cos, sin, ids, c10::SymInt(with_ids ? 0 : offset), interleaved, inverse);
  expect(at::equal(qi, qo) && at::equal(ki, ko), tag + " in-place equals out-of-place");
}

}  // namespace

int main() {
  at::manual_seed(0);
  for (bool interleaved : {false, true}) {
    for (bool ids : {false, true}) {
      check_rope(2, 5, 3, 1, 128, 128, at::kFloat, interleaved, ids, false, 1e-6);
      check_rope(2, 5, 3, 1, 18, 18, at::kFloat, interleaved, ids, true, 1e-6);   // vector + scalar tail
      check_rope(2, 5, 3, 1, 64, 32, at::kFloat, interleaved, ids, false, 1e-6);  // partial rotary
      check_rope(1, 3, 2, 2, 10, 10, at::kDouble, interleaved, ids, false, 1e-12);
      check_rope(2, 4, 4, 2, 64, 64, at::kBFloat16, interleaved, ids, false, 4e-3);  // one bf16 rounding: 2^-8
      check_rope(2, 4, 4, 2, 64, 64, at::kHalf, interleaved, ids, true, 5e-4);       // one fp16 rounding: 2^-11
    }
  }
  // bad inputs name the argument
  auto [cos, sin] = tables(8, 16, 10000.0);
  auto raises = [&](const at::Tensor& q, const at::Tensor& k, int64_t offset, const char* needle) {
    try {
      rope_op().call(q, k, cos, sin, std::nullopt, c10::SymInt(offset), false, false);
    } catch (const c10::Error& e) {
      return std::string(e.what()).find(needle) != std::string::npos;
    }
    return false;
  };
  expect(raises(at::randn({1, 2, 2, 15}), at::randn({1, 2, 1, 15}), 0, "head_dim must be even"),
         "rope rejects an odd head_dim");
  expect(raises(at::randn({1, 4, 2, 16}), at::randn({1, 4, 1, 16}), 5, "exceed the cos/sin table of 8 positions"),
         "rope rejects positions beyond the table");
  expect(raises(at::randn({1, 2, 2, 16}), at::randn({1, 2, 1, 8}), 0, "k's head_dim must equal q's head_dim"),
         "rope rejects mismatched head dims");
  return lladapter_test::finish();
}
