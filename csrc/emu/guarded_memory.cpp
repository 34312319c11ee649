// Guard-page allocations (see guarded_memory.h).
#include "guarded_memory.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <new>

namespace llemu {
namespace {

constexpr uint32_t kCanaryWord = 0xFFFFFFFEu;
constexpr size_t kHeadCheck = 64;  // head slack bytes checked (just before the data)

struct Region {
  uintptr_t map = 0;
  size_t map_size = 0;
  uintptr_t data = 0;
  size_t n = 0;
  uintptr_t body_lo = 0;  // first byte after the leading guard page
  uintptr_t body_hi = 0;  // start of the trailing guard page
};

std::mutex g_mu;
std::map<uintptr_t, Region>& regions() {  // keyed by data address
  static auto* m = new std::map<uintptr_t, Region>();
  return *m;
}
std::vector<std::string>& errors() {
  static auto* v = new std::vector<std::string>();
  return *v;
}

size_t page_size() {
  static const size_t p = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return p;
}

void fill_canary(uintptr_t lo, uintptr_t hi) {
  for (uintptr_t a = lo; a < hi; ++a) {
    const unsigned sh = static_cast<unsigned>((a & 3) * 8);
    *reinterpret_cast<unsigned char*>(a) = static_cast<unsigned char>(kCanaryWord >> sh);
  }
}
// first corrupted address in [lo, hi), or 0
uintptr_t find_corruption(uintptr_t lo, uintptr_t hi) {
  for (uintptr_t a = lo; a < hi; ++a) {
    const unsigned sh = static_cast<unsigned>((a & 3) * 8);
    if (*reinterpret_cast<const unsigned char*>(a) != static_cast<unsigned char>(kCanaryWord >> sh)) return a;
  }
  return 0;
}

std::string check_region(const Region& r, bool repair) {
  std::string out;
  char buf[256];
  const uintptr_t end = r.data + r.n;
  if (uintptr_t a = find_corruption(end, r.body_hi)) {
    std::snprintf(buf, sizeof buf,
                  "write past the end of a %zu-byte guarded allocation at 0x%" PRIxPTR
                  " (first corrupted byte %zu bytes past its end, in the %zu-byte slack before its guard page)",
                  r.n, r.data, static_cast<size_t>(a - end), static_cast<size_t>(r.body_hi - end));
    out = buf;
    if (repair) fill_canary(end, r.body_hi);
  }
  const uintptr_t head_lo = r.data - kHeadCheck < r.body_lo ? r.body_lo : r.data - kHeadCheck;
  if (uintptr_t a = find_corruption(head_lo, r.data)) {
    std::snprintf(buf, sizeof buf,
                  "write before the start of a %zu-byte guarded allocation at 0x%" PRIxPTR " (%zu bytes before it)",
                  r.n, r.data, static_cast<size_t>(r.data - a));
    if (!out.empty()) out += "; ";
    out += buf;
    if (repair) fill_canary(head_lo, r.data);
  }
  return out;
}

}  // namespace

void* guarded_alloc(size_t n) {
  const size_t page = page_size();
  const size_t n16 = (n + 15) & ~size_t(15);
  const size_t body = ((n16 == 0 ? 16 : n16) + page - 1) & ~(page - 1);
  const size_t total = body + 2 * page;
  void* m = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) throw std::bad_alloc();
  const uintptr_t map = reinterpret_cast<uintptr_t>(m);
  if (mprotect(m, page, PROT_NONE) != 0 || mprotect(reinterpret_cast<void*>(map + page + body), page, PROT_NONE) != 0) {
    munmap(m, total);
    throw std::bad_alloc();
  }
  Region r;
  r.map = map;
  r.map_size = total;
  r.body_lo = map + page;
  r.body_hi = map + page + body;
  r.data = r.body_hi - n16;
  r.n = n;
  const uintptr_t head_lo = r.data - kHeadCheck < r.body_lo ? r.body_lo : r.data - kHeadCheck;
  fill_canary(head_lo, r.data);
  std::memset(reinterpret_cast<void*>(r.data), 0xFF, n);  // unwritten outputs read as NaN
  fill_canary(r.data + n, r.body_hi);
  {
    std::lock_guard<std::mutex> lk(g_mu);
    regions()[r.data] = r;
  }
  return reinterpret_cast<void*>(r.data);
}

void guarded_free(void* p) {
  if (p == nullptr) return;
  Region r;
  {
    std::lock_guard<std::mutex> lk(g_mu);
    auto it = regions().find(reinterpret_cast<uintptr_t>(p));
    if (it == regions().end()) {
      std::fprintf(stderr, "llemu: guarded_free(%p): not a live guarded allocation (double free?)\n", p);
      errors().push_back("guarded_free of a pointer that is not a live guarded allocation (double free?)");
      return;
    }
    r = it->second;
    regions().erase(it);
    const std::string bad = check_region(r, false);
    if (!bad.empty()) {
      std::fprintf(stderr, "llemu: [global-oob] found when freeing: %s\n", bad.c_str());
      errors().push_back(bad);
    }
  }
  munmap(reinterpret_cast<void*>(r.map), r.map_size);
}

bool describe_guarded_address(uintptr_t a, std::string* out) {
  std::lock_guard<std::mutex> lk(g_mu);
  auto& m = regions();
  if (m.empty()) return false;
  const size_t page = page_size();
  // the region whose data starts at or after a (a front guard / head slack hit) and the one before (a tail hit)
  auto it = m.lower_bound(a);
  char buf[256];
  if (it != m.end()) {
    const Region& r = it->second;
    if (a >= r.map && a < r.data) {
      std::snprintf(buf, sizeof buf, "%zu bytes before the start of a %zu-byte guarded allocation at 0x%" PRIxPTR,
                    static_cast<size_t>(r.data - a), r.n, r.data);
      *out = buf;
      return true;
    }
  }
  if (it != m.begin()) {
    const Region& r = std::prev(it)->second;
    if (a >= r.data + r.n && a < r.body_hi + page) {
      std::snprintf(buf, sizeof buf, "%zu bytes past the end of a %zu-byte guarded allocation at 0x%" PRIxPTR,
                    static_cast<size_t>(a - (r.data + r.n)), r.n, r.data);
      *out = buf;
      return true;
    }
    if (a >= r.data && a < r.data + r.n) {
      std::snprintf(buf, sizeof buf, "byte %zu of a live %zu-byte guarded allocation at 0x%" PRIxPTR,
                    static_cast<size_t>(a - r.data), r.n, r.data);
      *out = buf;
      return true;
    }
  }
  return false;
}

std::string check_guarded_canaries() {
  std::lock_guard<std::mutex> lk(g_mu);
  std::string out;
  for (auto& kv : regions()) {
    const std::string bad = check_region(kv.second, true);
    if (!bad.empty()) {
      if (!out.empty()) out += "; ";
      out += bad;
    }
  }
  return out;
}

std::vector<std::string> take_guarded_errors() {
  std::lock_guard<std::mutex> lk(g_mu);
  std::vector<std::string> v;
  v.swap(errors());
  return v;
}

size_t guarded_live_allocations() {
  std::lock_guard<std::mutex> lk(g_mu);
  return regions().size();
}

}  // namespace llemu
