// GPU probe of the tensor cores' rounding against the emulator's model (fp32 accumulation of exact products in k
// order): random 16x16 tiles, k = 16 and k = 128 (chained mma_sync), half and bf16. Prints the largest difference
// to the k-ordered fp32 sum, the share of bitwise-equal results, and the largest relative difference to fp64, so that
// emulator-vs-GPU comparisons can pick their tolerances. Not yet run (the device time went to the layout probe).
//   nvcc -std=c++17 -arch=sm_90 -o wmma_numerics_probe csrc/emu/probe/wmma_numerics_probe.cu && ./wmma_numerics_probe
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>

using namespace nvcuda;

// tile t: A is 16 x (16 nk) row-major, B is (16 nk) x 16 row-major, C = A B
template <class T>
__global__ void gemm_tiles(const T* a, const T* b, float* c, int nk) {
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.f);
  for (int k = 0; k < nk; ++k) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
    wmma::load_matrix_sync(fa, a + blockIdx.x * 256 * nk + k * 16, 16 * nk);
    wmma::load_matrix_sync(fb, b + blockIdx.x * 256 * nk + k * 256, 16);
    wmma::mma_sync(acc, fa, fb, acc);
  }
  wmma::store_matrix_sync(c + blockIdx.x * 256, acc, 16, wmma::mem_row_major);
}

template <class T, class ToT, class ToF>
void run(const char* name, ToT to_t, ToF to_f, int nk) {
  const int tiles = 512, n = tiles * 256 * nk;
  T* ha = static_cast<T*>(std::malloc(n * sizeof(T)));
  T* hb = static_cast<T*>(std::malloc(n * sizeof(T)));
  float* hc = static_cast<float*>(std::malloc(tiles * 256 * sizeof(float)));
  std::srand(1);
  for (int i = 0; i < n; ++i) {
    ha[i] = to_t((std::rand() % 20001 - 10000) / 2500.f);
    hb[i] = to_t((std::rand() % 20001 - 10000) / 2500.f);
  }
  T *da, *db;
  float* dc;
  cudaMalloc(&da, n * sizeof(T));
  cudaMalloc(&db, n * sizeof(T));
  cudaMalloc(&dc, tiles * 256 * sizeof(float));
  cudaMemcpy(da, ha, n * sizeof(T), cudaMemcpyHostToDevice);
  cudaMemcpy(db, hb, n * sizeof(T), cudaMemcpyHostToDevice);
  gemm_tiles<T><<<tiles, 32>>>(da, db, dc, nk);
  cudaMemcpy(hc, dc, tiles * 256 * sizeof(float), cudaMemcpyDeviceToHost);
  double max_abs = 0, max_rel64 = 0;
  long equal = 0;
  for (int t = 0; t < tiles; ++t) {
    for (int m = 0; m < 16; ++m) {
      for (int q = 0; q < 16; ++q) {
        float s = 0;
        double exact = 0;
        for (int k = 0; k < 16 * nk; ++k) {
          const float p = to_f(ha[t * 256 * nk + m * 16 * nk + k]) * to_f(hb[t * 256 * nk + k * 16 + q]);
          s += p;
          exact += p;
        }
        const float g = hc[t * 256 + m * 16 + q];
        max_abs = std::fmax(max_abs, std::fabs(g - s));
        max_rel64 = std::fmax(max_rel64, std::fabs(g - exact) / (std::fabs(exact) + 1));
        equal += g == s;
      }
    }
  }
  std::printf("%s k=%d: GPU vs k-ordered fp32: max abs %.3g, %.2f%% bitwise equal; GPU vs fp64: max rel %.3g\n", name,
              16 * nk, max_abs, 100.0 * equal / (tiles * 256), max_rel64);
  cudaFree(da);
  cudaFree(db);
  cudaFree(dc);
  std::free(ha);
  std::free(hb);
  std::free(hc);
}

int main() {
  for (int nk = 1; nk <= 8; nk *= 8) {
    run<__half>("half", [](float f) { return __float2half(f); }, [](__half h) { return __half2float(h); }, nk);
    run<__nv_bfloat16>(
        "bf16", [](float f) { return __float2bfloat16(f); }, [](__nv_bfloat16 h) { return __bfloat162float(h); }, nk);
  }
  std::printf("%s\n", cudaGetErrorString(cudaGetLastError()));
  return 0;
}
