// llemu runtime: fibers, scheduling, barriers, warp collectives, shared memory, launches, fault handling.
// See docs/emulator.md for the design and csrc/emu/emu.h for the API.
#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <thread>

#include "emu_internal.h"
#include "guarded_memory.h"

// ------------------------------------------------------------------------------------------------ context switch
#if LLEMU_FAST_SWITCH
extern "C" {
// Saves the callee-saved registers, MXCSR and the x87 control word on the current stack, stores the stack pointer
// in *save_sp, switches to load_sp and restores the same set from there. Nothing else: the caller-saved state is
// dead across a call by the ABI.
void llemu_ctx_switch(void** save_sp, void* load_sp) __attribute__((visibility("hidden")));
// First frame of a fresh fiber: calls rbx(r12) (set up by init_ctx); never returns.
void llemu_ctx_trampoline() __attribute__((visibility("hidden")));
}
asm(R"ASM(
  .text
  .p2align 4
  .globl llemu_ctx_switch
  .hidden llemu_ctx_switch
  .type llemu_ctx_switch,@function
llemu_ctx_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size llemu_ctx_switch,.-llemu_ctx_switch

  .p2align 4
  .globl llemu_ctx_trampoline
  .hidden llemu_ctx_trampoline
  .type llemu_ctx_trampoline,@function
llemu_ctx_trampoline:
  .cfi_startproc
  .cfi_undefined rip
  movq %r12, %rdi
  callq *%rbx
  ud2
  .cfi_endproc
  .size llemu_ctx_trampoline,.-llemu_ctx_trampoline
)ASM");
#endif

thread_local uint3 threadIdx{};
thread_local uint3 blockIdx{};
thread_local uint3 blockDim{1, 1, 1};
thread_local uint3 gridDim{1, 1, 1};

namespace llemu {
namespace detail {

thread_local ThreadVars tv;

// Makes f the running fiber of this OS thread (the built-in variables follow it).
static inline void set_running(Fiber* f) {
  tv.cur = f;
  if (f != nullptr) threadIdx = f->thread_idx;
}

namespace {

// ------------------------------------------------------------------------------------------------ global state
size_t page_size() {
  static const size_t p = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return p;
}
size_t round_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

std::mutex& launch_mu() {  // one launch at a time; configuration changes take it too
  static auto* m = new std::mutex();
  return *m;
}
std::mutex g_state_mu;  // registry, stats, warnings, max-dynamic-smem attributes

DeviceProfile builtin_profile(const std::string& name) {
  DeviceProfile p;
  p.name = name;
  p.max_threads_per_block = 1024;
  p.static_smem_limit = 48 * 1024;
  if (name == "sm80") {
    p.description = "A100 (sm_80)";
    p.major = 8;
    p.minor = 0;
    p.sm_count = 108;
    p.smem_optin_limit = 166912;  // 163 KiB
    p.smem_per_sm = 167936;
    p.total_global_mem = 80ULL << 30;
  } else if (name == "sm90") {
    p.description = "H100/H200 (sm_90)";
    p.major = 9;
    p.minor = 0;
    p.sm_count = 132;
    p.smem_optin_limit = 232448;  // 227 KiB
    p.smem_per_sm = 233472;
    p.total_global_mem = 141ULL << 30;
  } else {
    throw std::invalid_argument("llemu: unknown device profile '" + name + "' (known: sm80, sm90)");
  }
  return p;
}

uint64_t env_u64(const char* name, uint64_t dflt) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return dflt;
  char* end = nullptr;
  const unsigned long long x = std::strtoull(v, &end, 0);
  if (end == v || *end != '\0') {
    std::fprintf(stderr, "llemu: ignoring %s=%s (not a number)\n", name, v);
    return dflt;
  }
  return x;
}

Config config_from_env() {
  Config c;
  if (const char* s = std::getenv("LLADAPTER_EMU_SCHEDULE"); s && *s) c.schedule = parse_schedule(s);
  c.seed = env_u64("LLADAPTER_EMU_SEED", 0);
  if (const char* s = std::getenv("LLADAPTER_EMU_LAYOUT"); s && *s) c.layout = parse_layout(s);
  c.layout_seed = env_u64("LLADAPTER_EMU_LAYOUT_SEED", 0);
  c.workers = static_cast<int>(env_u64("LLADAPTER_EMU_WORKERS", 0));
  c.stack_kib = static_cast<int>(env_u64("LLADAPTER_EMU_STACK_KIB", 128));
  if (const char* t = std::getenv("LLADAPTER_EMU_TIMEOUT_S"); t && *t) c.timeout_s = std::atof(t);
  return c;
}

DeviceProfile profile_from_env() {
  const char* d = std::getenv("LLADAPTER_EMU_DEVICE");
  DeviceProfile p = builtin_profile(d && *d ? d : "sm90");
  if (const uint64_t sms = env_u64("LLADAPTER_EMU_SM_COUNT", 0)) p.sm_count = static_cast<int>(sms);
  return p;
}

struct Globals {
  Config cfg;
  DeviceProfile prof;
  WmmaLayoutTables layout;
  std::map<std::string, KernelRecord> kernels;
  Stats stats;
  std::map<std::string, uint64_t> warnings;
  std::unordered_map<const void*, int> max_dyn;
  uint64_t launch_seq = 0;
  Globals() {
    try {
      cfg = config_from_env();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "llemu: %s; using the defaults\n", e.what());
      cfg = Config{};
    }
    try {
      prof = profile_from_env();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "llemu: %s; using sm90\n", e.what());
      prof = builtin_profile("sm90");
    }
    build_layout_tables(cfg.layout, cfg.layout_seed, &layout);
  }
};
Globals& G() {
  static auto* g = new Globals();
  return *g;
}

std::string short_path(const char* p) {
  if (p == nullptr) return "?";
  const char* best = nullptr;
  for (const char* m : {"csrc/", "tests/", "lladapter_ext/"}) {
    const char* f = std::strstr(p, m);
    if (f && (!best || f < best)) best = f;
  }
  if (best) return best;
  const char* s = std::strrchr(p, '/');
  return s ? s + 1 : p;
}

}  // namespace

// ------------------------------------------------------------------------------------------------ messages
std::string fmt(const char* f, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, f);
  const int n = std::vsnprintf(buf, sizeof buf, f, ap);
  va_end(ap);
  if (n < static_cast<int>(sizeof buf)) return std::string(buf, n < 0 ? 0 : n);
  std::string s(static_cast<size_t>(n) + 1, '\0');
  va_start(ap, f);
  std::vsnprintf(s.data(), s.size(), f, ap);
  va_end(ap);
  s.resize(static_cast<size_t>(n));
  return s;
}

std::string site_str(const std::source_location& l) {
  return short_path(l.file_name()) + ":" + std::to_string(l.line());
}

static inline bool same_site(const std::source_location& a, const std::source_location& b) {
  return a.line() == b.line() && a.column() == b.column() &&
         (a.file_name() == b.file_name() || std::strcmp(a.file_name(), b.file_name()) == 0);
}

const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::kSyncwarp:
      return "__syncwarp";
    case WarpOp::kShfl:
      return "__shfl_sync";
    case WarpOp::kShflUp:
      return "__shfl_up_sync";
    case WarpOp::kShflDown:
      return "__shfl_down_sync";
    case WarpOp::kShflXor:
      return "__shfl_xor_sync";
    case WarpOp::kAny:
      return "__any_sync";
    case WarpOp::kAll:
      return "__all_sync";
    case WarpOp::kBallot:
      return "__ballot_sync";
    case WarpOp::kWmmaLoadA:
      return "wmma::load_matrix_sync(matrix_a)";
    case WarpOp::kWmmaLoadB:
      return "wmma::load_matrix_sync(matrix_b)";
    case WarpOp::kWmmaLoadC:
      return "wmma::load_matrix_sync(accumulator)";
    case WarpOp::kWmmaStoreC:
      return "wmma::store_matrix_sync";
    case WarpOp::kWmmaMma:
      return "wmma::mma_sync";
  }
  return "?";
}

static std::string launch_context(const LaunchState* L) {
  return fmt("kernel '%s' (launched at %s:%d)", L->spec->name, short_path(L->spec->file).c_str(), L->spec->line);
}
static std::string block_context(const LaunchState* L, const BlockCtx& b) {
  return launch_context(L) + fmt(", block (%u,%u,%u)", b.idx.x, b.idx.y, b.idx.z);
}
static std::string fiber_context(const Fiber* f) {
  const BlockCtx& b = f->worker->blk;
  return block_context(b.launch, b) + fmt(", thread (%u,%u,%u) [warp %u lane %u]", f->thread_idx.x, f->thread_idx.y,
                                          f->thread_idx.z, f->warp, f->lane);
}

[[noreturn]] void fail(const char* category, const std::string& detail) {
  Fiber* f = static_cast<Fiber*>(tv.cur);
  std::string msg = std::string("llemu: [") + category + "] ";
  if (f != nullptr) msg += fiber_context(f) + ": ";
  msg += detail;
  throw KernelError(msg);
}

[[noreturn]] void outside_kernel(const char* what) {
  throw KernelError(std::string("llemu: ") + what + " used outside an emulated kernel");
}

Fiber* current_fiber(const char* what) {
  FiberHead* h = tv.cur;
  if (h == nullptr) outside_kernel(what);
  return static_cast<Fiber*>(h);
}

[[noreturn]] void kernel_assert_fail(const char* cond, const char* file, int line, const char* func) {
  fail("kernel-assert",
       fmt("CUDA_KERNEL_ASSERT(%s) failed in %s at %s:%d", cond, func, short_path(file).c_str(), line));
}

// ------------------------------------------------------------------------------------------------ scheduling
static inline void ctx_swap(Worker* w, Ctx* from, Ctx* to) {
  ++w->switches;
#if LLEMU_FAST_SWITCH
  llemu_ctx_switch(&from->sp, to->sp);
#else
  swapcontext(&from->uc, &to->uc);
#endif
}

static inline Fiber* pop_ready(BlockCtx& b) {
  if (b.qcount == 0) return nullptr;
  Fiber* f = b.q[b.qhead];
  b.qhead = (b.qhead + 1) & (kMaxThreads - 1);
  --b.qcount;
  return f;
}

static inline void push_ready(BlockCtx& b, Fiber* f, bool random) {
  f->wait = Wait::kNone;
  const unsigned pos = (b.qhead + b.qcount) & (kMaxThreads - 1);
  b.q[pos] = f;
  ++b.qcount;
  if (random && b.qcount > 1) {  // a random place in the queue: varies the order across warps too
    const unsigned j = (b.qhead + b.rng.below(b.qcount)) & (kMaxThreads - 1);
    std::swap(b.q[pos], b.q[j]);
  }
}

// Pushes the fibers list[0..n) (in increasing thread order) in the launch's release order.
static void release(BlockCtx& b, Fiber** list, unsigned n) {
  switch (b.launch->cfg.schedule) {
    case Schedule::kInOrder:
      for (unsigned i = 0; i < n; ++i) push_ready(b, list[i], false);
      break;
    case Schedule::kReverse:
      for (unsigned i = n; i-- > 0;) push_ready(b, list[i], false);
      break;
    case Schedule::kRandom:
      for (unsigned i = n; i > 1; --i) std::swap(list[i - 1], list[b.rng.below(i)]);
      for (unsigned i = 0; i < n; ++i) push_ready(b, list[i], true);
      break;
  }
}

// The current fiber waits (its wait state is set; it may already be in the ready queue): run the next ready fiber,
// or go back to the block's scheduler when none is left (block done or deadlocked).
static inline void wait_here(Worker* w, BlockCtx& b, Fiber* self) {
  Fiber* next = pop_ready(b);
  if (next == self) return;
  if (next != nullptr) {
    set_running(next);
    ctx_swap(w, &self->ctx, &next->ctx);
  } else {
    tv.cur = nullptr;
    ctx_swap(w, &self->ctx, &w->sched);
  }
  // resumed: whoever switched here called set_running(self)
}

// ------------------------------------------------------------------------------------------------ shared memory
static void fill_canary(char* lo, char* hi) {
  for (char* a = lo; a < hi; ++a) {
    const unsigned sh = static_cast<unsigned>((reinterpret_cast<uintptr_t>(a) & 3) * 8);
    *reinterpret_cast<unsigned char*>(a) = static_cast<unsigned char>(kCanaryWord >> sh);
  }
}
static char* find_corruption(char* lo, char* hi) {
  for (char* a = lo; a < hi; ++a) {
    const unsigned sh = static_cast<unsigned>((reinterpret_cast<uintptr_t>(a) & 3) * 8);
    if (*reinterpret_cast<unsigned char*>(a) != static_cast<unsigned char>(kCanaryWord >> sh)) return a;
  }
  return nullptr;
}

static void smem_init(Worker* w) {
  Smem& s = w->smem;
  const size_t page = page_size();
  s.static_cap = 128 * 1024;
  s.static_map_size = s.static_cap + 2 * page;
  void* m =
      mmap(nullptr, s.static_map_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) throw std::bad_alloc();
  s.static_map = static_cast<char*>(m);
  s.static_base = s.static_map + page;
  mprotect(s.static_map, page, PROT_NONE);
  mprotect(s.static_base + s.static_cap, page, PROT_NONE);
  // dynamic: the largest opt-in limit of any profile, plus room for the alignment slack and the leading canary
  const size_t cap = round_up(
      std::max<size_t>(builtin_profile("sm90").smem_optin_limit, builtin_profile("sm80").smem_optin_limit) + 512, page);
  s.dyn_map_size = cap + 2 * page;
  m = mmap(nullptr, s.dyn_map_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) throw std::bad_alloc();
  s.dyn_map = static_cast<char*>(m);
  s.dyn_lo = s.dyn_map + page;
  s.dyn_end = s.dyn_lo + cap;
  mprotect(s.dyn_map, page, PROT_NONE);
  mprotect(s.dyn_end, page, PROT_NONE);
}

static void smem_block_start(Worker* w, LaunchState* L) {
  Smem& s = w->smem;
  if (s.launch_id != L->id) {  // a new launch: its arrays are placed as they are met
    s.launch_id = L->id;
    s.arrays.clear();
    s.static_used = kCanaryBytes;
    s.static_bytes = 0;
    fill_canary(s.static_base, s.static_base + kCanaryBytes);
  } else if (!s.arrays.empty()) {
    std::memset(s.static_base + kCanaryBytes, 0xFF, s.static_used - kCanaryBytes);
    fill_canary(s.static_base, s.static_base + kCanaryBytes);
    for (const StaticArray& a : s.arrays) {
      char* p = s.static_base + a.off;
      fill_canary(p + a.bytes, p + a.bytes + kCanaryBytes);
    }
  }
  const size_t n = L->spec->dynamic_smem;
  s.dyn_size = n;
  s.dyn_start = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(s.dyn_end) - n) & ~uintptr_t(255));
  std::memset(s.dyn_start, 0xFF, n);
  fill_canary(s.dyn_start + n, s.dyn_end);
  fill_canary(std::max(s.dyn_lo, s.dyn_start - 64), s.dyn_start);
}

// "" or a description of the first corrupted canary
static std::string smem_check(Worker* w) {
  Smem& s = w->smem;
  if (char* a = find_corruption(s.static_base, s.static_base + kCanaryBytes)) {
    return fmt("write before the start of the first __shared__ array%s%s (%zu bytes before it)",
               s.arrays.empty() ? "" : " '", s.arrays.empty() ? "" : (std::string(s.arrays[0].name) + "'").c_str(),
               static_cast<size_t>(s.static_base + kCanaryBytes - a));
  }
  for (const StaticArray& arr : s.arrays) {
    char* p = s.static_base + arr.off;
    if (char* a = find_corruption(p + arr.bytes, p + arr.bytes + kCanaryBytes)) {
      return fmt(
          "write past the end of __shared__ array '%s' (%zu bytes, declared at %s): first corrupted byte %zu "
          "bytes past its end",
          arr.name, arr.bytes, site_str(arr.loc).c_str(), static_cast<size_t>(a - (p + arr.bytes)));
    }
  }
  if (char* a = find_corruption(s.dyn_start + s.dyn_size, s.dyn_end)) {
    return fmt(
        "write past the end of the dynamic shared memory (%zu bytes): first corrupted byte %zu bytes past its "
        "end",
        s.dyn_size, static_cast<size_t>(a - (s.dyn_start + s.dyn_size)));
  }
  char* pre = std::max(s.dyn_lo, s.dyn_start - 64);
  if (char* a = find_corruption(pre, s.dyn_start)) {
    return fmt("write before the start of the dynamic shared memory (%zu bytes): %zu bytes before it", s.dyn_size,
               static_cast<size_t>(s.dyn_start - a));
  }
  return {};
}

void* static_shared_raw(const void* key, size_t bytes, size_t align, const char* name,
                        const std::source_location& loc) {
  Fiber* f = current_fiber("a __shared__ array (LL_SHARED)");
  Worker* w = f->worker;
  Smem& s = w->smem;
  for (const StaticArray& a : s.arrays) {
    if (a.key == key) return s.static_base + a.off;
  }
  const LaunchState* L = w->blk.launch;
  align = std::max<size_t>(align, 16);
  const size_t off = round_up(s.static_used, align);
  s.static_bytes += bytes;
  if (s.static_bytes > L->prof.static_smem_limit) {
    fail("smem-limit",
         fmt("static __shared__ memory reaches %zu bytes with '%s' (%zu bytes, declared at %s), over "
             "the %zu-byte static limit of profile %s",
             s.static_bytes, name, bytes, site_str(loc).c_str(), L->prof.static_smem_limit, L->prof.name.c_str()));
  }
  if (s.static_bytes + L->spec->dynamic_smem > L->prof.smem_optin_limit) {
    fail("smem-limit", fmt("static (%zu bytes, reached with '%s' at %s) + dynamic (%zu bytes) shared memory exceeds "
                           "the %zu-byte opt-in limit of profile %s",
                           s.static_bytes, name, site_str(loc).c_str(), L->spec->dynamic_smem, L->prof.smem_optin_limit,
                           L->prof.name.c_str()));
  }
  if (off + bytes + kCanaryBytes > s.static_cap) fail("smem-limit", "static shared memory arena exhausted");
  char* p = s.static_base + off;
  std::memset(p, 0xFF, bytes);
  fill_canary(p + bytes, p + bytes + kCanaryBytes);
  s.static_used = off + bytes + kCanaryBytes;
  s.arrays.push_back(StaticArray{key, off, bytes, name, loc});
  return p;
}

}  // namespace detail

void* dynamic_shared(size_t align, const std::source_location& loc) {
  using namespace detail;
  Fiber* f = current_fiber("dynamic shared memory (LL_DYNAMIC_SHARED)");
  if (align == 0 || (align & (align - 1)) != 0 || align > 256) {
    fail("smem-align",
         fmt("dynamic shared memory alignment %zu at %s: must be a power of two <= 256", align, site_str(loc).c_str()));
  }
  return f->worker->smem.dyn_start;
}

namespace detail {

// ------------------------------------------------------------------------------------------------ __syncthreads
static void release_barrier(Worker* w, BlockCtx& b) {
  ++w->barriers;
  b.bar_count = 0;
  Fiber** tmp = b.scratch;
  unsigned n = 0;
  Fiber* fibers = w->fibers.get();
  for (unsigned i = 0; i < b.nthreads; ++i) {
    if (!fibers[i].exited) tmp[n++] = &fibers[i];
  }
  release(b, tmp, n);
}

[[gnu::cold, gnu::noinline, noreturn]] static void barrier_site_fail(Worker* w, BlockCtx& b,
                                                                     const std::source_location& loc) {
  const Fiber* other = nullptr;
  for (unsigned i = 0; i < b.nthreads && other == nullptr; ++i) {
    if (w->fibers[i].wait == Wait::kBarrier) other = &w->fibers[i];
  }
  fail("barrier-divergence",
       fmt("__syncthreads at different call sites: this thread at %s while %u thread(s) (first: thread (%u,%u,%u)) "
           "wait at %s",
           site_str(loc).c_str(), b.bar_count, other ? other->thread_idx.x : 0, other ? other->thread_idx.y : 0,
           other ? other->thread_idx.z : 0, site_str(b.bar_site).c_str()));
}

void syncthreads(const std::source_location& loc) {
  Fiber* self = current_fiber("__syncthreads");
  Worker* w = self->worker;
  BlockCtx& b = w->blk;
  if (b.bar_count == 0) {
    b.bar_site = loc;
  } else if (__builtin_expect(!same_site(b.bar_site, loc), 0)) {
    barrier_site_fail(w, b, loc);
  }
  self->wait = Wait::kBarrier;
  self->site = loc;
  if (++b.bar_count == b.live) {
    // cheap: a few canaries; a corruption is found at the barrier after it happened
    std::string bad = smem_check(w);
    if (!bad.empty()) fail("shared-oob", bad + fmt("; detected at __syncthreads (%s)", site_str(loc).c_str()));
    release_barrier(w, b);
  }
  wait_here(w, b, self);
}

// ------------------------------------------------------------------------------------------------ warp collectives
static std::string lane_list(unsigned m) {
  std::string s;
  for (int i = 0; i < 32;) {
    if (!(m >> i & 1u)) {
      ++i;
      continue;
    }
    int j = i;
    while (j + 1 < 32 && (m >> (j + 1) & 1u)) ++j;
    if (!s.empty()) s += ",";
    s += j > i ? fmt("%d-%d", i, j) : fmt("%d", i);
    i = j + 1;
  }
  return s.empty() ? "none" : s;
}

static void complete_group(Worker* w, BlockCtx& b, Fiber* self, unsigned warp, const Group& g) {
  Fiber* lanes = w->fibers.get() + warp * 32;
  const unsigned mask = g.mask;
  const uint64_t vmask = g.bytes >= 8 ? ~0ULL : ((1ULL << (8 * g.bytes)) - 1);
  switch (g.op) {
    case WarpOp::kSyncwarp:
      break;
    case WarpOp::kShfl:
    case WarpOp::kShflUp:
    case WarpOp::kShflDown:
    case WarpOp::kShflXor: {
      for (unsigned m = mask; m; m &= m - 1) {
        const unsigned l = static_cast<unsigned>(__builtin_ctz(m));
        Fiber& f = lanes[l];
        const unsigned wd = static_cast<unsigned>(f.width);
        const unsigned base = l & ~(wd - 1);
        unsigned src = l;
        switch (g.op) {
          case WarpOp::kShfl:
            src = base + (static_cast<unsigned>(f.arg) & (wd - 1));
            break;
          case WarpOp::kShflUp: {
            const long s = static_cast<long>(l) - static_cast<unsigned>(f.arg);
            src = s < static_cast<long>(base) ? l : static_cast<unsigned>(s);
            break;
          }
          case WarpOp::kShflDown: {
            const unsigned long s = static_cast<unsigned long>(l) + static_cast<unsigned>(f.arg);
            src = s >= base + wd ? l : static_cast<unsigned>(s);
            break;
          }
          default: {
            const unsigned s = l ^ static_cast<unsigned>(f.arg);
            src = (s > 31 || s >= base + wd) ? l : s;
            break;
          }
        }
        if (!(mask >> src & 1u)) {
          fail("warp-mask", fmt("%s at %s: lane %u reads lane %u, which is not in the mask 0x%08x (its value is "
                                "undefined on a GPU)",
                                op_name(g.op), site_str(g.site).c_str(), l, src, mask));
        }
        f.out = lanes[src].in & vmask;
      }
      break;
    }
    case WarpOp::kAny:
    case WarpOp::kAll:
    case WarpOp::kBallot: {
      unsigned ballot = 0;
      for (unsigned m = mask; m; m &= m - 1) {
        const unsigned l = static_cast<unsigned>(__builtin_ctz(m));
        if (lanes[l].in) ballot |= 1u << l;
      }
      const uint64_t r = g.op == WarpOp::kAny ? (ballot != 0) : g.op == WarpOp::kAll ? (ballot == mask) : ballot;
      for (unsigned m = mask; m; m &= m - 1) lanes[__builtin_ctz(m)].out = r;
      break;
    }
    default:
      ++w->wmma_ops;
      wmma_complete(b, self, warp, g);
      break;
  }
}

// Failure paths of arrive(), kept out of its hot path.
[[gnu::cold, gnu::noinline, noreturn]] static void arrive_mask_fail(WarpOp op, unsigned mask,
                                                                    const std::source_location& loc, Fiber* self) {
  BlockCtx& b = self->worker->blk;
  const WarpState& W = b.warps[self->warp];
  if (!(mask & (1u << self->lane))) {
    fail("warp-mask", fmt("%s at %s with mask 0x%08x, which does not contain the calling lane %u", op_name(op),
                          site_str(loc).c_str(), mask, self->lane));
  }
  if (mask & ~W.existing) {
    fail("warp-mask", fmt("%s at %s with mask 0x%08x names lane(s) %s, which do not exist (the block has %u threads; "
                          "warp %u has lanes %s)",
                          op_name(op), site_str(loc).c_str(), mask, lane_list(mask & ~W.existing).c_str(), b.nthreads,
                          self->warp, lane_list(W.existing).c_str()));
  }
  fail("exited-lane", fmt("%s at %s with mask 0x%08x names lane(s) %s, which already exited: the call would hang "
                          "or read undefined values on a GPU",
                          op_name(op), site_str(loc).c_str(), mask, lane_list(mask & W.exited).c_str()));
}

[[gnu::cold, gnu::noinline, noreturn]] static void arrive_group_fail(WarpOp op, unsigned mask,
                                                                     const std::source_location& loc, Fiber* self,
                                                                     const Group* g) {
  if (g->mask != mask) {
    fail("warp-divergence", fmt("%s at %s with mask 0x%08x while lanes %s of the warp wait at %s (%s) with the "
                                "overlapping mask 0x%08x",
                                op_name(op), site_str(loc).c_str(), mask, lane_list(g->arrived).c_str(), op_name(g->op),
                                site_str(g->site).c_str(), g->mask));
  }
  fail("warp-divergence", fmt("lanes of warp %u at different collectives: lane %u at %s (%s), lanes %s at %s (%s), "
                              "mask 0x%08x",
                              self->warp, self->lane, op_name(op), site_str(loc).c_str(), lane_list(g->arrived).c_str(),
                              op_name(g->op), site_str(g->site).c_str(), mask));
}

static uint64_t arrive(WarpOp op, unsigned mask, unsigned bytes, const std::source_location& loc, Fiber* self) {
  Worker* w = self->worker;
  BlockCtx& b = w->blk;
  ++w->collectives;
  WarpState& W = b.warps[self->warp];
  const unsigned bit = 1u << self->lane;
  if (__builtin_expect(!(mask & bit) || (mask & (~W.existing | W.exited)), 0)) arrive_mask_fail(op, mask, loc, self);
  Group* g = nullptr;
  for (int i = 0; i < W.ngroups; ++i) {
    if (W.groups[i].mask & mask) {
      g = &W.groups[i];
      break;
    }
  }
  if (g == nullptr) {
    g = &W.groups[W.ngroups++];
    g->mask = mask;
    g->arrived = 0;
    g->op = op;
    g->bytes = static_cast<uint8_t>(bytes);
    g->site = loc;
  } else if (__builtin_expect(g->mask != mask || g->op != op || g->bytes != bytes || !same_site(g->site, loc), 0)) {
    arrive_group_fail(op, mask, loc, self, g);
  }
  self->wait = Wait::kWarp;
  self->op = op;
  self->mask = mask;
  self->site = loc;
  g->arrived |= bit;
  if (g->arrived == mask) {
    const Group done = *g;
    *g = W.groups[--W.ngroups];  // remove (order of groups does not matter)
    complete_group(w, b, self, self->warp, done);
    Fiber* tmp[32];
    unsigned n = 0;
    Fiber* lanes = w->fibers.get() + self->warp * 32;
    for (unsigned m = mask; m; m &= m - 1) tmp[n++] = &lanes[__builtin_ctz(m)];
    release(b, tmp, n);
  }
  wait_here(w, b, self);
  return self->out;
}

uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, unsigned value_bytes, int arg, int width,
                         const std::source_location& loc) {
  Fiber* self = current_fiber(op_name(op));
  if (op >= WarpOp::kShfl && op <= WarpOp::kShflXor && (width < 1 || width > 32 || (width & (width - 1)) != 0)) {
    fail("warp-mask",
         fmt("%s at %s with width %d: must be a power of two in [1, 32]", op_name(op), site_str(loc).c_str(), width));
  }
  self->in = value;
  self->arg = arg;
  self->width = width;
  return arrive(op, mask, value_bytes, loc, self);
}

void wmma_collective(WarpOp op, const WmmaOperands& ops, const std::source_location& loc) {
  Fiber* self = current_fiber(op_name(op));
  self->wmma = &ops;
  arrive(op, 0xffffffffu, static_cast<unsigned>(ops.elem) + 1, loc, self);
}

// ------------------------------------------------------------------------------------------------ fibers
static void record_block_error(BlockCtx& b, const std::string& msg) {
  if (!b.failed) {
    b.failed = true;
    b.error = msg;
  }
}

// A thread left the kernel: the barrier may now be complete; a warp collective waiting for it never will be.
static void on_exit(Worker* w, BlockCtx& b, Fiber* self) {
  self->exited = true;
  --b.live;
  WarpState& W = b.warps[self->warp];
  const unsigned bit = 1u << self->lane;
  W.exited |= bit;
  for (int i = 0; i < W.ngroups; ++i) {
    const Group& g = W.groups[i];
    if (g.mask & bit) {
      fail("exited-lane", fmt("this thread exited while lanes %s of its warp wait for it at %s (%s) with mask 0x%08x",
                              lane_list(g.arrived).c_str(), op_name(g.op), site_str(g.site).c_str(), g.mask));
    }
  }
  if (b.bar_count > 0 && b.bar_count == b.live) release_barrier(w, b);
}

static std::string describe_fault(Worker* w, Fiber* f, const char** category);

static void run_kernel_body(Worker* w, BlockCtx& b, Fiber* f) {
  try {
    b.launch->spec->thunk(b.launch->spec->call);
  } catch (const KernelError& e) {
    record_block_error(b, e.what());
  } catch (const std::exception& e) {
    record_block_error(b, std::string("llemu: [exception] ") + fiber_context(f) + ": the kernel threw: " + e.what());
  } catch (...) {
    record_block_error(
        b, std::string("llemu: [exception] ") + fiber_context(f) + ": the kernel threw a non-std exception");
  }
  (void)w;
}

static void fiber_entry(Fiber* f) {
  Worker* w = f->worker;
  BlockCtx& b = w->blk;
  if (sigsetjmp(f->jb, 0) == 0) {
    f->jb_valid = true;
    run_kernel_body(w, b, f);
  } else {  // from the fault handler (or the __assert_fail net): the fiber's frames above are abandoned
    set_running(f);
    const char* cat = "fault";
    std::string what = describe_fault(w, f, &cat);
    record_block_error(b, std::string("llemu: [") + cat + "] " + fiber_context(f) + ": " + what);
  }
  if (!b.failed) {
    ++w->fibers_run;
    try {
      on_exit(w, b, f);
    } catch (const KernelError& e) {
      record_block_error(b, e.what());
    }
  }
  Fiber* next = b.failed ? nullptr : pop_ready(b);
  if (next != nullptr) {
    set_running(next);
    ctx_swap(w, &f->ctx, &next->ctx);
  } else {
    tv.cur = nullptr;
    ctx_swap(w, &f->ctx, &w->sched);
  }
  std::abort();  // a finished fiber is never resumed
}

#if !LLEMU_FAST_SWITCH
static void ucontext_entry(unsigned hi, unsigned lo) {
  fiber_entry(reinterpret_cast<Fiber*>((static_cast<uintptr_t>(hi) << 32) | lo));
}
#endif

static void init_ctx(Fiber* f, uint64_t csr) {
#if LLEMU_FAST_SWITCH
  uintptr_t top = reinterpret_cast<uintptr_t>(f->stack_lo + f->stack_size) & ~uintptr_t(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(top);
  *--sp = reinterpret_cast<uint64_t>(&llemu_ctx_trampoline);  // return address of the first switch
  *--sp = 0;                                                  // rbp
  *--sp = reinterpret_cast<uint64_t>(&fiber_entry);           // rbx
  *--sp = reinterpret_cast<uint64_t>(f);                      // r12
  *--sp = 0;                                                  // r13
  *--sp = 0;                                                  // r14
  *--sp = 0;                                                  // r15
  *--sp = csr;                                                // MXCSR | x87 control word << 32
  f->ctx.sp = sp;
#else
  (void)csr;
  getcontext(&f->ctx.uc);
  f->ctx.uc.uc_stack.ss_sp = f->stack_lo;
  f->ctx.uc.uc_stack.ss_size = f->stack_size;
  f->ctx.uc.uc_link = nullptr;
  const uintptr_t p = reinterpret_cast<uintptr_t>(f);
  makecontext(&f->ctx.uc, reinterpret_cast<void (*)()>(&ucontext_entry), 2, static_cast<unsigned>(p >> 32),
              static_cast<unsigned>(p & 0xffffffffu));
#endif
}

static uint64_t current_csr() {
#if LLEMU_FAST_SWITCH
  uint32_t mxcsr = 0;
  uint16_t cw = 0;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(cw));
  return mxcsr | (static_cast<uint64_t>(cw) << 32);
#else
  return 0;
#endif
}

// PROT_NONE below each fiber stack: 64 KiB, so that a frame larger than a page cannot jump over it into the next
// stack (address space only).
constexpr size_t kStackGuard = 64 * 1024;

static void ensure_stacks(Worker* w, unsigned n) {
  while (w->stacks.size() < n) {
    const size_t total = w->stack_size + kStackGuard;
    void* m =
        mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
    if (m == MAP_FAILED) throw std::bad_alloc();
    mprotect(m, kStackGuard, PROT_NONE);  // guard below the stack
    Worker::Stack s{static_cast<char*>(m), total};
    Fiber& f = w->fibers[w->stacks.size()];
    f.stack_lo = s.map + kStackGuard;
    f.stack_size = w->stack_size;
    w->stacks.push_back(s);
  }
}

static std::string deadlock_report(Worker* w, BlockCtx& b);

static std::string run_block(Worker* w, LaunchState* L, uint64_t lin) {
  BlockCtx& b = w->blk;
  const LaunchSpec& s = *L->spec;
  b.launch = L;
  b.linear = lin;
  b.idx = uint3{static_cast<unsigned>(lin % s.grid.x), static_cast<unsigned>((lin / s.grid.x) % s.grid.y),
                static_cast<unsigned>(lin / (static_cast<uint64_t>(s.grid.x) * s.grid.y))};
  blockIdx = b.idx;
  blockDim = uint3{s.block.x, s.block.y, s.block.z};
  gridDim = uint3{s.grid.x, s.grid.y, s.grid.z};
  const unsigned n = L->nthreads;
  b.nthreads = n;
  b.nwarps = (n + 31) / 32;
  b.live = n;
  b.bar_count = 0;
  b.failed = false;
  b.error.clear();
  b.qhead = 0;
  b.qcount = 0;
  for (unsigned i = 0; i < b.nwarps; ++i) {
    WarpState& W = b.warps[i];
    const unsigned lanes = std::min(32u, n - 32 * i);
    W.existing = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1);
    W.exited = 0;
    W.ngroups = 0;
  }
  b.rng.s = L->seed_base ^ (lin * 0xd1342543de82ef95ULL);
  b.rng.next();
  smem_block_start(w, L);
  ensure_stacks(w, n);
  const uint64_t csr = current_csr();
  Fiber* fibers = w->fibers.get();
  const unsigned bx = s.block.x, by = s.block.y;
  Fiber** tmp = b.scratch;
  for (unsigned i = 0; i < n; ++i) {
    Fiber& f = fibers[i];
    f.thread_idx = uint3{i % bx, (i / bx) % by, i / (bx * by)};
    f.linear = i;
    f.lane = i & 31;
    f.warp = i >> 5;
    f.exited = false;
    f.wait = Wait::kNone;
    f.jb_valid = false;
    init_ctx(&f, csr);
    tmp[i] = &f;
  }
  release(b, tmp, n);
  Fiber* first = pop_ready(b);
  set_running(first);
  ctx_swap(w, &w->sched, &first->ctx);
  tv.cur = nullptr;
  ++w->blocks_run;
  if (b.failed) return b.error;
  if (b.live > 0) return deadlock_report(w, b);
  std::string bad = smem_check(w);
  if (!bad.empty()) return "llemu: [shared-oob] " + block_context(L, b) + ": " + bad + "; detected at the block's end";
  return {};
}

static std::string thread_ranges(const std::vector<unsigned>& ids) {
  std::string s;
  for (size_t i = 0; i < ids.size();) {
    size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    if (!s.empty()) s += ", ";
    s += j > i ? fmt("%u-%u", ids[i], ids[j]) : fmt("%u", ids[i]);
    i = j + 1;
  }
  return s;
}

static std::string deadlock_report(Worker* w, BlockCtx& b) {
  struct Grp {
    Wait wait;
    WarpOp op;
    unsigned mask;
    std::source_location site;
    std::vector<unsigned> ids;
  };
  std::vector<Grp> groups;
  Fiber* fibers = w->fibers.get();
  const Fiber* first = nullptr;
  unsigned exited = 0;
  for (unsigned i = 0; i < b.nthreads; ++i) {
    const Fiber& f = fibers[i];
    if (f.exited) {
      ++exited;
      continue;
    }
    if (first == nullptr) first = &f;
    Grp* g = nullptr;
    for (Grp& x : groups) {
      if (x.wait == f.wait && (f.wait == Wait::kBarrier || (x.op == f.op && x.mask == f.mask)) &&
          same_site(x.site, f.site)) {
        g = &x;
        break;
      }
    }
    if (g == nullptr) {
      groups.push_back(Grp{f.wait, f.op, f.mask, f.site, {}});
      g = &groups.back();
    }
    g->ids.push_back(i);
  }
  std::string s = "llemu: [deadlock] " + block_context(b.launch, b);
  if (first != nullptr) s += fmt(", thread (%u,%u,%u)", first->thread_idx.x, first->thread_idx.y, first->thread_idx.z);
  s += fmt(": all %u live threads of the block are blocked and none can proceed (%u exited); waiting at:", b.live,
           exited);
  for (const Grp& g : groups) {
    if (g.wait == Wait::kBarrier) {
      s += fmt("\n  __syncthreads at %s: %zu thread(s): %s", site_str(g.site).c_str(), g.ids.size(),
               thread_ranges(g.ids).c_str());
    } else if (g.wait == Wait::kWarp) {
      s += fmt("\n  %s (mask 0x%08x) at %s: %zu thread(s): %s", op_name(g.op), g.mask, site_str(g.site).c_str(),
               g.ids.size(), thread_ranges(g.ids).c_str());
    } else {
      s += fmt("\n  (not waiting?) %zu thread(s): %s", g.ids.size(), thread_ranges(g.ids).c_str());
    }
  }
  s += "\n  (thread numbers are linear ids x + y*blockDim.x + z*blockDim.x*blockDim.y; warp = id / 32)";
  return s;
}

// ------------------------------------------------------------------------------------------------ faults
namespace {
struct sigaction g_old_segv, g_old_bus, g_old_fpe, g_old_timeout;
int g_installed = 0;
// Sent by the launching thread to the workers when a launch runs over its timeout.
int timeout_signal() { return SIGRTMIN + 5; }

void chain(int sig, siginfo_t* si, void* uc) {
  if (sig == timeout_signal()) return;  // a worker between fibers: it stops taking blocks anyway
  struct sigaction* old = sig == SIGSEGV ? &g_old_segv : sig == SIGBUS ? &g_old_bus : &g_old_fpe;
  if (old->sa_flags & SA_SIGINFO) {
    if (old->sa_sigaction != nullptr) {
      old->sa_sigaction(sig, si, uc);
      return;
    }
  } else if (old->sa_handler != SIG_DFL && old->sa_handler != SIG_IGN) {
    old->sa_handler(sig);
    return;
  }
  // default action: restore it and let the fault happen again (or re-raise a sent signal)
  signal(sig, SIG_DFL);
  if (si == nullptr || si->si_code <= 0) raise(sig);
}

void fault_handler(int sig, siginfo_t* si, void* uc) {
  FiberHead* h = tv.cur;
  if (h != nullptr && static_cast<Fiber*>(h)->jb_valid) {
    Fiber* f = static_cast<Fiber*>(h);
    f->fault_sig = sig;
    f->fault_code = si ? si->si_code : 0;
    f->fault_addr = si ? reinterpret_cast<uintptr_t>(si->si_addr) : 0;
    f->fault_write = -1;
    f->fault_pc = 0;
#if defined(__x86_64__)
    if (uc != nullptr) {
      const ucontext_t* u = static_cast<const ucontext_t*>(uc);
      f->fault_pc = static_cast<uintptr_t>(u->uc_mcontext.gregs[REG_RIP]);
      if (sig == SIGSEGV) f->fault_write = (u->uc_mcontext.gregs[REG_ERR] & 2) ? 1 : 0;
    }
#endif
    siglongjmp(f->jb, 1);
  }
  chain(sig, si, uc);
}

void install_handlers() {
  if (g_installed++ > 0) return;
  struct sigaction sa;
  std::memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = &fault_handler;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;  // NODEFER: we leave by siglongjmp without the mask
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, &g_old_segv);
  sigaction(SIGBUS, &sa, &g_old_bus);
  sigaction(SIGFPE, &sa, &g_old_fpe);
  sigaction(timeout_signal(), &sa, &g_old_timeout);
}

void uninstall_handlers() {
  if (--g_installed > 0) return;
  auto restore = [](int sig, struct sigaction* old) {
    struct sigaction cur;
    sigaction(sig, nullptr, &cur);
    if ((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == &fault_handler) sigaction(sig, old, nullptr);
  };
  restore(SIGSEGV, &g_old_segv);
  restore(SIGBUS, &g_old_bus);
  restore(SIGFPE, &g_old_fpe);
  restore(timeout_signal(), &g_old_timeout);
}
}  // namespace

static std::string describe_fault(Worker* w, Fiber* f, const char** category) {
  const uintptr_t a = f->fault_addr;
  const size_t page = page_size();
  const char* sig = f->fault_sig == SIGSEGV ? "SIGSEGV" : f->fault_sig == SIGBUS ? "SIGBUS" : "SIGFPE";
  if (f->fault_sig == timeout_signal()) {
    *category = "timeout";
    return fmt("the launch ran over its timeout of %g s and this thread was still running (at pc 0x%" PRIxPTR
               "): an endless loop or a busy-wait? (threads are not preempted here; raise the limit with "
               "configure(timeout_s=...) / LLADAPTER_EMU_TIMEOUT_S if the kernel is just slow)",
               w->blk.launch->cfg.timeout_s, f->fault_pc);
  }
  if (f->fault_sig == SIGFPE) {
    *category = "fault";
    return fmt("SIGFPE (%s) at pc 0x%" PRIxPTR,
               f->fault_code == FPE_INTDIV   ? "integer division by zero"
               : f->fault_code == FPE_INTOVF ? "integer overflow"
                                             : "arithmetic exception",
               f->fault_pc);
  }
  const char* rw = f->fault_write == 1 ? "write" : f->fault_write == 0 ? "read" : "access";
  std::string where;
  const Smem& s = w->smem;
  const uintptr_t lo = reinterpret_cast<uintptr_t>(f->stack_lo);
  if (f->fault_sig == 0) {  // the __assert_fail net
    *category = "kernel-assert";
    return f->net_msg ? f->net_msg : "assertion failed";
  }
  if (a >= lo - kStackGuard && a < lo) {
    *category = "stack-overflow";
    return fmt("stack overflow: %s at 0x%" PRIxPTR
               " in the guard region below this thread's %zu KiB fiber stack "
               "(raise stack_kib / LLADAPTER_EMU_STACK_KIB if the kernel needs more)",
               rw, a, f->stack_size / 1024);
  }
  for (unsigned i = 0; i < w->stacks.size(); ++i) {
    const uintptr_t l2 = reinterpret_cast<uintptr_t>(w->fibers[i].stack_lo);
    if (a >= l2 - kStackGuard && a < l2) {
      *category = "fault";
      return fmt("invalid %s at 0x%" PRIxPTR " in the stack guard page of thread %u", rw, a, i);
    }
  }
  const uintptr_t dyn_end = reinterpret_cast<uintptr_t>(s.dyn_end);
  const uintptr_t dyn_data_end = reinterpret_cast<uintptr_t>(s.dyn_start) + s.dyn_size;
  if (a >= dyn_end && a < dyn_end + page) {
    *category = "shared-oob";
    return fmt("invalid %s at 0x%" PRIxPTR ": %zu bytes past the end of the %zu-byte dynamic shared memory", rw, a,
               static_cast<size_t>(a - dyn_data_end), s.dyn_size);
  }
  if (a >= reinterpret_cast<uintptr_t>(s.dyn_map) && a < reinterpret_cast<uintptr_t>(s.dyn_lo)) {
    *category = "shared-oob";
    return fmt("invalid %s at 0x%" PRIxPTR ": %zu bytes before the start of the %zu-byte dynamic shared memory", rw, a,
               static_cast<size_t>(reinterpret_cast<uintptr_t>(s.dyn_start) - a), s.dyn_size);
  }
  const uintptr_t st = reinterpret_cast<uintptr_t>(s.static_base);
  if ((a >= st - page && a < st) || (a >= st + s.static_cap && a < st + s.static_cap + page)) {
    *category = "shared-oob";
    return fmt("invalid %s at 0x%" PRIxPTR ": outside the static __shared__ arena", rw, a);
  }
  if (describe_guarded_address(a, &where)) {
    *category = "global-oob";
    return fmt("invalid %s at 0x%" PRIxPTR ": %s (pc 0x%" PRIxPTR ")", rw, a, where.c_str(), f->fault_pc);
  }
  *category = "fault";
  if (a < 65536)
    return fmt("%s: %s of address 0x%" PRIxPTR " (a null pointer?) at pc 0x%" PRIxPTR, sig, rw, a, f->fault_pc);
  return fmt("%s: invalid %s at 0x%" PRIxPTR
             " (not a guarded allocation, shared memory or a fiber stack) at pc 0x%" PRIxPTR,
             sig, rw, a, f->fault_pc);
}

// Called by the __assert_fail net (emu_assert_net.cpp) on a fiber: ends the thread with a kernel-assert error.
bool in_fiber() { return tv.cur != nullptr; }

[[noreturn]] void assert_fail_in_fiber(const char* msg) {
  Fiber* f = static_cast<Fiber*>(tv.cur);
  static thread_local std::string keep;
  keep = msg;
  f->fault_sig = 0;
  f->net_msg = keep.c_str();
  siglongjmp(f->jb, 1);  // up the same stack to fiber_entry: __assert_fail is noexcept, so no throw
}

// ------------------------------------------------------------------------------------------------ worker pool
namespace {
struct Pool {
  std::vector<std::unique_ptr<Worker>> workers;
  std::vector<std::thread> threads;
  int stack_kib = 0;
  std::mutex mu;
  std::condition_variable cv, done_cv;
  uint64_t gen = 0;
  LaunchState* cur = nullptr;
  int active = 0;
  bool stop = false;
};
Pool* g_pool = nullptr;

void setup_altstack(Worker* w) {
  w->altstack_size = 64 * 1024 + static_cast<size_t>(sysconf(_SC_SIGSTKSZ) > 0 ? sysconf(_SC_SIGSTKSZ) : 0);
  void* m = mmap(nullptr, w->altstack_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) return;
  w->altstack = static_cast<char*>(m);
  stack_t ss;
  ss.ss_sp = w->altstack;
  ss.ss_size = w->altstack_size;
  ss.ss_flags = 0;
  sigaltstack(&ss, nullptr);
}

void run_blocks(Worker* w, LaunchState* L) {
  for (;;) {
    if (L->failed.load(std::memory_order_relaxed)) break;
    const uint64_t i = L->next.fetch_add(1, std::memory_order_relaxed);
    if (i >= L->nblocks) break;
    std::string err = run_block(w, L, i);
    if (!err.empty()) {
      std::lock_guard<std::mutex> lk(L->err_mu);
      if (i < L->error_block) {
        L->error = std::move(err);
        L->error_block = i;
      }
      L->failed.store(true, std::memory_order_relaxed);
    }
  }
}

void worker_main(Pool* p, Worker* w) {
  setup_altstack(w);
  uint64_t seen = 0;
  for (;;) {
    LaunchState* L = nullptr;
    {
      std::unique_lock<std::mutex> lk(p->mu);
      p->cv.wait(lk, [&] { return p->stop || p->gen != seen; });
      if (p->stop) break;
      seen = p->gen;
      L = p->cur;
    }
    run_blocks(w, L);
    {
      std::lock_guard<std::mutex> lk(p->mu);
      if (--p->active == 0) p->done_cv.notify_all();
    }
  }
  stack_t ss;
  std::memset(&ss, 0, sizeof ss);
  ss.ss_flags = SS_DISABLE;
  sigaltstack(&ss, nullptr);
}

void destroy_pool() {
  if (g_pool == nullptr) return;
  {
    std::lock_guard<std::mutex> lk(g_pool->mu);
    g_pool->stop = true;
  }
  g_pool->cv.notify_all();
  for (auto& t : g_pool->threads) t.join();
  for (auto& w : g_pool->workers) {
    for (auto& s : w->stacks) munmap(s.map, s.map_size);
    if (w->smem.static_map) munmap(w->smem.static_map, w->smem.static_map_size);
    if (w->smem.dyn_map) munmap(w->smem.dyn_map, w->smem.dyn_map_size);
    if (w->altstack) munmap(w->altstack, w->altstack_size);
  }
  delete g_pool;
  g_pool = nullptr;
}

int default_workers() {
  const unsigned hc = std::thread::hardware_concurrency();
  return static_cast<int>(std::max(1u, std::min(2u, hc == 0 ? 1u : hc)));
}

void ensure_pool(const Config& c) {
  const int n = c.workers > 0 ? c.workers : default_workers();
  const int stack_kib = std::max(16, c.stack_kib);
  if (g_pool && (static_cast<int>(g_pool->workers.size()) != n || g_pool->stack_kib != stack_kib)) destroy_pool();
  if (g_pool) return;
  auto* p = new Pool();
  p->stack_kib = stack_kib;
  for (int i = 0; i < n; ++i) {
    auto w = std::make_unique<Worker>();
    w->index = i;
    w->fibers = std::make_unique<Fiber[]>(kMaxThreads);
    for (int j = 0; j < kMaxThreads; ++j) w->fibers[j].worker = w.get();
    w->stack_size = static_cast<size_t>(stack_kib) * 1024;
    smem_init(w.get());
    p->workers.push_back(std::move(w));
  }
  for (int i = 0; i < n; ++i) p->threads.emplace_back(worker_main, p, p->workers[i].get());
  g_pool = p;
}

void atfork_child() {  // the pool's threads do not exist in a forked child: forget them
  g_pool = nullptr;
  new (&launch_mu()) std::mutex();
  g_installed = 0;
}
struct AtFork {
  AtFork() { pthread_atfork(nullptr, nullptr, &atfork_child); }
} g_atfork;

std::string dims(const dim3& d) { return fmt("(%u,%u,%u)", d.x, d.y, d.z); }

uint64_t fnv1a(const char* s) {
  uint64_t h = 1469598103934665603ULL;
  for (; s && *s; ++s) h = (h ^ static_cast<unsigned char>(*s)) * 1099511628211ULL;
  return h;
}
}  // namespace

static void validate_launch(const LaunchState& L) {
  const LaunchSpec& s = *L.spec;
  const DeviceProfile& p = L.prof;
  auto bad = [&](const char* cat, const std::string& what) {
    throw KernelError(std::string("llemu: [") + cat + "] " + launch_context(&L) + ": " + what);
  };
  if (s.grid.x == 0 || s.grid.y == 0 || s.grid.z == 0)
    bad("launch-config", "grid " + dims(s.grid) + " has a zero dimension");
  if (s.block.x == 0 || s.block.y == 0 || s.block.z == 0)
    bad("launch-config", "block " + dims(s.block) + " has a zero dimension");
  const unsigned bd[3] = {s.block.x, s.block.y, s.block.z};
  const unsigned gd[3] = {s.grid.x, s.grid.y, s.grid.z};
  for (int i = 0; i < 3; ++i) {
    if (bd[i] > static_cast<unsigned>(p.max_block_dim[i])) {
      bad("launch-config", fmt("block %s: dimension %c = %u exceeds the limit %d", dims(s.block).c_str(), "xyz"[i],
                               bd[i], p.max_block_dim[i]));
    }
    if (gd[i] > static_cast<unsigned long long>(p.max_grid_dim[i])) {
      bad("launch-config", fmt("grid %s: dimension %c = %u exceeds the limit %lld", dims(s.grid).c_str(), "xyz"[i],
                               gd[i], p.max_grid_dim[i]));
    }
  }
  const uint64_t threads = static_cast<uint64_t>(s.block.x) * s.block.y * s.block.z;
  if (threads > static_cast<uint64_t>(p.max_threads_per_block)) {
    bad("launch-config",
        fmt("block %s has %llu threads, over the limit of %d threads per block (profile %s)", dims(s.block).c_str(),
            static_cast<unsigned long long>(threads), p.max_threads_per_block, p.name.c_str()));
  }
  if (s.dynamic_smem > p.smem_optin_limit) {
    bad("smem-limit", fmt("%zu bytes of dynamic shared memory exceed the %zu-byte opt-in limit of profile %s",
                          s.dynamic_smem, p.smem_optin_limit, p.name.c_str()));
  }
  if (s.dynamic_smem > p.static_smem_limit) {
    int attr = -1;
    {
      std::lock_guard<std::mutex> lk(g_state_mu);
      auto it = G().max_dyn.find(s.kernel_key);
      if (it != G().max_dyn.end()) attr = it->second;
    }
    if (attr < 0 || static_cast<size_t>(attr) < s.dynamic_smem) {
      bad("smem-attr", fmt("%zu bytes of dynamic shared memory (over %zu) need "
                           "cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, >= %zu) first; "
                           "%s",
                           s.dynamic_smem, p.static_smem_limit, s.dynamic_smem,
                           attr < 0 ? "it was never set for this kernel" : fmt("it is %d", attr).c_str()));
    }
  }
}

void launch(const LaunchSpec& s) {
  if (tv.cur != nullptr) {
    fail("launch-config", fmt("a kernel launch from inside a kernel (%s at %s:%d): dynamic parallelism is not emulated",
                              s.name, short_path(s.file).c_str(), s.line));
  }
  std::unique_lock<std::mutex> lk(launch_mu());
  LaunchState L;
  L.spec = &s;
  {
    std::lock_guard<std::mutex> sl(g_state_mu);
    L.cfg = G().cfg;
    L.prof = G().prof;
    L.layout = &G().layout;
  }
  try {
    validate_launch(L);
  } catch (const KernelError&) {
    std::lock_guard<std::mutex> sl(g_state_mu);
    ++G().stats.errors;
    throw;
  }
  L.nblocks = static_cast<uint64_t>(s.grid.x) * s.grid.y * s.grid.z;
  L.nthreads = s.block.x * s.block.y * s.block.z;
  {
    std::lock_guard<std::mutex> sl(g_state_mu);
    L.id = ++G().launch_seq;
    KernelRecord& r = G().kernels[s.name ? s.name : "?"];
    ++r.launches;
    r.blocks += L.nblocks;
    r.threads += L.nblocks * L.nthreads;
    const std::string site = short_path(s.file) + ":" + std::to_string(s.line);
    if (std::find(r.sites.begin(), r.sites.end(), site) == r.sites.end()) r.sites.push_back(site);
    if (std::find(r.functions.begin(), r.functions.end(), s.kernel_key) == r.functions.end()) {
      r.functions.push_back(s.kernel_key);
    }
  }
  L.seed_base = (L.cfg.seed * 0x9e3779b97f4a7c15ULL) ^ fnv1a(s.name);

  ensure_pool(L.cfg);
  Pool* p = g_pool;
  install_handlers();
  {
    std::lock_guard<std::mutex> pl(p->mu);
    p->cur = &L;
    p->active = static_cast<int>(p->workers.size());
    ++p->gen;
  }
  p->cv.notify_all();
  {
    std::unique_lock<std::mutex> pl(p->mu);
    if (L.cfg.timeout_s > 0) {
      const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(L.cfg.timeout_s);
      if (!p->done_cv.wait_until(pl, deadline, [&] { return p->active == 0; })) {
        // over time: stop handing out blocks and interrupt the fibers still running, until every worker is back
        L.timed_out = true;
        L.failed.store(true);
        do {
          for (auto& t : p->threads) pthread_kill(t.native_handle(), timeout_signal());
        } while (!p->done_cv.wait_for(pl, std::chrono::milliseconds(100), [&] { return p->active == 0; }));
      }
    } else {
      p->done_cv.wait(pl, [&] { return p->active == 0; });
    }
    p->cur = nullptr;
  }
  uninstall_handlers();

  std::string post = check_guarded_canaries();
  std::vector<std::string> freed_bad = take_guarded_errors();
  {
    std::lock_guard<std::mutex> sl(g_state_mu);
    Stats& st = G().stats;
    ++st.launches;
    for (auto& w : p->workers) {
      st.blocks += w->blocks_run;
      st.fibers += w->fibers_run;
      st.context_switches += w->switches;
      st.barriers += w->barriers;
      st.warp_collectives += w->collectives;
      st.wmma_ops += w->wmma_ops;
      w->blocks_run = w->fibers_run = w->switches = w->barriers = w->collectives = w->wmma_ops = 0;
      for (auto& kv : w->warns) G().warnings[kv.second.msg] += kv.second.count;
      w->warns.clear();
    }
    for (const std::string& m : freed_bad) G().warnings["[global-oob] found when freeing: " + m] += 1;
  }
  if (L.error.empty() && !post.empty()) {
    L.error = "llemu: [global-oob] " + launch_context(&L) + ": " + post +
              " (found by the canary check after the launch; the faulting block and thread are unknown)";
  }
  if (!L.error.empty()) {
    {
      std::lock_guard<std::mutex> sl(g_state_mu);
      ++G().stats.errors;
    }
    throw KernelError(L.error);
  }
}

}  // namespace detail

// ------------------------------------------------------------------------------------------------ public API
using detail::G;

const DeviceProfile& device_profile() {
  // Returned by reference: changing the profile while someone holds it is the caller's problem (not during launches)
  return G().prof;
}

void set_device_profile(const std::string& name, int sm_count) {
  DeviceProfile p = detail::builtin_profile(name);
  if (sm_count > 0) p.sm_count = sm_count;
  std::lock_guard<std::mutex> lk(detail::launch_mu());
  std::lock_guard<std::mutex> sl(detail::g_state_mu);
  G().prof = p;
}

void set_sm_count(int sm_count) {
  if (sm_count <= 0) throw std::invalid_argument("llemu: sm_count must be > 0");
  std::lock_guard<std::mutex> lk(detail::launch_mu());
  std::lock_guard<std::mutex> sl(detail::g_state_mu);
  G().prof.sm_count = sm_count;
}

std::vector<std::string> device_profile_names() { return {"sm80", "sm90"}; }

Config config() {
  std::lock_guard<std::mutex> sl(detail::g_state_mu);
  return G().cfg;
}

void configure(const Config& c) {
  if (c.workers < 0 || c.workers > 64) throw std::invalid_argument("llemu: workers must be in [0, 64]");
  if (c.stack_kib < 16 || c.stack_kib > 65536) throw std::invalid_argument("llemu: stack_kib must be in [16, 65536]");
  if (!(c.timeout_s >= 0)) throw std::invalid_argument("llemu: timeout_s must be >= 0 (0: no timeout)");
  std::lock_guard<std::mutex> lk(detail::launch_mu());
  std::lock_guard<std::mutex> sl(detail::g_state_mu);
  const bool relayout = c.layout != G().cfg.layout || c.layout_seed != G().cfg.layout_seed;
  G().cfg = c;
  if (relayout) detail::build_layout_tables(c.layout, c.layout_seed, &G().layout);
}

const char* schedule_name(Schedule s) {
  switch (s) {
    case Schedule::kInOrder:
      return "inorder";
    case Schedule::kReverse:
      return "reverse";
    case Schedule::kRandom:
      return "random";
  }
  return "?";
}
const char* layout_name(WmmaLayout l) { return l == WmmaLayout::kSm80 ? "sm80" : "scrambled"; }

Schedule parse_schedule(const std::string& s) {
  if (s == "inorder" || s == "in-order" || s == "in_order") return Schedule::kInOrder;
  if (s == "reverse") return Schedule::kReverse;
  if (s == "random") return Schedule::kRandom;
  throw std::invalid_argument("llemu: schedule must be 'inorder', 'reverse' or 'random', got '" + s + "'");
}
WmmaLayout parse_layout(const std::string& s) {
  if (s == "sm80") return WmmaLayout::kSm80;
  if (s == "scrambled") return WmmaLayout::kScrambled;
  throw std::invalid_argument("llemu: layout must be 'sm80' or 'scrambled', got '" + s + "'");
}

std::map<std::string, KernelRecord> launched_kernels() {
  std::lock_guard<std::mutex> sl(detail::g_state_mu);
  return G().kernels;
}

Stats stats() {
  std::lock_guard<std::mutex> sl(detail::g_state_mu);
  return G().stats;
}

void reset_stats() {
  std::lock_guard<std::mutex> sl(detail::g_state_mu);
  G().stats = Stats{};
  G().kernels.clear();
  G().warnings.clear();
}

std::vector<std::pair<std::string, uint64_t>> warnings() {
  std::lock_guard<std::mutex> sl(detail::g_state_mu);
  return {G().warnings.begin(), G().warnings.end()};
}

void clear_warnings() {
  std::lock_guard<std::mutex> sl(detail::g_state_mu);
  G().warnings.clear();
}

void set_max_dynamic_smem(const void* kernel, int bytes) {
  const DeviceProfile p = [] {
    std::lock_guard<std::mutex> sl(detail::g_state_mu);
    return G().prof;
  }();
  if (bytes < 0 || static_cast<size_t>(bytes) > p.smem_optin_limit) {
    throw KernelError(
        detail::fmt("llemu: [smem-attr] cudaFuncSetAttribute(MaxDynamicSharedMemorySize, %d): must be "
                    "in [0, %zu], the opt-in limit of profile %s",
                    bytes, p.smem_optin_limit, p.name.c_str()));
  }
  std::lock_guard<std::mutex> sl(detail::g_state_mu);
  G().max_dyn[kernel] = bytes;
}

void wmma_element_position(int kind, int lane, int i, int* row, int* col) {
  if (kind < 0 || kind > 2 || lane < 0 || lane > 31 || i < 0 || i > 15) {
    throw std::invalid_argument("llemu::wmma_element_position: kind in [0,2], lane in [0,31], i in [0,15]");
  }
  std::lock_guard<std::mutex> sl(detail::g_state_mu);
  const uint8_t p = G().layout.pos[kind][lane][i & 7];
  *row = p >> 4;
  *col = p & 15;
}

}  // namespace llemu
