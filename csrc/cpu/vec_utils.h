// Small helpers over at::vec::Vectorized<float> used by the CPU kernels: load any of float/bf16/fp16 as fp32
// lanes, store fp32 lanes back, and round fp32 lanes through a narrower dtype (to reproduce the reference's casts).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <type_traits>

namespace lladapter::cpu {

using fVec = at::vec::Vectorized<float>;
constexpr int64_t kFVecSize = fVec::size();

template <typename T>
inline fVec load_as_float(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return fVec::loadu(p);
  } else if constexpr (std::is_same_v<T, at::BFloat16>) {
    fVec out;
    at::vec::load_fp32_from_bf16(p, out);
    return out;
  } else {
    static_assert(std::is_same_v<T, at::Half>, "load_as_float: unsupported type");
    fVec out;
    at::vec::load_fp32_from_fp16(p, out);
    return out;
  }
}

template <typename T>
inline void store_from_float(T* p, const fVec& v) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(p);
  } else {
    // convert_from_float packs two fp32 vectors into one reduced-precision vector; store only the first half.
    auto packed = at::vec::convert_from_float<T>(v, v);
    packed.store(p, kFVecSize);
  }
}

// Round each lane to T and back, as `x.to(T).float()` does in the reference.
template <typename T>
inline fVec round_through(const fVec& v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    auto packed = at::vec::convert_from_float<T>(v, v);
    auto [lo, hi] = at::vec::convert_to_float<T>(packed);
    (void)hi;
    return lo;
  }
}

// Horizontal sum in a fixed lane order (deterministic for a given build).
inline float hsum(const fVec& v) {
  alignas(64) float lanes[kFVecSize];
  v.store(lanes);
  float s = 0.f;
  for (int64_t i = 0; i < kFVecSize; ++i) s += lanes[i];
  return s;
}

}  // namespace lladapter::cpu
