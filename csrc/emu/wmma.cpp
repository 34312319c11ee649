// nvcuda::wmma collectives: fragment layouts, load / store / mma for a whole warp (see emu_wmma.h).
#include <cinttypes>
#include <cstring>

#include "emu_internal.h"

namespace llemu::detail {
namespace {

// sm_80 / sm_90 per-lane layout of m16n16k16 fragments: two mma.m16n8k16 fragments (PTX ISA), g = lane >> 2,
// t = lane & 3, i < 8 (half A/B: x[i + 8] duplicates x[i]). Checked on an H200 for half and bf16 A/B (row and col
// major) and the f32 accumulator (csrc/emu/probe/wmma_layout_probe.cu).
void sm80_position(int kind, int lane, int i, int* r, int* c) {
  const int g = lane >> 2, t = lane & 3;
  if (kind == 1) {  // B: row k, col n
    *r = 2 * t + (i & 1) + 8 * ((i >> 1) & 1);
    *c = g + 8 * ((i >> 2) & 1);
  } else {  // A (row m, col k) and C/D (row m, col n)
    *r = g + 8 * ((i >> 1) & 1);
    *c = 2 * t + (i & 1) + 8 * ((i >> 2) & 1);
  }
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  uint32_t bits;
  if (e == 0) {
    if (m == 0) {
      bits = sign;
    } else {  // subnormal: m * 2^-24, exact in fp32
      float f = static_cast<float>(m) * 5.9604644775390625e-8f;
      std::memcpy(&bits, &f, 4);
      bits |= sign;
    }
  } else if (e == 31) {
    bits = sign | 0x7f800000u | (m << 13);
  } else {
    bits = sign | ((e + 112) << 23) | (m << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

size_t elem_size(FragElem e) { return e == FragElem::kF32 ? 4 : 2; }

template <FragElem E>
inline float to_float16(uint16_t h) {
  return E == FragElem::kHalf ? half_to_float(h) : bf16_to_float(h);
}

template <FragElem E>
void gather_ab(Fiber* lanes, const WmmaLayoutTables& T, float (&A)[16][16], float (&B)[16][16]) {
  for (int l = 0; l < 32; ++l) {
    const WmmaOperands& o = *lanes[l].wmma;
    const uint16_t* a = static_cast<const uint16_t*>(o.frag_in);
    const uint16_t* b = static_cast<const uint16_t*>(o.frag_b);
    for (int i = 0; i < 8; ++i) {
      const uint8_t pa = T.pos[0][l][i], pb = T.pos[1][l][i];
      A[pa >> 4][pa & 15] = to_float16<E>(a[i]);
      B[pb >> 4][pb & 15] = to_float16<E>(b[i]);
    }
  }
}

// Moves every lane's 8 (distinct) elements between memory and its fragment; ES: element size in bytes.
template <size_t ES>
void transfer(Fiber* lanes, const WmmaLayoutTables& T, int kind, char* mem, size_t ldm, bool col_major, bool store) {
  for (int l = 0; l < 32; ++l) {
    const WmmaOperands& o = *lanes[l].wmma;
    char* f = static_cast<char*>(store ? const_cast<void*>(o.frag_in) : o.frag);
    const bool dup = o.num_elements == 16;
    for (int i = 0; i < 8; ++i) {
      const uint8_t pos = T.pos[kind][l][i];
      const size_t r = pos >> 4, c = pos & 15;
      char* addr = mem + (col_major ? c * ldm + r : r * ldm + c) * ES;
      if (store) {
        std::memcpy(addr, f + i * ES, ES);
      } else {
        std::memcpy(f + i * ES, addr, ES);
        if (dup) std::memcpy(f + (i + 8) * ES, addr, ES);
      }
    }
  }
}
const char* elem_name(FragElem e) {
  return e == FragElem::kHalf ? "__half" : e == FragElem::kBf16 ? "__nv_bfloat16" : "float";
}

}  // namespace

void build_layout_tables(WmmaLayout layout, uint64_t seed, WmmaLayoutTables* out) {
  for (int kind = 0; kind < 3; ++kind) {
    uint8_t flat[256];
    for (int lane = 0; lane < 32; ++lane) {
      for (int i = 0; i < 8; ++i) {
        int r, c;
        sm80_position(kind, lane, i, &r, &c);
        flat[lane * 8 + i] = static_cast<uint8_t>(r << 4 | c);
      }
    }
    if (layout == WmmaLayout::kScrambled) {
      Rng rng;
      rng.s = seed * 0x9e3779b97f4a7c15ULL + 0x51ed27ULL * static_cast<uint64_t>(kind + 1);
      for (int i = 255; i > 0; --i) std::swap(flat[i], flat[rng.below(static_cast<unsigned>(i + 1))]);
    }
    std::memcpy(out->pos[kind], flat, sizeof flat);
  }
}

void wmma_complete(BlockCtx& b, Fiber* self, unsigned warp, const Group& g) {
  Fiber* lanes = self->worker->fibers.get() + warp * 32;
  const WmmaLayoutTables& T = *b.launch->layout;
  const WmmaOperands& o0 = *lanes[0].wmma;
  const char* name = op_name(g.op);

  if (g.op == WarpOp::kWmmaMma) {
    alignas(16) float A[16][16], B[16][16], D[16][16];
    if (o0.elem == FragElem::kHalf) {
      gather_ab<FragElem::kHalf>(lanes, T, A, B);
    } else {
      gather_ab<FragElem::kBf16>(lanes, T, A, B);
    }
    for (int l = 0; l < 32; ++l) {
      const float* c = static_cast<const float*>(lanes[l].wmma->frag_c);
      for (int i = 0; i < 8; ++i) {
        const uint8_t pc = T.pos[2][l][i];
        D[pc >> 4][pc & 15] = c[i];
      }
    }
    // fp32 accumulation in k order; every product of two halves / bf16 is exact in fp32, so the vector form below
    // gives the same bits as d += a * b element by element
    typedef float v4 __attribute__((vector_size(16)));
    for (int m = 0; m < 16; ++m) {
      v4 acc[4];
      std::memcpy(acc, D[m], sizeof acc);
      for (int k = 0; k < 16; ++k) {
        const float a = A[m][k];
        const v4 av = {a, a, a, a};
        v4 bk[4];
        std::memcpy(bk, B[k], sizeof bk);
        for (int j = 0; j < 4; ++j) acc[j] += av * bk[j];
      }
      std::memcpy(D[m], acc, sizeof acc);
    }
    for (int l = 0; l < 32; ++l) {
      float* d = static_cast<float*>(lanes[l].wmma->frag);
      for (int i = 0; i < 8; ++i) {
        const uint8_t p = T.pos[2][l][i];
        d[i] = D[p >> 4][p & 15];
      }
    }
    return;
  }

  // load / store: every lane passes the same pointer, ldm and layout
  for (int l = 1; l < 32; ++l) {
    const WmmaOperands& o = *lanes[l].wmma;
    if (o.ptr != o0.ptr || o.ldm != o0.ldm || o.col_major != o0.col_major) {
      fail("wmma-args",
           fmt("%s at %s: the lanes pass different arguments (lane 0: ptr %p, ldm %u, %s; lane %d: ptr %p, "
               "ldm %u, %s); all 32 lanes must pass the same pointer, ldm and layout",
               name, site_str(g.site).c_str(), o0.ptr, o0.ldm, o0.col_major ? "col_major" : "row_major", l, o.ptr,
               o.ldm, o.col_major ? "col_major" : "row_major"));
    }
  }
  const size_t es = elem_size(o0.elem);
  const uintptr_t p = reinterpret_cast<uintptr_t>(o0.ptr);
  if (p % 32 != 0) {
    fail("wmma-align", fmt("%s at %s: pointer %p is not 256-bit (32-byte) aligned (it is %zu bytes past a 32-byte "
                           "boundary)",
                           name, site_str(g.site).c_str(), o0.ptr, static_cast<size_t>(p % 32)));
  }
  if ((static_cast<size_t>(o0.ldm) * es) % 16 != 0) {
    fail("wmma-ldm", fmt("%s at %s: ldm %u (%s elements = %zu bytes) is not a multiple of 16 bytes", name,
                         site_str(g.site).c_str(), o0.ldm, elem_name(o0.elem), static_cast<size_t>(o0.ldm) * es));
  }
  if (o0.ldm < 16) {
    warn_site(self->worker, g.site, "wmma-ldm-small", [&] {
      return fmt("%s at %s: ldm %u is smaller than the tile's 16 %s (rows or columns overlap)", name,
                 site_str(g.site).c_str(), o0.ldm, o0.col_major ? "rows" : "columns");
    });
  }
  // PTX ISA, "Matrix Storage for WMMA": the start of each row (or column) must be aligned to the size of the
  // fragment in bytes (per thread: 32 for f16 A/B, 16 for bf16 A/B, 32 for an f32 accumulator).
  const size_t frag_bytes = static_cast<size_t>(o0.num_elements) * es;
  const size_t stride_bytes = static_cast<size_t>(o0.ldm) * es;
  if (stride_bytes % frag_bytes != 0) {
    warn_site(self->worker, g.site, "wmma-row-align", [&] {
      return fmt(
          "%s at %s: ldm %u (%zu bytes): the rows/columns of the tile start only %zu-byte aligned; the PTX ISA "
          "asks each to be aligned to the fragment size (%zu bytes for %s)",
          name, site_str(g.site).c_str(), o0.ldm, stride_bytes,
          static_cast<size_t>(1) << __builtin_ctzll(static_cast<unsigned long long>(stride_bytes)), frag_bytes,
          elem_name(o0.elem));
    });
  }
  const int kind = static_cast<int>(o0.kind);
  const bool store = g.op == WarpOp::kWmmaStoreC;
  char* mem = static_cast<char*>(const_cast<void*>(o0.ptr));
  if (es == 4) {
    transfer<4>(lanes, T, kind, mem, o0.ldm, o0.col_major, store);
  } else {
    transfer<2>(lanes, T, kind, mem, o0.ldm, o0.col_major, store);
  }
}

}  // namespace llemu::detail
