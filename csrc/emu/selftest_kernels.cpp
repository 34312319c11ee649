// Self-tests of the emulator: CUDA-style kernels written against emu.h only, correct ones (their results are
// checked here) and deliberately broken ones (each must end in a KernelError naming the check). Run by name through
// llemu::run_selftest (Python: lladapter_ext._emu.selftest(name)); tests/test_emulator.py asserts on the messages.
#undef NDEBUG
#include <cassert>

#include "emu.h"
#include "guarded_memory.h"
#include "selftest.h"

#include <chrono>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <set>
#include <stdexcept>
#include <thread>

// The compat macros as proposed in emu.h (csrc/cuda/compat.h owns the real ones).
#define LL_SHARED(type, name, dims)                        \
  type(&name) dims = ::llemu::static_shared<type dims>(    \
      [] {                                                 \
        static char llemu_site_key_;                       \
        return static_cast<const void*>(&llemu_site_key_); \
      }(),                                                 \
      #name)
#define LL_DYNAMIC_SHARED(type, name, align) type* const name = static_cast<type*>(::llemu::dynamic_shared(align))
#define LL_LAUNCH(grid, block, smem, stream, ...) \
  ::llemu::make_launcher(#__VA_ARGS__, __FILE__, __LINE__, grid, block, smem, stream, __VA_ARGS__)

namespace llemu {
namespace {

constexpr unsigned kFull = 0xffffffffu;

void expect(bool ok, const std::string& what) {
  if (!ok) throw std::runtime_error("llemu selftest expectation failed: " + what);
}

struct Guarded {  // a guarded allocation (ends against a PROT_NONE page)
  void* p;
  explicit Guarded(size_t n) : p(guarded_alloc(n)) {}
  ~Guarded() { guarded_free(p); }
  Guarded(const Guarded&) = delete;
  Guarded& operator=(const Guarded&) = delete;
  template <class T>
  T* as() const {
    return static_cast<T*>(p);
  }
};

template <class T>
std::vector<double> to_doubles(const T* p, size_t n) {
  std::vector<double> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<double>(p[i]);
  return v;
}

// ------------------------------------------------------------------------------------------------ correct kernels
__global__ void st_warp_ops(float* out) {
  const int t = threadIdx.x, lane = t & 31;
  const float v = static_cast<float>(t + 1);
  float s = v;
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(kFull, s, o);
  float d = v;
  for (int o = 16; o > 0; o >>= 1) d += __shfl_down_sync(kFull, d, o);
  const float up = __shfl_up_sync(kFull, v, 1);
  const float idx = __shfl_sync(kFull, v, 7);
  const float seg = __shfl_sync(kFull, v, 3, 8);
  const double dd = __shfl_xor_sync(kFull, static_cast<double>(t) * 1.5, 1);
  const int64_t ii = __shfl_sync(kFull, static_cast<int64_t>(t) << 40, 0);
  const unsigned bal = __ballot_sync(kFull, lane % 3 == 0);
  const int any = __any_sync(kFull, t == 40);
  const int all = __all_sync(kFull, t < 64);
  const __half h = __shfl_xor_sync(kFull, __float2half_rn(v), 2);
  float* o = out + t * 11;
  o[0] = s;
  o[1] = lane == 0 ? d : 0.f;
  o[2] = up;
  o[3] = idx;
  o[4] = seg;
  o[5] = static_cast<float>(dd);
  o[6] = static_cast<float>(ii >> 40);
  o[7] = static_cast<float>(bal);
  o[8] = static_cast<float>(any);
  o[9] = static_cast<float>(all);
  o[10] = __half2float(h);
}

SelftestResult t_warp_ops() {
  std::vector<float> out(64 * 11, -1.f);
  LL_LAUNCH(1, 64, 0, current_stream(), st_warp_ops)(out.data());
  for (int t = 0; t < 64; ++t) {
    const int lane = t & 31, w0 = t & ~31;
    float wsum = 0;
    for (int j = 0; j < 32; ++j) wsum += static_cast<float>(w0 + j + 1);
    const float* o = &out[t * 11];
    unsigned bal = 0;
    for (int j = 0; j < 32; j += 3) bal |= 1u << j;
    expect(o[0] == wsum, "xor reduction");
    expect(lane != 0 || o[1] == wsum, "down reduction");
    expect(o[2] == static_cast<float>(lane == 0 ? t + 1 : t), "shfl_up");
    expect(o[3] == static_cast<float>(w0 + 8), "shfl idx");
    expect(o[4] == static_cast<float>((t & ~7) + 4), "shfl width 8");
    expect(o[5] == static_cast<float>((t ^ 1) * 1.5), "double shfl_xor");
    expect(o[6] == static_cast<float>(w0), "int64 shfl");
    expect(o[7] == static_cast<float>(bal), "ballot");
    expect(o[8] == (t >= 32 ? 1.f : 0.f), "any");
    expect(o[9] == 1.f, "all");
    expect(o[10] == static_cast<float>((t ^ 2) + 1), "half shfl_xor");
  }
  return {{"out", to_doubles(out.data(), out.size())}};
}

__global__ void st_block2d(int* out) {
  LL_SHARED(int, ids, [128]);
  const int lin = threadIdx.x + threadIdx.y * blockDim.x;
  ids[lin] = lin * 10;
  __syncthreads();
  const int nb = ids[(lin + 1) % 128];
  const int lane0 = __shfl_sync(kFull, lin, 0);  // lane = linear id % 32, also in a 2-D block
  const int b = blockIdx.x + blockIdx.y * gridDim.x;
  out[b * 128 + lin] = nb + (lane0 == (lin & ~31) ? 1 : 1000) + (threadIdx.z == 0 ? 0 : 5000);
}

SelftestResult t_block2d() {
  std::vector<int> out(6 * 128, -1);
  LL_LAUNCH(dim3(2, 3), dim3(16, 8), 0, current_stream(), st_block2d)(out.data());
  for (int b = 0; b < 6; ++b) {
    for (int l = 0; l < 128; ++l) expect(out[b * 128 + l] == ((l + 1) % 128) * 10 + 1, "2-D block result");
  }
  return {{"out", to_doubles(out.data(), out.size())}};
}

__global__ void st_block1024(float* out) {
  LL_SHARED(float, buf, [1024]);
  const int t = threadIdx.x;
  buf[t] = static_cast<float>(t);
  __syncthreads();
  for (int s = 512; s > 0; s >>= 1) {
    if (t < s) buf[t] += buf[t + s];
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = buf[0];
}

SelftestResult t_block1024() {
  std::vector<float> out(3, -1.f);
  LL_LAUNCH(3, 1024, 0, current_stream(), st_block1024)(out.data());
  for (float v : out) expect(v == 1023.f * 1024.f / 2.f, "1024-thread tree reduction");
  return {{"out", to_doubles(out.data(), out.size())}};
}

std::mutex g_tid_mu;
std::set<std::thread::id> g_tids;

__global__ void st_many_blocks(float* out) {
  LL_SHARED(float, part, [2]);
  const int t = threadIdx.x;
  float v = static_cast<float>(blockIdx.x * 64 + t);
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  if ((t & 31) == 0) part[t >> 5] = v;
  __syncthreads();
  if (t == 0) {
    out[blockIdx.x] = part[0] + part[1];
    std::lock_guard<std::mutex> lk(g_tid_mu);  // host code inside a kernel: only the emulator allows this
    g_tids.insert(std::this_thread::get_id());
  }
}

SelftestResult t_many_blocks() {
  {
    std::lock_guard<std::mutex> lk(g_tid_mu);
    g_tids.clear();
  }
  const int nb = 2048;
  std::vector<float> out(nb, -1.f);
  LL_LAUNCH(nb, 64, 0, current_stream(), st_many_blocks)(out.data());
  for (int b = 0; b < nb; ++b) {
    float e = 0;
    for (int t = 0; t < 64; ++t) e += static_cast<float>(b * 64 + t);
    expect(out[b] == e, "per-block sum");
  }
  std::lock_guard<std::mutex> lk(g_tid_mu);
  return {{"out", to_doubles(out.data(), out.size())}, {"os_threads", {static_cast<double>(g_tids.size())}}};
}

// Threads 100.. (and so all of warp 3 and part of warp 4... of a 160-thread block) leave early; the rest meet at
// barriers: a barrier counts the threads that have not exited.
__global__ void st_exited_barrier(float* out) {
  LL_SHARED(float, buf, [160]);
  const int t = threadIdx.x;
  if (t >= 100) return;
  buf[t] = static_cast<float>(t);
  __syncthreads();
  const float v = buf[99 - t];
  __syncthreads();
  out[t] = v;
}

SelftestResult t_exited_barrier() {
  std::vector<float> out(160, -1.f);
  LL_LAUNCH(2, 160, 0, current_stream(), st_exited_barrier)(out.data());
  for (int t = 0; t < 100; ++t) expect(out[t] == static_cast<float>(99 - t), "values across an early exit");
  return {{"out", to_doubles(out.data(), 100)}};
}

// 40 threads: warp 1 has lanes 0-7 only; its collectives use mask 0xff.
__global__ void st_partial_warp(int* out) {
  const int t = threadIdx.x;
  const unsigned mask = t < 32 ? kFull : 0xffu;
  int v = t;
  for (int o = 1; o < (t < 32 ? 32 : 8); o <<= 1) v += __shfl_xor_sync(mask, v, o);
  out[t] = v;
}

SelftestResult t_partial_warp() {
  std::vector<int> out(40, -1);
  LL_LAUNCH(1, 40, 0, current_stream(), st_partial_warp)(out.data());
  for (int t = 0; t < 40; ++t) expect(out[t] == (t < 32 ? 31 * 32 / 2 : 32 * 8 + 28), "partial warp sums");
  return {{"out", to_doubles(out.data(), out.size())}};
}

// Reads shared memory before anything wrote it: NaN (0xFF bytes) in fp32, fp16 and bf16.
__global__ void st_smem_nan(float* out) {
  LL_SHARED(float, s, [64]);
  LL_SHARED(__half, sh, [64]);
  LL_DYNAMIC_SHARED(float, dyn, 16);
  const int t = threadIdx.x;
  out[t] = s[t];
  out[64 + t] = dyn[t];
  out[128 + t] = __half2float(sh[t]);
  const __nv_bfloat16* db = reinterpret_cast<const __nv_bfloat16*>(dyn);
  out[192 + t] = __bfloat162float(db[t]);
}

SelftestResult t_smem_nan() {
  std::vector<float> out(256, 0.f);
  LL_LAUNCH(2, 64, 64 * sizeof(float), current_stream(), st_smem_nan)(out.data());
  for (float v : out) expect(v != v, "unwritten shared memory reads as NaN");
  return {{"out", to_doubles(out.data(), out.size())}};
}

// A missing barrier: each thread reads a value another warp wrote; without the barrier the result depends on the
// schedule (NaN where the writer had not run yet).
template <bool kSync>
__global__ void st_race(float* out) {
  LL_SHARED(float, buf, [128]);
  const int t = threadIdx.x;
  buf[t] = static_cast<float>(t) * 2.f;
  if (kSync) __syncthreads();
  const float v = buf[(t + 37) % 128];
  __syncthreads();
  out[blockIdx.x * 128 + t] = v;
}

SelftestResult t_race(bool sync) {
  std::vector<float> out(4 * 128, 0.f);
  if (sync) {
    LL_LAUNCH(4, 128, 0, current_stream(), st_race<true>)(out.data());
  } else {
    LL_LAUNCH(4, 128, 0, current_stream(), st_race<false>)(out.data());
  }
  return {{"out", to_doubles(out.data(), out.size())}};
}

// ---- wmma: 64 x 64 x 64 GEMM, C = A B (A row-major M x K, B row-major K x N or its transpose), one block of four
// warps, warp w owns rows 16w .. 16w + 15. A goes through dynamic shared memory (padded rows), B is read from
// global memory as row_major or col_major fragments.
constexpr int kG = 64, kLDA = kG + 8;

template <typename T, bool kBCol>
__global__ void st_wmma_gemm(const T* a, const T* b, float* c) {
  namespace wmma = nvcuda::wmma;
  LL_DYNAMIC_SHARED(unsigned char, smem, 128);
  T* As = reinterpret_cast<T*>(smem);
  for (int i = threadIdx.x; i < kG * kG; i += blockDim.x) As[(i / kG) * kLDA + i % kG] = a[i];
  __syncthreads();
  const int warp = threadIdx.x / 32;
  using BLayout = std::conditional_t<kBCol, wmma::col_major, wmma::row_major>;
  for (int nt = 0; nt < kG / 16; ++nt) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.f);
    for (int kt = 0; kt < kG / 16; ++kt) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> fb;
      wmma::load_matrix_sync(fa, As + warp * 16 * kLDA + kt * 16, kLDA);
      // B(k, n): row-major at b[k * kG + n]; col-major (B^T stored) at b[n * kG + k]
      wmma::load_matrix_sync(fb, kBCol ? b + nt * 16 * kG + kt * 16 : b + kt * 16 * kG + nt * 16, kG);
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(c + warp * 16 * kG + nt * 16, acc, kG, wmma::mem_row_major);
  }
}

template <typename T>
T from_f(float f);
template <>
__half from_f<__half>(float f) {
  return __float2half_rn(f);
}
template <>
__nv_bfloat16 from_f<__nv_bfloat16>(float f) {
  return __float2bfloat16_rn(f);
}
float to_f(__half h) { return __half2float(h); }
float to_f(__nv_bfloat16 h) { return __bfloat162float(h); }

template <typename T>
SelftestResult t_wmma_gemm(bool b_col) {
  alignas(64) static T a[kG * kG], b[kG * kG];
  alignas(64) static float c[kG * kG];
  std::vector<float> ref(kG * kG);
  uint64_t s = 12345;
  auto rnd = [&] {
    s = s * 6364136223846793005ULL + 1442695040888963407ULL;
    return static_cast<float>(static_cast<int>((s >> 33) % 2001) - 1000) / 500.f;  // [-2, 2]
  };
  for (int i = 0; i < kG * kG; ++i) a[i] = from_f<T>(rnd());
  for (int i = 0; i < kG * kG; ++i) b[i] = from_f<T>(rnd());
  // b holds B (row-major) or B^T (col-major view of B)
  for (int m = 0; m < kG; ++m) {
    for (int n = 0; n < kG; ++n) {
      float acc = 0.f;
      for (int k = 0; k < kG; ++k) acc += to_f(a[m * kG + k]) * to_f(b_col ? b[n * kG + k] : b[k * kG + n]);
      ref[m * kG + n] = acc;
    }
  }
  const size_t smem = kG * kLDA * sizeof(T);
  if (b_col) {  // through a function-pointer variable, as the attention launchers do
    auto kernel = st_wmma_gemm<T, true>;
    set_max_dynamic_smem(kernel, static_cast<int>(smem));
    LL_LAUNCH(1, 128, smem, current_stream(), kernel)(a, b, c);
  } else {
    LL_LAUNCH(1, 128, smem, current_stream(), st_wmma_gemm<T, false>)(a, b, c);
  }
  double max_err = 0;
  for (int i = 0; i < kG * kG; ++i) max_err = std::max(max_err, std::abs(static_cast<double>(c[i]) - ref[i]));
  return {{"out", to_doubles(c, kG * kG)}, {"ref", to_doubles(ref.data(), ref.size())}, {"max_err", {max_err}}};
}

// Indexes x[i] assuming the sm_80 layout (row of element i = lane / 4 + 8 * ((i >> 1) & 1)) to scale row r of A by
// r + 1, then D = A' I. Correct only when the emulator's layout is the one assumed.
__global__ void st_wmma_layout_probe(const __half* a, const __half* eye, float* d) {
  namespace wmma = nvcuda::wmma;
  const int lane = threadIdx.x & 31;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::load_matrix_sync(fa, a, 16);
  wmma::load_matrix_sync(fb, eye, 16);
  for (int i = 0; i < fa.num_elements; ++i) {
    const int row = (lane >> 2) + 8 * ((i >> 1) & 1);
    fa.x[i] = __float2half_rn(__half2float(fa.x[i]) * static_cast<float>(row + 1));
  }
  wmma::fill_fragment(acc, 0.f);
  wmma::mma_sync(acc, fa, fb, acc);
  wmma::store_matrix_sync(d, acc, 16, wmma::mem_row_major);
}

SelftestResult t_wmma_layout_probe() {
  alignas(64) static __half a[256], eye[256];
  alignas(64) static float d[256];
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 16; ++c) {
      a[r * 16 + c] = __float2half_rn(static_cast<float>(c + 1) / 16.f);
      eye[r * 16 + c] = __float2half_rn(r == c ? 1.f : 0.f);
    }
  }
  LL_LAUNCH(1, 32, 0, current_stream(), st_wmma_layout_probe)(a, eye, d);
  std::vector<double> expect_sm80(256);
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 16; ++c) expect_sm80[r * 16 + c] = static_cast<double>(c + 1) / 16.0 * (r + 1);
  }
  return {{"out", to_doubles(d, 256)}, {"expected_if_sm80", expect_sm80}};
}

// ------------------------------------------------------------------------------------------------ broken kernels
// Threads 0-47 wait at __syncthreads while 48-63 wait at __syncwarp for lanes 32-47 of their warp: deadlock.
__global__ void st_deadlock_barrier() {
  if (threadIdx.x < 48) {
    __syncthreads();
  } else {
    __syncwarp();
  }
}

__global__ void st_barrier_sites() {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

__global__ void st_shfl_exited_lane(float* out) {
  if (threadIdx.x == 31) return;
  out[threadIdx.x] = __shfl_xor_sync(kFull, 1.f, 1);
}

__global__ void st_syncwarp_exited_lane() {
  if (threadIdx.x == 31) return;  // in-order: lanes 0-30 already wait when lane 31 leaves
  __syncwarp();
}

__global__ void st_mask_without_caller(float* out) { out[threadIdx.x] = __shfl_sync(0xfffffffeu, 1.f, 1); }

__global__ void st_different_collectives(float* out) {
  if (threadIdx.x < 16) {
    out[threadIdx.x] = __shfl_xor_sync(kFull, 1.f, 1);
  } else {
    __syncwarp();
  }
}

__global__ void st_warp_deadlock() {
  if (threadIdx.x < 16) {
    __syncwarp();
  } else {
    __syncthreads();
  }
}

__global__ void st_shfl_src_outside_mask(float* out) {
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, 1.f, 16);
}

__global__ void st_smem_oob_static(float* out) {
  LL_SHARED(float, small, [32]);
  LL_SHARED(float, other, [32]);
  const int t = threadIdx.x;
  small[t + 1] = 1.f;  // thread 31 writes small[32]
  other[t] = 2.f;
  __syncthreads();
  out[t] = small[t] + other[t];
}

__global__ void st_smem_oob_dynamic_far(float* out) {
  LL_DYNAMIC_SHARED(float, dyn, 16);
  dyn[threadIdx.x * 1024] = 1.f;  // 1000 floats of dynamic smem; thread 1 writes 4096 bytes in
  out[threadIdx.x] = 0.f;
}

__global__ void st_smem_oob_dynamic_slack(float* out) {
  LL_DYNAMIC_SHARED(float, dyn, 16);
  dyn[threadIdx.x + 1] = 1.f;  // 250 floats of dynamic smem: thread 249 writes one past the end (into the slack)
  out[threadIdx.x] = 0.f;
}

// thread 31 accesses element `last`, the others their own index
__global__ void st_global_read(const float* in, float* out, int last) {
  const int t = threadIdx.x;
  out[t] = in[t == 31 ? last : t];
}

__global__ void st_global_write(float* buf, int last) {
  const int t = threadIdx.x;
  buf[t == 31 ? last : t] = 1.f;
}

__global__ void st_partial_warp_full_mask(int* out) { out[threadIdx.x] = __shfl_xor_sync(kFull, 1, 1); }

__global__ void st_noop() {}

__global__ void st_static_smem_over() {
  LL_SHARED(float, big, [16384]);  // 64 KiB
  big[threadIdx.x] = 0.f;
}

template <int kMode>
__global__ void st_wmma_bad(const __half* base) {
  namespace wmma = nvcuda::wmma;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  const int lane = threadIdx.x & 31;
  if (kMode == 0) wmma::load_matrix_sync(fa, base + 8, 64);                           // 16 bytes off a 32-byte boundary
  if (kMode == 1) wmma::load_matrix_sync(fa, base, 20);                               // ldm 40 bytes
  if (kMode == 2) wmma::load_matrix_sync(fa, base + (lane >= 16 ? 16 * 64 : 0), 64);  // lanes disagree
}

__global__ void st_kernel_assert(const int* data) {
  CUDA_KERNEL_ASSERT(data[blockIdx.x * blockDim.x + threadIdx.x] >= 0 && "lladapter selftest: negative value");
}

__global__ void st_plain_assert(const int* data) { assert(data[threadIdx.x] >= 0); }

__attribute__((noinline)) int deep(volatile char* prev, int n) {
  volatile char buf[1024];
  buf[0] = static_cast<char>(n);
  buf[1023] = prev ? prev[0] : 0;
  return deep(buf, n + 1) + buf[7];  // not a tail call
}

__global__ void st_stack_overflow(int* out) { out[threadIdx.x] = deep(nullptr, 0); }

__global__ void st_null_deref(float* p) { p[threadIdx.x + 4] = 1.f; }

__global__ void st_int_div_zero(int* out, int d) { out[threadIdx.x] = 100 / (d - static_cast<int>(threadIdx.x)); }

// Thread 0 of every block waits for a flag nobody sets (a busy-wait: threads are not preempted, so only the
// launch timeout ends it).
__global__ void st_endless_loop(const volatile int* flag) {
  if (threadIdx.x == 0) {
    while (*flag == 0) {
    }
  }
}

__global__ void st_nested_launch() {
  if (threadIdx.x == 0) LL_LAUNCH(1, 32, 0, current_stream(), st_noop)();
}

__global__ void st_throws() {
  if (threadIdx.x == 3) throw std::runtime_error("selftest exception from kernel code");
}

// ------------------------------------------------------------------------------------------------ benchmarks
__global__ void st_bench_syncwarp(int iters) {
  for (int i = 0; i < iters; ++i) __syncwarp();
}
__global__ void st_bench_barrier(int iters) {
  for (int i = 0; i < iters; ++i) __syncthreads();
}
__global__ void st_bench_shfl(float* out, int iters) {
  float v = static_cast<float>(threadIdx.x);
  for (int i = 0; i < iters; ++i) v += __shfl_xor_sync(kFull, v, 1);
  out[threadIdx.x] = v;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

SelftestResult t_bench() {
  SelftestResult r;
  const int iters = 4000;
  Stats s0 = stats();
  auto t0 = std::chrono::steady_clock::now();
  LL_LAUNCH(1, 32, 0, current_stream(), st_bench_syncwarp)(iters);
  double dt = seconds_since(t0);
  Stats s1 = stats();
  const double sw = static_cast<double>(s1.context_switches - s0.context_switches);
  r["ns_per_switch"] = {dt * 1e9 / sw};
  r["ns_per_syncwarp_32_lanes"] = {dt * 1e9 / iters};

  const int biters = 2000;
  t0 = std::chrono::steady_clock::now();
  LL_LAUNCH(1, 128, 0, current_stream(), st_bench_barrier)(biters);
  r["ns_per_barrier_128_threads"] = {seconds_since(t0) * 1e9 / biters};

  std::vector<float> out(128);
  t0 = std::chrono::steady_clock::now();
  LL_LAUNCH(1, 128, 0, current_stream(), st_bench_shfl)(out.data(), iters);
  r["ns_per_shfl_per_warp"] = {seconds_since(t0) * 1e9 / (iters * 4.0)};

  const int launches = 300;
  t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < launches; ++i) LL_LAUNCH(1, 32, 0, current_stream(), st_noop)();
  r["us_per_launch_1x32"] = {seconds_since(t0) * 1e6 / launches};

  t0 = std::chrono::steady_clock::now();
  LL_LAUNCH(256, 128, 0, current_stream(), st_noop)();
  r["ns_per_fiber_empty_kernel"] = {seconds_since(t0) * 1e9 / (256 * 128)};
  return r;
}

// ------------------------------------------------------------------------------------------------ registry
struct Entry {
  std::string doc;
  std::function<SelftestResult()> run;
};

SelftestResult none() { return {}; }

std::map<std::string, Entry>& registry() {
  static auto* m = new std::map<std::string, Entry>{
      {"warp_ops", {"shuffles (idx/up/down/xor, widths, 2/4/8-byte types), any/all/ballot", t_warp_ops}},
      {"block_2d", {"2-D block (16x8) in a 2-D grid: linear ids, lanes, __syncthreads", t_block2d}},
      {"block_1024", {"1024-thread blocks with a __syncthreads tree reduction", t_block1024}},
      {"many_blocks", {"2048 blocks over the worker pool (returns the number of OS threads used)", t_many_blocks}},
      {"exited_barrier", {"threads that exit early do not hold a barrier", t_exited_barrier}},
      {"partial_warp", {"a 40-thread block: the partial warp uses mask 0xff", t_partial_warp}},
      {"smem_nan", {"shared memory (static and dynamic) reads NaN before it is written", t_smem_nan}},
      {"race_missing_barrier",
       {"a missing __syncthreads: the output depends on the schedule", [] { return t_race(false); }}},
      {"race_with_barrier", {"the same kernel with the barrier: schedule-independent", [] { return t_race(true); }}},
      {"wmma_gemm_half", {"64x64x64 wmma GEMM, half, B row-major", [] { return t_wmma_gemm<__half>(false); }}},
      {"wmma_gemm_half_bcol", {"64x64x64 wmma GEMM, half, B col-major", [] { return t_wmma_gemm<__half>(true); }}},
      {"wmma_gemm_bf16", {"64x64x64 wmma GEMM, bf16, B row-major", [] { return t_wmma_gemm<__nv_bfloat16>(false); }}},
      {"wmma_gemm_bf16_bcol",
       {"64x64x64 wmma GEMM, bf16, B col-major", [] { return t_wmma_gemm<__nv_bfloat16>(true); }}},
      {"wmma_layout_probe", {"indexes fragment.x[i] assuming the sm80 layout", t_wmma_layout_probe}},
      {"bench", {"context switch, barrier, shuffle and launch costs", t_bench}},
      // ---- broken kernels: each raises
      {"deadlock_barrier",
       {"threads 0-47 at __syncthreads, 48-63 at __syncwarp",
        [] {
          LL_LAUNCH(1, 64, 0, current_stream(), st_deadlock_barrier)();
          return none();
        }}},
      {"barrier_sites",
       {"__syncthreads at two call sites",
        [] {
          LL_LAUNCH(1, 64, 0, current_stream(), st_barrier_sites)();
          return none();
        }}},
      {"shfl_exited_lane",
       {"a shuffle whose mask names an exited lane",
        [] {
          float out[32];
          LL_LAUNCH(1, 32, 0, current_stream(), st_shfl_exited_lane)(out);
          return none();
        }}},
      {"syncwarp_exited_lane",
       {"a lane exits while the others wait for it at __syncwarp",
        [] {
          LL_LAUNCH(1, 32, 0, current_stream(), st_syncwarp_exited_lane)();
          return none();
        }}},
      {"mask_without_caller",
       {"a shuffle mask without the calling lane",
        [] {
          float out[32];
          LL_LAUNCH(1, 32, 0, current_stream(), st_mask_without_caller)(out);
          return none();
        }}},
      {"different_collectives",
       {"lanes of a warp at __shfl_xor_sync and __syncwarp",
        [] {
          float out[32];
          LL_LAUNCH(1, 32, 0, current_stream(), st_different_collectives)(out);
          return none();
        }}},
      {"warp_deadlock",
       {"lanes 0-15 at __syncwarp, 16-31 at __syncthreads",
        [] {
          LL_LAUNCH(1, 32, 0, current_stream(), st_warp_deadlock)();
          return none();
        }}},
      {"shfl_src_outside_mask",
       {"a shuffle reading a lane outside its mask",
        [] {
          float out[32];
          LL_LAUNCH(1, 32, 0, current_stream(), st_shfl_src_outside_mask)(out);
          return none();
        }}},
      {"partial_warp_full_mask",
       {"a full mask in a warp with only 8 lanes",
        [] {
          int out[40];
          LL_LAUNCH(1, 40, 0, current_stream(), st_partial_warp_full_mask)(out);
          return none();
        }}},
      {"smem_oob_static",
       {"writes one element past a __shared__ array",
        [] {
          float out[32];
          LL_LAUNCH(1, 32, 0, current_stream(), st_smem_oob_static)(out);
          return none();
        }}},
      {"smem_oob_dynamic",
       {"writes 4 KiB past the dynamic shared memory (guard page)",
        [] {
          float out[32];
          LL_LAUNCH(1, 32, 1000 * sizeof(float), current_stream(), st_smem_oob_dynamic_far)(out);
          return none();
        }}},
      {"smem_oob_dynamic_slack",
       {"writes one element past the dynamic shared memory (canary)",
        [] {
          float out[250];
          LL_LAUNCH(1, 250, 250 * sizeof(float), current_stream(), st_smem_oob_dynamic_slack)(out);
          return none();
        }}},
      {"global_oob_read",
       {"reads 12 bytes past the end of a guarded 4096-byte buffer",
        [] {
          Guarded in(4096);
          float out[32];
          LL_LAUNCH(1, 32, 0, current_stream(), st_global_read)(in.as<float>(), out, 1027);
          return none();
        }}},
      {"global_oob_write",
       {"writes 12 bytes past the end of a guarded 4096-byte buffer",
        [] {
          Guarded buf(4096);
          LL_LAUNCH(1, 32, 0, current_stream(), st_global_write)(buf.as<float>(), 1027);
          return none();
        }}},
      {"global_oob_write_slack",
       {"writes just past a guarded 4092-byte buffer (slack canary)",
        [] {
          Guarded buf(4092);
          LL_LAUNCH(1, 32, 0, current_stream(), st_global_write)(buf.as<float>(), 1023);
          return none();
        }}},
      {"global_read_ok",
       {"reads a guarded buffer up to its last element",
        [] {
          Guarded in(4096);
          float out[32];
          LL_LAUNCH(1, 32, 0, current_stream(), st_global_read)(in.as<float>(), out, 1023);
          return SelftestResult{{"out", to_doubles(out, 32)}};
        }}},
      {"too_many_threads",
       {"a 2048-thread block",
        [] {
          LL_LAUNCH(1, 2048, 0, current_stream(), st_noop)();
          return none();
        }}},
      {"too_many_threads_2d",
       {"a (64, 32) block: 2048 threads, each dimension within its limit",
        [] {
          LL_LAUNCH(1, dim3(64, 32), 0, current_stream(), st_noop)();
          return none();
        }}},
      {"block_dim_z_over",
       {"block (1,1,65)",
        [] {
          LL_LAUNCH(1, dim3(1, 1, 65), 0, current_stream(), st_noop)();
          return none();
        }}},
      {"grid_over",
       {"grid (1, 65536, 1)",
        [] {
          LL_LAUNCH(dim3(1, 65536, 1), 32, 0, current_stream(), st_noop)();
          return none();
        }}},
      {"zero_grid",
       {"grid (0,1,1)",
        [] {
          LL_LAUNCH(0, 32, 0, current_stream(), st_noop)();
          return none();
        }}},
      {"dyn_smem_no_attr",
       {"64 KiB dynamic shared memory without the attribute",
        [] {
          LL_LAUNCH(1, 32, 64 * 1024, current_stream(), st_noop)();
          return none();
        }}},
      {"dyn_smem_with_attr",
       {"64 KiB dynamic shared memory after set_max_dynamic_smem",
        [] {
          set_max_dynamic_smem(st_noop, 64 * 1024);
          LL_LAUNCH(1, 32, 64 * 1024, current_stream(), st_noop)();
          set_max_dynamic_smem(st_noop, 0);
          return none();
        }}},
      {"dyn_smem_over_optin",
       {"dynamic shared memory over the profile's opt-in limit",
        [] {
          const size_t n = device_profile().smem_optin_limit + 1024;
          LL_LAUNCH(1, 32, n, current_stream(), st_noop)();
          return none();
        }}},
      {"dyn_smem_attr_over_optin",
       {"set_max_dynamic_smem over the opt-in limit",
        [] {
          set_max_dynamic_smem(st_noop, static_cast<int>(device_profile().smem_optin_limit) + 1024);
          return none();
        }}},
      {"static_smem_over",
       {"a 64 KiB static __shared__ array",
        [] {
          LL_LAUNCH(1, 32, 0, current_stream(), st_static_smem_over)();
          return none();
        }}},
      {"wmma_misaligned",
       {"wmma load from a pointer 16 bytes off a 32-byte boundary",
        [] {
          alignas(64) static __half buf[64 * 64];
          LL_LAUNCH(1, 32, 0, current_stream(), st_wmma_bad<0>)(buf);
          return none();
        }}},
      {"wmma_bad_ldm",
       {"wmma load with ldm = 20 halves (40 bytes)",
        [] {
          alignas(64) static __half buf[64 * 64];
          LL_LAUNCH(1, 32, 0, current_stream(), st_wmma_bad<1>)(buf);
          return none();
        }}},
      {"wmma_lanes_disagree",
       {"lanes pass different pointers to wmma::load_matrix_sync",
        [] {
          alignas(64) static __half buf[64 * 64];
          LL_LAUNCH(1, 32, 0, current_stream(), st_wmma_bad<2>)(buf);
          return none();
        }}},
      {"kernel_assert",
       {"CUDA_KERNEL_ASSERT fails in block 1, thread 5",
        [] {
          int data[64];
          for (int i = 0; i < 64; ++i) data[i] = i == 32 + 5 ? -1 : 1;
          LL_LAUNCH(2, 32, 0, current_stream(), st_kernel_assert)(data + 0);
          return none();
        }}},
      {"plain_assert",
       {"a plain assert() in kernel code (the __assert_fail net)",
        [] {
          int data[32];
          for (int i = 0; i < 32; ++i) data[i] = i == 9 ? -1 : 1;
          LL_LAUNCH(1, 32, 0, current_stream(), st_plain_assert)(data);
          return none();
        }}},
      {"stack_overflow",
       {"unbounded recursion in a kernel",
        [] {
          int out[32];
          LL_LAUNCH(1, 32, 0, current_stream(), st_stack_overflow)(out);
          return none();
        }}},
      {"null_deref",
       {"a write through a null pointer",
        [] {
          LL_LAUNCH(1, 32, 0, current_stream(), st_null_deref)(static_cast<float*>(nullptr));
          return none();
        }}},
      {"int_div_zero",
       {"an integer division by zero (SIGFPE)",
        [] {
          int out[32];
          LL_LAUNCH(1, 32, 0, current_stream(), st_int_div_zero)(out, 7);
          return none();
        }}},
      {"endless_loop",
       {"a busy-wait that never ends (needs a small timeout_s)",
        [] {
          static volatile int flag = 0;
          LL_LAUNCH(4, 64, 0, current_stream(), st_endless_loop)(&flag);
          return none();
        }}},
      {"nested_launch",
       {"a launch from inside a kernel (dynamic parallelism)",
        [] {
          LL_LAUNCH(1, 32, 0, current_stream(), st_nested_launch)();
          return none();
        }}},
      {"kernel_throws",
       {"a C++ exception thrown by kernel code",
        [] {
          LL_LAUNCH(1, 32, 0, current_stream(), st_throws)();
          return none();
        }}},
  };
  return *m;
}

}  // namespace

SelftestResult run_selftest(const std::string& name) {
  auto& r = registry();
  auto it = r.find(name);
  if (it == r.end()) throw std::invalid_argument("llemu: unknown selftest '" + name + "'");
  return it->second.run();
}

std::map<std::string, std::string> selftest_names() {
  std::map<std::string, std::string> m;
  for (auto& kv : registry()) m[kv.first] = kv.second.doc;
  return m;
}

}  // namespace llemu
