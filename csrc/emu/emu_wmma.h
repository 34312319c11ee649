// nvcuda::wmma for the emulator (included by emu.h): m16n16k16 with __half / __nv_bfloat16 operands and a float
// accumulator, the subset the kernels use. Fragments hold public x[] with CUDA 13's num_elements (half A/B 16,
// bf16 A/B 8, float accumulator 8). Which matrix element each x[i] of each lane holds is set by the emulator's
// layout knob: the sm_80 layout (docs/emulator.md) or a seeded scrambled one. load/store/mma are warp collectives:
// all 32 lanes must call them at the same site (load/store with the same pointer, ldm and layout).
#pragma once

#include <source_location>
#include <type_traits>

namespace llemu::detail {
enum class FragKind : uint8_t { kA = 0, kB = 1, kC = 2 };
enum class FragElem : uint8_t { kHalf = 0, kBf16 = 1, kF32 = 2 };

template <class T>
constexpr FragElem frag_elem() {
  if constexpr (std::is_same_v<T, __half>) {
    return FragElem::kHalf;
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return FragElem::kBf16;
  } else {
    static_assert(std::is_same_v<T, float>, "wmma: element type must be __half, __nv_bfloat16 or float");
    return FragElem::kF32;
  }
}

// One lane's operands of a wmma collective (they live on the lane's stack while it waits).
struct WmmaOperands {
  FragKind kind;   // load/store: the fragment's kind
  FragElem elem;   // element type of the loaded/stored fragment, or of A/B for mma
  bool col_major;  // load/store: memory layout (matrix_a/b: the fragment's Layout; accumulator: layout_t)
  unsigned num_elements;
  void* frag;           // load: destination fragment x[]; mma: D
  const void* frag_in;  // store: source fragment; mma: A
  const void* frag_b;   // mma: B
  const void* frag_c;   // mma: C
  bool b_col_major;     // mma: B's layout (informational)
  const void* ptr;      // load/store: memory
  unsigned ldm;         // load/store: leading dimension in elements
};
void wmma_collective(WarpOp op, const WmmaOperands& ops, const std::source_location& loc);
}  // namespace llemu::detail

namespace nvcuda {
namespace wmma {

struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};

enum layout_t { mem_row_major, mem_col_major };

template <typename T, int N>
struct __align__(8) llemu_frag_base {
  enum { num_elements = N, num_storage_elements = N };
  typedef T element_type;
  typedef T storage_element_type;
  T x[N];
};

template <typename Use, int m, int n, int k, typename T, typename Layout = void>
class fragment;  // only the specialisations below exist

template <>
class fragment<matrix_a, 16, 16, 16, __half, row_major> : public llemu_frag_base<__half, 16> {};
template <>
class fragment<matrix_a, 16, 16, 16, __half, col_major> : public llemu_frag_base<__half, 16> {};
template <>
class fragment<matrix_b, 16, 16, 16, __half, row_major> : public llemu_frag_base<__half, 16> {};
template <>
class fragment<matrix_b, 16, 16, 16, __half, col_major> : public llemu_frag_base<__half, 16> {};
template <>
class fragment<matrix_a, 16, 16, 16, __nv_bfloat16, row_major> : public llemu_frag_base<__nv_bfloat16, 8> {};
template <>
class fragment<matrix_a, 16, 16, 16, __nv_bfloat16, col_major> : public llemu_frag_base<__nv_bfloat16, 8> {};
template <>
class fragment<matrix_b, 16, 16, 16, __nv_bfloat16, row_major> : public llemu_frag_base<__nv_bfloat16, 8> {};
template <>
class fragment<matrix_b, 16, 16, 16, __nv_bfloat16, col_major> : public llemu_frag_base<__nv_bfloat16, 8> {};
template <>
class fragment<accumulator, 16, 16, 16, float> : public llemu_frag_base<float, 8> {};

template <typename T, int N>
inline void fill_fragment(llemu_frag_base<T, N>& f, const std::type_identity_t<T>& v) {
  for (int i = 0; i < N; ++i) f.x[i] = v;
}

template <typename Use, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& a, const T* p, unsigned ldm,
                             const std::source_location& loc = std::source_location::current()) {
  static_assert(std::is_same_v<Use, matrix_a> || std::is_same_v<Use, matrix_b>,
                "load_matrix_sync of an accumulator takes a layout_t");
  using namespace ::llemu::detail;
  WmmaOperands o{};
  o.kind = std::is_same_v<Use, matrix_a> ? FragKind::kA : FragKind::kB;
  o.elem = frag_elem<T>();
  o.col_major = std::is_same_v<Layout, col_major>;
  o.num_elements = fragment<Use, 16, 16, 16, T, Layout>::num_elements;
  o.frag = a.x;
  o.ptr = p;
  o.ldm = ldm;
  wmma_collective(o.kind == FragKind::kA ? WarpOp::kWmmaLoadA : WarpOp::kWmmaLoadB, o, loc);
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& a, const float* p, unsigned ldm, layout_t layout,
                             const std::source_location& loc = std::source_location::current()) {
  using namespace ::llemu::detail;
  WmmaOperands o{};
  o.kind = FragKind::kC;
  o.elem = FragElem::kF32;
  o.col_major = layout == mem_col_major;
  o.num_elements = 8;
  o.frag = a.x;
  o.ptr = p;
  o.ldm = ldm;
  wmma_collective(WarpOp::kWmmaLoadC, o, loc);
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& a, unsigned ldm,
                              layout_t layout, const std::source_location& loc = std::source_location::current()) {
  using namespace ::llemu::detail;
  WmmaOperands o{};
  o.kind = FragKind::kC;
  o.elem = FragElem::kF32;
  o.col_major = layout == mem_col_major;
  o.num_elements = 8;
  o.frag_in = a.x;
  o.ptr = p;
  o.ldm = ldm;
  wmma_collective(WarpOp::kWmmaStoreC, o, loc);
}

// D = A B + C, fp32 accumulation in k order (each product is exact in fp32).
template <typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c,
                     const std::source_location& loc = std::source_location::current()) {
  using namespace ::llemu::detail;
  WmmaOperands o{};
  o.kind = FragKind::kC;
  o.elem = frag_elem<T>();
  o.col_major = std::is_same_v<LA, col_major>;
  o.b_col_major = std::is_same_v<LB, col_major>;
  o.num_elements = fragment<matrix_a, 16, 16, 16, T, LA>::num_elements;
  o.frag = d.x;
  o.frag_in = a.x;
  o.frag_b = b.x;
  o.frag_c = c.x;
  wmma_collective(WarpOp::kWmmaMma, o, loc);
}

}  // namespace wmma
}  // namespace nvcuda

namespace llemu {
// The (row, col) of the 16x16 tile that element i of `lane`'s fragment holds under the active layout
// (kind: 0 = matrix_a (row m, col k), 1 = matrix_b (row k, col n), 2 = accumulator (row m, col n)); for half A/B,
// x[i + 8] duplicates x[i]. Valid inside and outside kernels; reflects the configuration of the next launch.
void wmma_element_position(int kind, int lane, int i, int* row, int* col);
}  // namespace llemu
