// C++ checks of the quantized_linear CPU kernel through the dispatcher, on every path this build and CPU can run
// (avx512, avx2, scalar: lladapter::quantized_linear_cpu_isa), against a double-precision loop over the codes
// (int8 per row and per block, int4 in pack_int4's layout, packed here from its definition in
// csrc/quantized_linear.h). Run by CTest.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "check.h"

namespace {

using lladapter_test::expect;

auto quantized_linear_op() {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("lladapter::quantized_linear", "")
      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
}

auto isa_op() {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("lladapter::quantized_linear_cpu_isa", "")
      .typed<std::string(std::string)>();
}

// y (the kernel's) against ref (double, from the same x values): |y - ref| <= (K + 2) u bound, the rounding-error
// bound of an fp32 dot product of K terms plus the scale multiplies (bound: sum_k |x_k| |w_k|), plus the rounding
// to the output dtype.
void compare(const std::string& tag, const at::Tensor& y, const std::vector<double>& ref,
             const std::vector<double>& bound, int64_t K) {
  const at::Tensor yd = y.to(at::kDouble).contiguous();
  const double* yp = yd.const_data_ptr<double>();
  const double u = std::ldexp(1.0, -24);
  // half an ulp of the output dtype, relative
  const double rel = y.scalar_type() == at::kBFloat16 ? std::ldexp(1.0, -8)
                     : y.scalar_type() == at::kHalf   ? std::ldexp(1.0, -11)
                                                      : 0.0;
  double worst = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double sum_err = (K + 2) * u * bound[i];
    const double allowed = sum_err + rel * (std::abs(ref[i]) + sum_err) + 1e-30;
    worst = std::max(worst, std::abs(yp[i] - ref[i]) / allowed);
  }
  expect(worst <= 1.0, tag + ": error / allowed = " + std::to_string(worst));
}

// x [M, K] as doubles (the values the kernel sees, after x's own rounding).
std::vector<double> as_doubles(const at::Tensor& t) {
  const at::Tensor d = t.to(at::kDouble).contiguous();
  return std::vector<double>(d.const_data_ptr<double>(), d.const_data_ptr<double>() + d.numel());
}

void check_int8(const std::string& isa, int64_t M, int64_t N, int64_t K, int64_t block, at::ScalarType x_dtype,
                at::ScalarType scale_dtype) {
  const at::Tensor x = at::randn({M, K}).to(x_dtype);
  const at::Tensor codes = at::randint(-127, 128, {N, K}, at::kChar);
  const int64_t G = block == 0 ? 1 : K / block, g = block == 0 ? K : block;
  at::Tensor scales =
      (at::rand(block == 0 ? std::vector<int64_t>{N} : std::vector<int64_t>{N, G}) / 64 + 1e-3).to(scale_dtype);
  const at::Tensor y = quantized_linear_op().call(x, codes, scales);
  const std::vector<double> xd = as_doubles(x), sd = as_doubles(scales);
  const int8_t* c = codes.const_data_ptr<int8_t>();
  std::vector<double> ref(M * N), bound(M * N);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double acc = 0, mag = 0;
      for (int64_t k = 0; k < K; ++k) {
        const double w = c[n * K + k] * sd[n * G + k / g];
        acc += xd[m * K + k] * w;
        mag += std::abs(xd[m * K + k] * w);
      }
      ref[m * N + n] = acc;
      bound[m * N + n] = mag;
    }
  compare("int8 " + isa + " M=" + std::to_string(M) + " N=" + std::to_string(N) + " K=" + std::to_string(K) +
              " block=" + std::to_string(block) + " x " + c10::toString(x_dtype) + " scales " +
              c10::toString(scale_dtype),
          y, ref, bound, K);
}

// q [N][K] in [0, 15] packed as csrc/quantized_linear.h describes: blocks of 32 rows input by input (16 bytes per
// input, row i low nibble, row 16 + i high), a last block of 16 rows pairing rows 2p (low) and 2p + 1 (high).
at::Tensor pack_int4(const std::vector<uint8_t>& q, int64_t N, int64_t K) {
  at::Tensor out = at::zeros({N, K / 2}, at::kByte);
  uint8_t* p = out.mutable_data_ptr<uint8_t>();
  const int64_t full = N / 32 * 32;
  for (int64_t b = 0; b < full / 32; ++b)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t i = 0; i < 16; ++i)
        p[b * 16 * K + k * 16 + i] = q[(32 * b + i) * K + k] | (q[(32 * b + 16 + i) * K + k] << 4);
  for (int64_t k = 0; k < K && full < N; ++k)
    for (int64_t i = 0; i < 8; ++i)
      p[full * K / 2 + k * 8 + i] = q[(full + 2 * i) * K + k] | (q[(full + 2 * i + 1) * K + k] << 4);
  return out;
}

void check_int4(const std::string& isa, int64_t M, int64_t N, int64_t K, int64_t G, at::ScalarType x_dtype,
                at::ScalarType scale_dtype) {
  const at::Tensor x = at::randn({M, K}).to(x_dtype);
  const at::Tensor qt = at::randint(0, 16, {N, K}, at::kByte);
  const std::vector<uint8_t> q(qt.const_data_ptr<uint8_t>(), qt.const_data_ptr<uint8_t>() + N * K);
  at::Tensor scales = ((at::rand({G, N, 2}) - 0.5) / 32).to(scale_dtype);
  const at::Tensor y = quantized_linear_op().call(x, pack_int4(q, N, K), scales);
  const std::vector<double> xd = as_doubles(x), sd = as_doubles(scales);
  const int64_t g = K / G;
  std::vector<double> ref(M * N), bound(M * N);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double acc = 0, mag = 0;
      for (int64_t k = 0; k < K; ++k) {
        const double s = sd[((k / g) * N + n) * 2], lo = sd[((k / g) * N + n) * 2 + 1];
        acc += xd[m * K + k] * (q[n * K + k] * s + lo);
        // the kernel's two terms per group: scale * sum x q and low * sum x
        mag += std::abs(xd[m * K + k]) * (std::abs(q[n * K + k] * s) + std::abs(lo));
      }
      ref[m * N + n] = acc;
      bound[m * N + n] = mag;
    }
  compare("int4 " + isa + " M=" + std::to_string(M) + " N=" + std::to_string(N) + " K=" + std::to_string(K) +
              " G=" + std::to_string(G) + " x " + c10::toString(x_dtype) + " scales " + c10::toString(scale_dtype),
          y, ref, bound, K);
}

void check_path(const std::string& isa) {
  for (int64_t M : {1, 2, 3, 8, 13}) {
    // int8 per row: K = 1, 15, 17 (masked / scalar tails), 67, 1000, 2048
    for (int64_t K : {1, 15, 17, 67, 1000, 2048}) check_int8(isa, M, 7, K, 0, at::kFloat, at::kFloat);
    check_int8(isa, M, 33, 96, 32, at::kFloat, at::kHalf);         // GGUF Q8_0
    check_int8(isa, M, 5, 100, 10, at::kBFloat16, at::kBFloat16);  // blocks of 10 (a tail in each)
    check_int8(isa, M, 9, 67, 1, at::kHalf, at::kFloat);           // blocks of 1
    check_int8(isa, M, 40, 576, 0, at::kBFloat16, at::kBFloat16);
    // int4: one 32-row block, 32 + 16, 16 alone, three blocks; groups of 3 (odd), 32, 64, 65
    check_int4(isa, M, 32, 64, 2, at::kFloat, at::kHalf);
    check_int4(isa, M, 48, 6, 2, at::kFloat, at::kFloat);
    check_int4(isa, M, 16, 128, 2, at::kBFloat16, at::kBFloat16);
    check_int4(isa, M, 96, 130, 2, at::kFloat, at::kBFloat16);
    check_int4(isa, M, 80, 576, 18, at::kHalf, at::kHalf);
  }
}

}  // namespace

int main() {
  at::manual_seed(0);
  const std::string before = isa_op().call("");
  int paths = 0;
  for (const char* isa : {"avx512", "avx2", "scalar"}) {
    try {
      isa_op().call(isa);
    } catch (const c10::Error& e) {
      const std::string what = e.what_without_backtrace();
      std::printf("path %s skipped: %s\n", isa, what.substr(0, what.find('\n')).c_str());
      continue;
    }
    std::printf("path %s\n", isa);
    ++paths;
    check_path(isa);
  }
  isa_op().call("auto");
  expect(paths >= 1, "at least the scalar path runs");
  expect(isa_op().call("") == before, "\"auto\" restores the default path " + before);
  // an unknown path name is refused with the accepted names
  bool threw = false;
  try {
    isa_op().call("sse");
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("must be 'avx512', 'avx2' or 'scalar'") != std::string::npos;
  }
  expect(threw, "quantized_linear_cpu_isa(\"sse\") raises naming the accepted paths");
  return lladapter_test::finish();
}
