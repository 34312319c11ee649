// openblas_mm (csrc/decode_layers.h): C = A @ B for float32 CPU matrices through an OpenBLAS library loaded at run
// time (nn.gemm_route's "openblas" route; the library is the scipy-openblas32 package's). Why: on an AMD EPYC (AVX2)
// the MKL in torch's wheels runs the model's projection GEMMs (512 rows, 576-1536 wide) at 130-170 GFLOP/s on two
// threads; OpenBLAS's single-threaded sgemm reaches ~105 per core, ~195 when each of torch's intra-op threads runs
// it on its own slab of C (docs/benchmarks.md). Its own thread pool is not used: on a two-core host its threads
// and torch's OpenMP threads, each spinning while the other works, made a training step 2.8x slower. So the library
// is set to one thread, and the split is torch's at::parallel_for, fixed by the thread count (deterministic).
#include <dlfcn.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/record_function.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <climits>
#include <mutex>
#include <optional>
#include <string>

#include "decode_layers.h"

namespace lladapter {

namespace {

constexpr const char* kOp = "lladapter openblas_mm";
enum CblasEnum { kRowMajor = 101, kNoTrans = 111, kTrans = 112 };  // cblas.h's values
using Sgemm = void (*)(int order, int trans_a, int trans_b, int m, int n, int k, float alpha, const float* a, int lda,
                       const float* b, int ldb, float beta, float* c, int ldc);
using SetThreads = void (*)(int);

Sgemm g_sgemm = nullptr;
std::string g_library;
std::mutex g_load_mutex;

// A 2-D matrix as BLAS takes it: row-major (trans false) or the transpose of a row-major one (trans true), with its
// leading dimension; other layouts are copied to row-major first.
struct BlasMatrix {
  at::Tensor t;  // keeps a copy alive
  bool trans;
  int64_t ld;
};

BlasMatrix blas_matrix(const at::Tensor& t) {
  const int64_t r = t.size(0), c = t.size(1);
  if (t.stride(1) == 1 && (r == 1 || t.stride(0) >= std::max<int64_t>(c, 1)))
    return {t, false, r == 1 ? std::max<int64_t>(c, 1) : t.stride(0)};
  if (t.stride(0) == 1 && (c == 1 || t.stride(1) >= std::max<int64_t>(r, 1)))
    return {t, true, c == 1 ? std::max<int64_t>(r, 1) : t.stride(1)};
  return {t.contiguous(), false, std::max<int64_t>(c, 1)};
}

// element (i, j) offset of a BlasMatrix's data for row i / column j of the logical matrix
int64_t offset(const BlasMatrix& m, int64_t i, int64_t j) { return m.trans ? j * m.ld + i : i * m.ld + j; }

void check_matrix(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 2, kOp, ": ", name,
              " must be a 2-D float32 CPU tensor, got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
  TORCH_CHECK(t.layout() == at::kStrided, kOp, ": ", name, " must be a dense (strided) tensor");
  TORCH_CHECK(t.size(0) < INT_MAX && t.size(1) < INT_MAX && t.stride(0) < INT_MAX && t.stride(1) < INT_MAX, kOp, ": ",
              name, " ", t.sizes(), " is too large for a 32-bit BLAS");
}

}  // namespace

std::string openblas_load(const std::string& path) {
  std::lock_guard<std::mutex> lock(g_load_mutex);
  if (g_sgemm != nullptr) return g_library;
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  TORCH_CHECK(handle != nullptr, kOp, ": cannot load ", path, ": ", dlerror());
  // scipy-openblas prefixes its symbols (no clash with another BLAS in the process); a plain OpenBLAS does not
  const char* names[][2] = {{"scipy_cblas_sgemm", "scipy_openblas_set_num_threads"},
                            {"cblas_sgemm", "openblas_set_num_threads"}};
  for (const auto& name : names) {
    auto sgemm = reinterpret_cast<Sgemm>(dlsym(handle, name[0]));
    auto set_threads = reinterpret_cast<SetThreads>(dlsym(handle, name[1]));
    if (sgemm != nullptr && set_threads != nullptr) {
      set_threads(1);  // one thread per call: torch's threads split the work (see the top of this file)
      g_sgemm = sgemm;
      g_library = path;
      return g_library;
    }
  }
  dlclose(handle);
  TORCH_CHECK(false, kOp, ": ", path, " is not an OpenBLAS (no cblas_sgemm and openblas_set_num_threads)");
}

std::string openblas_library() { return g_library; }

at::Tensor openblas_mm(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& out) {
  TORCH_CHECK(g_sgemm != nullptr, kOp, ": no OpenBLAS loaded (nn.gemm_route loads it)");
  check_matrix(a, "a");
  check_matrix(b, "b");
  TORCH_CHECK(a.size(1) == b.size(0), kOp, ": a [", a.size(0), ", ", a.size(1), "] and b [", b.size(0), ", ", b.size(1),
              "] cannot be multiplied");
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  if (out.has_value()) {
    TORCH_CHECK(out->device().is_cpu() && out->scalar_type() == at::kFloat && out->dim() == 2 && out->size(0) == M &&
                    out->size(1) == N && out->stride(1) == 1 && out->stride(0) >= std::max<int64_t>(N, 1) &&
                    out->stride(0) < INT_MAX,
                kOp, ": out must be a row-major float32 CPU tensor [", M, ", ", N, "], got ", out->scalar_type(), " ",
                out->sizes(), " strides ", out->strides());
  }
  RECORD_FUNCTION("lladapter::openblas_mm", std::vector<c10::IValue>({a, b}));
  at::Tensor c = out.has_value() ? *out : at::empty({M, N}, a.options());
  if (M == 0 || N == 0) return c;
  if (K == 0) return c.zero_();
  const BlasMatrix A = blas_matrix(a), B = blas_matrix(b);
  const int64_t ldc = M == 1 ? std::max<int64_t>(N, 1) : c.stride(0);
  const float* ap = A.t.const_data_ptr<float>();
  const float* bp = B.t.const_data_ptr<float>();
  float* cp = c.mutable_data_ptr<float>();
  // One slab of C per thread: rows when there are enough of them (a slab keeps all of B), else columns. Slab edges
  // on multiples of 16, as the GEMM's register blocks are.
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), std::max(M, N) / 16));
  const bool by_rows = M >= 32 * threads || M >= N;
  const int64_t extent = by_rows ? M : N;
  auto edge = [&](int64_t t) { return t == threads ? extent : std::min(extent, (t * extent / threads) / 16 * 16); };
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t lo = edge(t), hi = edge(t + 1);
      if (hi <= lo) continue;
      if (by_rows)
        g_sgemm(kRowMajor, A.trans ? kTrans : kNoTrans, B.trans ? kTrans : kNoTrans, hi - lo, N, K, 1.0f,
                ap + offset(A, lo, 0), A.ld, bp, B.ld, 0.0f, cp + lo * ldc, ldc);
      else
        g_sgemm(kRowMajor, A.trans ? kTrans : kNoTrans, B.trans ? kTrans : kNoTrans, M, hi - lo, K, 1.0f, ap, A.ld,
                bp + offset(B, 0, lo), B.ld, 0.0f, cp + lo, ldc);
    }
  });
  return c;
}

}  // namespace lladapter
