// GPU probe of the per-lane layout of nvcuda::wmma m16n16k16 fragments, to check the emulator's "sm80" layout
// (csrc/emu/wmma.cpp) on real hardware. Build and run on a GPU machine:
//   nvcc -std=c++17 -arch=sm_90 -o wmma_layout_probe csrc/emu/probe/wmma_layout_probe.cu && ./wmma_layout_probe
// Every matrix element holds its own coordinates (row * 16 + col, exact in fp16, bf16 and fp32); after
// load_matrix_sync each lane writes x[i] for every i, and the host compares the decoded (row, col) with the
// emulator's table. Prints one line per fragment kind / type / layout and "ALL MATCH" or the mismatches.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdio>
#include <cstdlib>

using namespace nvcuda;

template <typename Frag, typename T>
__global__ void probe_ab(const T* m, float* out) {
  Frag f;
  wmma::load_matrix_sync(f, m, 16);
  const int lane = threadIdx.x;
  for (int i = 0; i < f.num_elements; ++i) out[lane * 16 + i] = static_cast<float>(f.x[i]);
}

__global__ void probe_acc(const float* m, float* out, bool col) {
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> f;
  wmma::load_matrix_sync(f, m, 16, col ? wmma::mem_col_major : wmma::mem_row_major);
  const int lane = threadIdx.x;
  for (int i = 0; i < f.num_elements; ++i) out[lane * 16 + i] = f.x[i];
}

// The emulator's sm80 table: kind 0 = A (row m, col k), 1 = B (row k, col n), 2 = accumulator (row m, col n).
static void sm80(int kind, int lane, int i, int* r, int* c) {
  const int g = lane >> 2, t = lane & 3;
  i &= 7;  // half A/B: x[i + 8] duplicates x[i]
  if (kind == 1) {
    *r = 2 * t + (i & 1) + 8 * ((i >> 1) & 1);
    *c = g + 8 * ((i >> 2) & 1);
  } else {
    *r = g + 8 * ((i >> 1) & 1);
    *c = 2 * t + (i & 1) + 8 * ((i >> 2) & 1);
  }
}

#define CHECK(x)                                                                           \
  do {                                                                                     \
    cudaError_t e_ = (x);                                                                  \
    if (e_ != cudaSuccess) {                                                               \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__); \
      std::exit(2);                                                                        \
    }                                                                                      \
  } while (0)

static int g_bad = 0;

// mem_coord(r, c): the matrix coordinate whose value sits at memory position (r, c) as seen by the layout
static void report(const char* what, int kind, int nelem, const float* out) {
  int bad = 0;
  for (int lane = 0; lane < 32; ++lane) {
    for (int i = 0; i < nelem; ++i) {
      const int v = static_cast<int>(out[lane * 16 + i]);
      const int r = v / 16, c = v % 16;
      int er, ec;
      sm80(kind, lane, i, &er, &ec);
      if (r != er || c != ec) {
        if (bad < 8)
          std::printf("  %s lane %d x[%d]: GPU (%d,%d), emulator sm80 (%d,%d)\n", what, lane, i, r, c, er, ec);
        ++bad;
      }
    }
  }
  std::printf("%-40s num_elements %2d: %s (%d mismatches)\n", what, nelem, bad ? "MISMATCH" : "match", bad);
  g_bad += bad;
}

template <typename T>
static void run_type(const char* tname, T (*conv)(float)) {
  // value of element (r, c) of the logical matrix is r * 16 + c; row-major storage puts it at [r * 16 + c],
  // col-major storage at [c * 16 + r]
  T hrow[256], hcol[256];
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 16; ++c) {
      hrow[r * 16 + c] = conv(static_cast<float>(r * 16 + c));
      hcol[c * 16 + r] = conv(static_cast<float>(r * 16 + c));
    }
  }
  T *drow, *dcol;
  float* dout;
  float out[32 * 16];
  CHECK(cudaMalloc(&drow, sizeof hrow));
  CHECK(cudaMalloc(&dcol, sizeof hcol));
  CHECK(cudaMalloc(&dout, sizeof out));
  CHECK(cudaMemcpy(drow, hrow, sizeof hrow, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(dcol, hcol, sizeof hcol, cudaMemcpyHostToDevice));
  char what[128];
#define PROBE(USE, LAYOUT, SRC, KIND)                                   \
  {                                                                     \
    using F = wmma::fragment<wmma::USE, 16, 16, 16, T, wmma::LAYOUT>;   \
    CHECK(cudaMemset(dout, 0xff, sizeof out));                          \
    probe_ab<F, T><<<1, 32>>>(SRC, dout);                               \
    CHECK(cudaGetLastError());                                          \
    CHECK(cudaMemcpy(out, dout, sizeof out, cudaMemcpyDeviceToHost));   \
    std::snprintf(what, sizeof what, "%s %s %s", #USE, tname, #LAYOUT); \
    report(what, KIND, F::num_elements, out);                           \
  }
  PROBE(matrix_a, row_major, drow, 0)
  PROBE(matrix_a, col_major, dcol, 0)
  PROBE(matrix_b, row_major, drow, 1)
  PROBE(matrix_b, col_major, dcol, 1)
#undef PROBE
  CHECK(cudaFree(drow));
  CHECK(cudaFree(dcol));
  CHECK(cudaFree(dout));
}

static __half to_half(float f) { return __float2half(f); }
static __nv_bfloat16 to_bf16(float f) { return __float2bfloat16(f); }

int main() {
  cudaDeviceProp p;
  CHECK(cudaGetDeviceProperties(&p, 0));
  std::printf("device %s, sm_%d%d, %d SMs, sharedMemPerBlockOptin %zu\n", p.name, p.major, p.minor,
              p.multiProcessorCount, p.sharedMemPerBlockOptin);
  run_type<__half>("half", to_half);
  run_type<__nv_bfloat16>("bf16", to_bf16);
  float h[256], hc[256], out[32 * 16];
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 16; ++c) {
      h[r * 16 + c] = static_cast<float>(r * 16 + c);
      hc[c * 16 + r] = static_cast<float>(r * 16 + c);
    }
  }
  float *dm, *dout;
  CHECK(cudaMalloc(&dm, sizeof h));
  CHECK(cudaMalloc(&dout, sizeof out));
  for (int col = 0; col < 2; ++col) {
    CHECK(cudaMemcpy(dm, col ? hc : h, sizeof h, cudaMemcpyHostToDevice));
    probe_acc<<<1, 32>>>(dm, dout, col != 0);
    CHECK(cudaGetLastError());
    CHECK(cudaMemcpy(out, dout, sizeof out, cudaMemcpyDeviceToHost));
    report(col ? "accumulator float mem_col_major" : "accumulator float mem_row_major", 2, 8, out);
  }
  std::printf(g_bad ? "MISMATCHES: %d\n" : "ALL MATCH\n", g_bad);
  return g_bad ? 1 : 0;
}
