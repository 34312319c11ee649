// llemu: a CPU emulator for hand-written CUDA C++ kernels (the device-side API the kernels see when they are
// compiled by a host compiler with -DLLADAPTER_EMU). See docs/emulator.md.
//
// One fiber per CUDA thread, the fibers of one block on one OS thread, blocks spread over a few worker threads.
// Every barrier, warp collective and wmma operation is a scheduling point with contract checks; shared memory is
// NaN-filled and canary/guard-protected; faults, failed asserts and contract violations become one
// llemu::KernelError thrown by the launch.
//
// Include order rule: include this header (or the compat header that includes it) AFTER every ATen / c10 header.
// c10/macros/Macros.h (torch/headeronly/macros/Macros.h) defines CUDA_KERNEL_ASSERT without an #ifndef guard, so a
// c10 header included later would replace the emulator's definition with one that aborts the process. If a later
// include cannot be avoided, include "emu_kernel_assert.h" (no include guard) after it to restore ours.
// (A safety net exists as well: emu_assert_net.cpp routes __assert_fail inside kernel fibers to a KernelError.)
//
// This header uses only the standard library and the CUDA fp16/bf16 host headers (no ATen / torch).
#pragma once

#if defined(__CUDACC__) || defined(__CUDA_ARCH__)
#error "csrc/emu/emu.h is for host compilers (g++ -DLLADAPTER_EMU); never define __CUDACC__ or __CUDA_ARCH__"
#endif

// torch builds its CUDA code with these; the emulator build uses them too so that what compiles here compiles
// under nvcc. Prefer defining them on the command line (they must precede the first cuda_fp16.h include).
#ifndef __CUDA_NO_HALF_OPERATORS__
#define __CUDA_NO_HALF_OPERATORS__
#endif
#ifndef __CUDA_NO_HALF2_OPERATORS__
#define __CUDA_NO_HALF2_OPERATORS__
#endif
#ifndef __CUDA_NO_HALF_CONVERSIONS__
#define __CUDA_NO_HALF_CONVERSIONS__
#endif
#ifndef __CUDA_NO_BFLOAT16_CONVERSIONS__
#define __CUDA_NO_BFLOAT16_CONVERSIONS__
#endif

// CUDA's declarations of threadIdx & co (device_launch_parameters.h, nvcc only) must never meet ours.
#define __DEVICE_LAUNCH_PARAMETERS_H__

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <source_location>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ------------------------------------------------------------------------------------------------ public host API
namespace llemu {

// Every failure of an emulated launch (contract check, fault, kernel assert, deadlock, bad launch configuration).
// The message starts with "llemu: [category] " and names the kernel (as written at the launch, with the launch's
// file:line), the block and thread, the check that fired and its call site.
class KernelError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// ---- emulated device
struct DeviceProfile {
  std::string name;          // "sm80", "sm90"
  std::string description;   // "A100", "H100/H200"
  int major = 0, minor = 0;  // compute capability
  int sm_count = 0;          // multiProcessorCount (after any override)
  int max_threads_per_block = 1024;
  int max_block_dim[3] = {1024, 1024, 64};
  long long max_grid_dim[3] = {2147483647LL, 65535, 65535};
  int warp_size = 32;
  size_t static_smem_limit = 48 * 1024;  // sharedMemPerBlock: static (and default dynamic) limit
  size_t smem_optin_limit = 0;           // sharedMemPerBlockOptin: static + dynamic after the opt-in
  size_t smem_per_sm = 0;                // sharedMemPerMultiprocessor
  int regs_per_block = 65536;
  size_t total_global_mem = 0;
};

// The active profile (default "sm90" with 132 SMs, or LLADAPTER_EMU_DEVICE / LLADAPTER_EMU_SM_COUNT).
const DeviceProfile& device_profile();
// Selects a built-in profile ("sm80": A100, 108 SMs, opt-in 166912 bytes; "sm90": H100/H200, 132 SMs, opt-in
// 232448 bytes). sm_count > 0 overrides its SM count. Throws std::invalid_argument for an unknown name.
// Not to be called while a launch runs.
void set_device_profile(const std::string& name, int sm_count = 0);
void set_sm_count(int sm_count);  // override the active profile's SM count (> 0)
std::vector<std::string> device_profile_names();

// ---- configuration knobs (docs/emulator.md); defaults from LLADAPTER_EMU_* environment variables
enum class Schedule { kInOrder, kReverse, kRandom };
enum class WmmaLayout { kSm80, kScrambled };
struct Config {
  Schedule schedule = Schedule::kInOrder;  // release order of fibers at block start and at every barrier/collective
  uint64_t seed = 0;                       // for Schedule::kRandom
  WmmaLayout layout = WmmaLayout::kSm80;   // per-lane element layout of wmma fragments
  uint64_t layout_seed = 0;                // for WmmaLayout::kScrambled
  int workers = 0;                         // OS threads running blocks; 0: min(2, hardware_concurrency)
  int stack_kib = 128;                     // fiber stack size (a guard region below each)
  double timeout_s = 300;                  // a launch running longer is interrupted ([timeout]); 0: never
};
Config config();
void configure(const Config& c);  // not while a launch runs; the pool is rebuilt at the next launch if needed
const char* schedule_name(Schedule s);
const char* layout_name(WmmaLayout l);
Schedule parse_schedule(const std::string& s);  // "inorder" | "reverse" | "random"
WmmaLayout parse_layout(const std::string& s);  // "sm80" | "scrambled"

// ---- coverage and statistics
struct KernelRecord {
  uint64_t launches = 0, blocks = 0, threads = 0;
  std::vector<std::string> sites;      // "file:line" of each launch site seen
  std::vector<const void*> functions;  // each distinct kernel function (template instantiation) launched
};
// Kernel name as written at the launch site -> counts (successful and failed launches that passed the
// configuration checks).
std::map<std::string, KernelRecord> launched_kernels();
struct Stats {
  uint64_t launches = 0, blocks = 0, fibers = 0, context_switches = 0, barriers = 0, warp_collectives = 0, wmma_ops = 0,
           errors = 0;
};
Stats stats();
void reset_stats();  // clears the stats, the kernel registry and the warnings
// Warnings (counted, deduplicated by message): e.g. wmma pointers that meet the CUDA C++ rules but not PTX's
// per-row alignment. Pairs of (message, count).
std::vector<std::pair<std::string, uint64_t>> warnings();
void clear_warnings();

// ---- streams and kernel attributes
// Opaque stream handle: the emulator runs every launch synchronously, so all streams are the same.
struct Stream {
  void* handle = nullptr;
};
inline Stream current_stream() { return Stream{}; }
inline Stream default_stream() { return Stream{}; }

// What cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) becomes. A launch with
// more than 48 KiB of dynamic shared memory needs it (bytes >= the launch's size). Throws KernelError when
// bytes < 0 or bytes exceeds the profile's opt-in limit.
void set_max_dynamic_smem(const void* kernel, int bytes);
template <class... P>
void set_max_dynamic_smem(void (*kernel)(P...), int bytes) {
  set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), bytes);
}

// ---- shared memory entry points (called by the compat macros, see below)
namespace detail {
void* static_shared_raw(const void* site_key, size_t bytes, size_t align, const char* name,
                        const std::source_location& loc);
}
// The block's instance of the static __shared__ array declared at `site_key` (a unique address per declaration
// and per template instantiation): the same object for every thread of the block, fresh (0xFF-filled) for each
// block, followed by a canary that is checked at barriers and at the block's end.
template <class ArrayT>
ArrayT& static_shared(const void* site_key, const char* name,
                      const std::source_location& loc = std::source_location::current()) {
  static_assert(std::is_trivially_destructible_v<ArrayT>, "__shared__ objects must be trivially destructible");
  return *static_cast<ArrayT*>(detail::static_shared_raw(site_key, sizeof(ArrayT), alignof(ArrayT), name, loc));
}
// The launch's dynamic shared memory (extern __shared__ T name[]): 0xFF-filled for each block, its end against a
// PROT_NONE page (an access past the end faults and is reported). align <= 256.
void* dynamic_shared(size_t align = 16, const std::source_location& loc = std::source_location::current());

/* Proposed compat.h macros (csrc/cuda/compat.h owns them; the emulator only provides the functions above):

     #if defined(LLADAPTER_EMU)
     #define LL_SHARED(type, name, dims)                                                                   \
       type(&name) dims = ::llemu::static_shared<type dims>(                                                 \
           [] { static char llemu_site_key_; return static_cast<const void*>(&llemu_site_key_); }(), #name)
     #define LL_DYNAMIC_SHARED(type, name, align) \
       type* const name = static_cast<type*>(::llemu::dynamic_shared(align))
     #define LL_LAUNCH(grid, block, smem, stream, ...) \
       ::llemu::make_launcher(#__VA_ARGS__, __FILE__, __LINE__, grid, block, smem, stream, __VA_ARGS__)
     #define LL_SET_MAX_DYNAMIC_SMEM(kernel, bytes) ::llemu::set_max_dynamic_smem(kernel, bytes)
     #else
     #define LL_SHARED(type, name, dims) __shared__ type name dims
     #define LL_DYNAMIC_SHARED(type, name, align) extern __shared__ __align__(align) type name[]
     #define LL_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
     #define LL_SET_MAX_DYNAMIC_SMEM(kernel, bytes) \
       C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes))
     #endif

   Example (a kernel body):
     LL_SHARED(float, qs_all, [kWarps][DMAX]);          // __shared__ float qs_all[kWarps][DMAX];
     LL_DYNAMIC_SHARED(unsigned char, smem, 128);       // extern __shared__ __align__(128) unsigned char smem[];
   and a launch:
     LL_LAUNCH(grid, kThreads, smem_bytes, stream, gpa_fwd_mma_kernel<T, D>)(g, q, k, ...);
   The lambda in LL_SHARED gives every declaration (and every template instantiation of the enclosing kernel) its
   own key. The name as written in LL_LAUNCH keys the coverage registry (launched_kernels()), so launch through a
   template-id or a well-named variable.
*/

// ------------------------------------------------------------------------------------------------ launch
namespace detail {
struct LaunchSpec {
  const char* name;  // kernel as written at the launch site
  const char* file;
  int line;
  dim3 grid, block;
  size_t dynamic_smem;
  const void* kernel_key;           // the kernel's function pointer (set_max_dynamic_smem registry)
  void (*thunk)(const void* call);  // runs the kernel for the current emulated thread
  const void* call;
};
void launch(const LaunchSpec& spec);  // synchronous; throws KernelError

template <class P, class A>
P convert_kernel_arg(A&& a) {  // copy-initialization, as a call of the kernel would do
  return std::forward<A>(a);
}

template <class... P>
struct KernelCall {
  void (*fn)(P...);
  std::tuple<P...> args;
  static void run(const void* self) {
    const KernelCall* c = static_cast<const KernelCall*>(self);
    std::apply(c->fn, c->args);  // every emulated thread gets its own copies of the parameters
  }
};
}  // namespace detail

template <class... P>
class Launcher {
 public:
  Launcher(const char* name, const char* file, int line, dim3 grid, dim3 block, size_t smem, void (*kernel)(P...))
      : name_(name), file_(file), line_(line), grid_(grid), block_(block), smem_(smem), kernel_(kernel) {}

  template <class... A>
  void operator()(A&&... a) const {
    static_assert(sizeof...(A) == sizeof...(P), "LL_LAUNCH: wrong number of kernel arguments");
    static_assert((std::is_trivially_copyable_v<std::decay_t<P>> && ...),
                  "LL_LAUNCH: kernel parameters must be trivially copyable (they are copied to the device)");
    detail::KernelCall<std::decay_t<P>...> call{
        kernel_, std::tuple<std::decay_t<P>...>(detail::convert_kernel_arg<std::decay_t<P>>(std::forward<A>(a))...)};
    detail::LaunchSpec spec{name_,
                            file_,
                            line_,
                            grid_,
                            block_,
                            smem_,
                            reinterpret_cast<const void*>(kernel_),
                            &detail::KernelCall<std::decay_t<P>...>::run,
                            &call};
    detail::launch(spec);
  }

 private:
  const char* name_;
  const char* file_;
  int line_;
  dim3 grid_, block_;
  size_t smem_;
  void (*kernel_)(P...);
};

// kernel: a function template-id (gpa_fwd_kernel<T, D>) or a function-pointer variable. The stream is ignored
// (every launch is synchronous).
template <class S, class... P>
Launcher<P...> make_launcher(const char* name, const char* file, int line, dim3 grid, dim3 block, size_t smem,
                             const S& /*stream*/, void (*kernel)(P...)) {
  return Launcher<P...>(name, file, line, grid, block, smem, kernel);
}

// ------------------------------------------------------------------------------------------------ internals
namespace detail {
// Fields of the running emulated thread that inline code reads; the runtime's Fiber starts with this.
struct FiberHead {
  uint3 thread_idx;
  unsigned linear;  // x + y * bx + z * bx * by
};
struct ThreadVars {
  FiberHead* cur = nullptr;  // the running fiber of this OS thread (nullptr outside a kernel)
};
extern thread_local ThreadVars tv;

[[noreturn]] void outside_kernel(const char* what);

// Warp collectives. Values travel as up to 8 raw bytes.
enum class WarpOp : uint8_t {
  kSyncwarp,
  kShfl,
  kShflUp,
  kShflDown,
  kShflXor,
  kAny,
  kAll,
  kBallot,
  kWmmaLoadA,
  kWmmaLoadB,
  kWmmaLoadC,
  kWmmaStoreC,
  kWmmaMma,
};
uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, unsigned value_bytes, int arg, int width,
                         const std::source_location& loc);
void syncthreads(const std::source_location& loc);
[[noreturn]] void kernel_assert_fail(const char* cond, const char* file, int line, const char* func);

template <class T>
inline uint64_t to_bits(const T& v) {
  static_assert(
      std::is_trivially_copyable_v<T> && (sizeof(T) == 1 || sizeof(T) == 2 || sizeof(T) == 4 || sizeof(T) == 8),
      "warp shuffles move 1-, 2-, 4- or 8-byte trivially copyable values");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <class T>
inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(static_cast<void*>(&v), &b, sizeof(T));
  return v;
}
}  // namespace detail
}  // namespace llemu

// ------------------------------------------------------------------------------------------------ built-ins
// Variables, not macros (CUDA's host headers use these names for parameters and members): per OS thread, and the
// scheduler stores the running fiber's values whenever it switches to it (all fibers of a block share one OS
// thread). All four are uint3 (CUDA's blockDim / gridDim are dim3, which converts from uint3). Kernel code must not
// write them (nvcc would reject it). Outside a kernel they hold stale values.
extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local uint3 blockDim;
extern thread_local uint3 gridDim;
inline constexpr int warpSize = 32;

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
// A bare __shared__ would silently give every emulated thread its own copy: make it a compile error.
#undef __shared__
#define __shared__ static_assert(false, "__shared__ is not emulated: use LL_SHARED / LL_DYNAMIC_SHARED");

// CUDA_KERNEL_ASSERT: a failed assert ends the launch with a KernelError naming kernel, block, thread and the
// condition. Replaces c10's definition (see the include order rule at the top).
#undef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(cond)                                                                                \
  do {                                                                                                          \
    if (__builtin_expect(!(cond), 0)) ::llemu::detail::kernel_assert_fail(#cond, __FILE__, __LINE__, __func__); \
  } while (0)

inline void __syncthreads(const std::source_location& loc = std::source_location::current()) {
  ::llemu::detail::syncthreads(loc);
}

inline void __syncwarp(unsigned mask = 0xffffffffu, const std::source_location& loc = std::source_location::current()) {
  ::llemu::detail::warp_collective(::llemu::detail::WarpOp::kSyncwarp, mask, 0, 0, 0, 32, loc);
}

template <class T>
inline T __shfl_sync(unsigned mask, T var, int srcLane, int width = 32,
                     const std::source_location& loc = std::source_location::current()) {
  using namespace ::llemu::detail;
  return from_bits<T>(warp_collective(WarpOp::kShfl, mask, to_bits(var), sizeof(T), srcLane, width, loc));
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32,
                        const std::source_location& loc = std::source_location::current()) {
  using namespace ::llemu::detail;
  return from_bits<T>(
      warp_collective(WarpOp::kShflUp, mask, to_bits(var), sizeof(T), static_cast<int>(delta), width, loc));
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32,
                          const std::source_location& loc = std::source_location::current()) {
  using namespace ::llemu::detail;
  return from_bits<T>(
      warp_collective(WarpOp::kShflDown, mask, to_bits(var), sizeof(T), static_cast<int>(delta), width, loc));
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = 32,
                         const std::source_location& loc = std::source_location::current()) {
  using namespace ::llemu::detail;
  return from_bits<T>(warp_collective(WarpOp::kShflXor, mask, to_bits(var), sizeof(T), laneMask, width, loc));
}
inline int __any_sync(unsigned mask, int predicate, const std::source_location& loc = std::source_location::current()) {
  using namespace ::llemu::detail;
  return static_cast<int>(warp_collective(WarpOp::kAny, mask, predicate != 0, 4, 0, 32, loc));
}
inline int __all_sync(unsigned mask, int predicate, const std::source_location& loc = std::source_location::current()) {
  using namespace ::llemu::detail;
  return static_cast<int>(warp_collective(WarpOp::kAll, mask, predicate != 0, 4, 0, 32, loc));
}
inline unsigned __ballot_sync(unsigned mask, int predicate,
                              const std::source_location& loc = std::source_location::current()) {
  using namespace ::llemu::detail;
  return static_cast<unsigned>(warp_collective(WarpOp::kBallot, mask, predicate != 0, 4, 0, 32, loc));
}
inline unsigned __activemask() = delete;  // not emulated: lanes do not run in lockstep here

// ------------------------------------------------------------------------------------------------ math
// glibc does not declare rsqrtf; CUDA's is approximate (2 ulp), this one is 1/sqrtf.
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __fdividef(float a, float b) { return a / b; }
// Round-to-nearest products and sums that are never contracted into an FMA (nvcc's promise for __fmul_rn and
// __fadd_rn): the asm barrier keeps the host compiler from fusing the product with a following add.
inline float __fmul_rn(float a, float b) {
  float p = a * b;
#if defined(__x86_64__)
  asm("" : "+x"(p));
#else
  volatile float t = p;
  p = t;
#endif
  return p;
}
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }

// CUDA's global min/max overloads (crt/math_functions.hpp), the mixed signed/unsigned ones taking the unsigned
// type as CUDA does.
#define LLEMU_MINMAX_SAME(T)                       \
  inline T min(T a, T b) { return a < b ? a : b; } \
  inline T max(T a, T b) { return a > b ? a : b; }
LLEMU_MINMAX_SAME(int)
LLEMU_MINMAX_SAME(unsigned int)
LLEMU_MINMAX_SAME(long)
LLEMU_MINMAX_SAME(unsigned long)
LLEMU_MINMAX_SAME(long long)
LLEMU_MINMAX_SAME(unsigned long long)
#undef LLEMU_MINMAX_SAME
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline double min(float a, double b) { return fmin(static_cast<double>(a), b); }
inline double max(float a, double b) { return fmax(static_cast<double>(a), b); }
inline double min(double a, float b) { return fmin(a, static_cast<double>(b)); }
inline double max(double a, float b) { return fmax(a, static_cast<double>(b)); }
#define LLEMU_MINMAX_MIXED(S, U)                               \
  inline U min(S a, U b) { return min(static_cast<U>(a), b); } \
  inline U min(U a, S b) { return min(a, static_cast<U>(b)); } \
  inline U max(S a, U b) { return max(static_cast<U>(a), b); } \
  inline U max(U a, S b) { return max(a, static_cast<U>(b)); }
LLEMU_MINMAX_MIXED(int, unsigned int)
LLEMU_MINMAX_MIXED(long, unsigned long)
LLEMU_MINMAX_MIXED(long long, unsigned long long)
#undef LLEMU_MINMAX_MIXED

#include "emu_wmma.h"
