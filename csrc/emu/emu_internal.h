// Runtime internals of the emulator, shared by emu.cpp and wmma.cpp. Not for kernel code.
#pragma once

#include <setjmp.h>
#include <signal.h>

#include <atomic>
#include <cstdarg>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "emu.h"

#if defined(__x86_64__) && !defined(LLEMU_FORCE_UCONTEXT)
#define LLEMU_FAST_SWITCH 1
#else
#define LLEMU_FAST_SWITCH 0
#include <ucontext.h>
#endif

namespace llemu::detail {

constexpr int kMaxThreads = 1024;
constexpr int kMaxWarps = kMaxThreads / 32;
constexpr size_t kCanaryBytes = 32;
constexpr uint32_t kCanaryWord = 0xFFFFFFFEu;  // a NaN in fp32, and two NaNs in fp16 / bf16

struct Worker;
struct LaunchState;

struct Ctx {
#if LLEMU_FAST_SWITCH
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
};

enum class Wait : uint8_t { kNone, kBarrier, kWarp };

struct Fiber : FiberHead {
  Ctx ctx;
  Worker* worker = nullptr;
  unsigned lane = 0, warp = 0;
  bool exited = false;
  Wait wait = Wait::kNone;
  WarpOp op = WarpOp::kSyncwarp;
  unsigned mask = 0;
  std::source_location site;
  // collective operands and result
  uint64_t in = 0, out = 0;
  int arg = 0, width = 32;
  const WmmaOperands* wmma = nullptr;
  // stack (usable [stack_lo, stack_lo + stack_size); the guard page lies below stack_lo)
  char* stack_lo = nullptr;
  size_t stack_size = 0;
  // fault details, written by the signal handler
  int fault_sig = 0;
  int fault_code = 0;
  int fault_write = -1;  // 1 write, 0 read, -1 unknown
  uintptr_t fault_addr = 0, fault_pc = 0;
  const char* net_msg = nullptr;   // message from the __assert_fail net (fault_sig == 0)
  volatile bool jb_valid = false;  // jb holds this block's fiber_entry frame
  sigjmp_buf jb;
};

// A warp collective in progress: the lanes of `mask` that have arrived so far.
struct Group {
  unsigned mask = 0, arrived = 0;
  WarpOp op = WarpOp::kSyncwarp;
  uint8_t bytes = 0;
  std::source_location site;
};

struct WarpState {
  unsigned existing = 0;  // lanes that exist (a partial last warp has fewer)
  unsigned exited = 0;
  int ngroups = 0;
  Group groups[32];
};

struct Rng {  // splitmix64
  uint64_t s = 0;
  uint64_t next() {
    uint64_t z = (s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }
  unsigned below(unsigned n) { return static_cast<unsigned>(next() % n); }
};

struct StaticArray {
  const void* key;
  size_t off, bytes;
  const char* name;
  std::source_location loc;
};

// Per-worker shared memory: a static arena (arrays placed as first met, each followed by a canary) and a dynamic
// arena whose region ends against a PROT_NONE page.
struct Smem {
  char* static_map = nullptr;
  size_t static_map_size = 0;
  char* static_base = nullptr;  // after the leading guard page
  size_t static_cap = 0;
  std::vector<StaticArray> arrays;
  size_t static_used = 0;   // end of the last canary
  size_t static_bytes = 0;  // sum of the arrays' sizes (what the limits count)
  uint64_t launch_id = ~0ULL;
  char* dyn_map = nullptr;
  size_t dyn_map_size = 0;
  char* dyn_lo = nullptr;   // first usable byte (after the leading guard page)
  char* dyn_end = nullptr;  // start of the trailing guard page
  char* dyn_start = nullptr;
  size_t dyn_size = 0;
};

struct BlockCtx {
  LaunchState* launch = nullptr;
  uint64_t linear = 0;
  uint3 idx{};
  unsigned nthreads = 0, nwarps = 0;
  unsigned live = 0;
  // ready queue (ring; every fiber is in it at most once)
  Fiber* q[kMaxThreads];
  unsigned qhead = 0, qcount = 0;
  Fiber* scratch[kMaxThreads];  // release lists (kept off the fiber stacks, which may be small)
  // __syncthreads
  unsigned bar_count = 0;
  std::source_location bar_site;
  WarpState warps[kMaxWarps];
  Rng rng;
  bool failed = false;
  std::string error;
};

struct WarnEntry {
  std::string msg;
  uint64_t count = 0;
};
struct WarnKey {  // a warning is counted per (site, kind); its message is formatted once
  const char* file;
  unsigned line, column;
  const char* kind;
  bool operator==(const WarnKey& o) const {
    return file == o.file && line == o.line && column == o.column && kind == o.kind;
  }
};
struct WarnKeyHash {
  size_t operator()(const WarnKey& k) const {
    return std::hash<const void*>()(k.file) ^ (static_cast<size_t>(k.line) * 0x9e3779b97f4a7c15ULL) ^
           (static_cast<size_t>(k.column) << 20) ^ std::hash<const void*>()(k.kind);
  }
};

struct Worker {
  int index = 0;
  std::unique_ptr<Fiber[]> fibers;
  struct Stack {
    char* map = nullptr;
    size_t map_size = 0;
  };
  std::vector<Stack> stacks;
  size_t stack_size = 0;
  Smem smem;
  BlockCtx blk;
  Ctx sched;
  // counters (merged into the global stats after each launch)
  uint64_t switches = 0, barriers = 0, collectives = 0, wmma_ops = 0, fibers_run = 0, blocks_run = 0;
  std::unordered_map<WarnKey, WarnEntry, WarnKeyHash> warns;
  char* altstack = nullptr;
  size_t altstack_size = 0;
};

// Layout of wmma fragments: tile position (row << 4 | col) of element i (< 8) of lane l, per fragment kind.
struct WmmaLayoutTables {
  uint8_t pos[3][32][8];
};

struct LaunchState {
  const LaunchSpec* spec = nullptr;
  uint64_t id = 0;
  uint64_t nblocks = 0;
  unsigned nthreads = 0;
  std::atomic<uint64_t> next{0};
  std::atomic<bool> failed{false};
  bool timed_out = false;
  std::mutex err_mu;
  std::string error;
  uint64_t error_block = ~0ULL;
  Config cfg;
  DeviceProfile prof;
  uint64_t seed_base = 0;
  const WmmaLayoutTables* layout = nullptr;
};

// ---- helpers implemented in emu.cpp
Fiber* current_fiber(const char* what);
[[noreturn]] void fail(const char* category, const std::string& detail);
std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
std::string site_str(const std::source_location& l);
const char* op_name(WarpOp op);
// Counts a warning of `kind` (a string literal) at `loc`; make_msg() runs only for the first occurrence.
template <class F>
void warn_site(Worker* w, const std::source_location& loc, const char* kind, F&& make_msg);

template <class F>
void warn_site(Worker* w, const std::source_location& loc, const char* kind, F&& make_msg) {
  WarnEntry& e = w->warns[WarnKey{loc.file_name(), loc.line(), loc.column(), kind}];
  if (e.count++ == 0) e.msg = make_msg();
}

bool in_fiber();
[[noreturn]] void assert_fail_in_fiber(const char* msg);

// ---- implemented in wmma.cpp
void wmma_complete(BlockCtx& b, Fiber* self, unsigned warp, const Group& g);
void build_layout_tables(WmmaLayout layout, uint64_t seed, WmmaLayoutTables* out);

}  // namespace llemu::detail
