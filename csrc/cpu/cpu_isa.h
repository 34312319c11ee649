// Run-time choice of a CPU kernel's vector path, shared by the kernels that have more than one
// (csrc/cpu/swiglu.cpp, csrc/cpu/quantized_linear.cpp):
//   cpu_has_avx512()      whether this CPU has AVX-512 F/BW/VL/DQ, the set every AVX-512 kernel here is compiled for
//                         (GCC's target pragma or target attributes), checked once;
//   cpu_isa_from_env()    an LLADAPTER_<OP>_ISA variable, validated: the first allowed value when unset or empty, an
//                         error naming the variable and the allowed values for anything else;
//   cpu_isa_unavailable() the error for a path that was asked for but that this build or CPU cannot run;
//   dispatch_float_types() the switch from a tensor's dtype to double / float / at::BFloat16 / at::Half.
// Builds for x86-64 AVX2 (setup.py cpu_isa) also run on CPUs without AVX-512 (AMD EPYC before Zen 4, say), so no
// AVX-512 code may run before cpu_has_avx512() says yes.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdlib>
#include <initializer_list>
#include <sstream>
#include <string_view>

namespace lladapter::cpu {

// Whether the CPU running this has AVX-512 F, BW, VL and DQ (false off x86-64, and for compilers without
// __builtin_cpu_supports). Checked at the first call, then cached.
inline bool cpu_has_avx512() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool has = [] {
    __builtin_cpu_init();  // (libgcc runs it at load; harmless again, and needed if this ever runs from a constructor)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }();
  return has;
#else
  return false;
#endif
}

// The value of the environment variable var, one of allowed: the first allowed value (the default, e.g. "auto") when
// var is unset or empty; any other value is an error: "<var> must be a, b or c, got '<value>'". The returned view
// points at the matching element of allowed (string literals: it stays valid). Reads the environment on every call;
// a caller that wants the value read once keeps it in a static.
inline std::string_view cpu_isa_from_env(const char* var, std::initializer_list<std::string_view> allowed) {
  TORCH_INTERNAL_ASSERT(allowed.size() > 0, "cpu_isa_from_env: no allowed values for ", var);
  const char* env = std::getenv(var);
  if (env == nullptr || env[0] == '\0') return *allowed.begin();
  const std::string_view want(env);
  for (std::string_view a : allowed)
    if (a == want) return a;
  std::ostringstream names;
  size_t i = 0;
  for (std::string_view a : allowed) {
    names << (i == 0 ? "" : i + 1 == allowed.size() ? " or " : ", ") << a;
    ++i;
  }
  TORCH_CHECK(false, var, " must be ", names.str(), ", got '", want, "'");
}

// The error for a path that var asked for but that cannot run here: "<var>=<path>, but <why>".
[[noreturn]] inline void cpu_isa_unavailable(const char* var, std::string_view path, std::string_view why) {
  TORCH_CHECK(false, var, "=", path, ", but ", why);
}

// The usual two-path choice: var is auto (default) | avx512 | <fallback>. Whether this call takes the AVX-512 path:
// auto where compiled_in and the CPU has it; avx512 where it cannot run is an error that says why (not_built: why
// when compiled_in is false).
inline bool cpu_use_avx512(const char* var, std::string_view fallback, bool compiled_in,
                           std::string_view not_built = "this build has no AVX-512 path") {
  const std::string_view want = cpu_isa_from_env(var, {"auto", "avx512", fallback});
  if (want == fallback) return false;
  const bool can = compiled_in && cpu_has_avx512();
  if (want == "auto") return can;
  if (!can) cpu_isa_unavailable(var, want, compiled_in ? "this CPU lacks AVX-512 (F, BW, VL and DQ)" : not_built);
  return true;
}

// Calls f.template operator()<scalar_t>() with scalar_t the C++ type of dtype t: double (unless kWithDouble is
// false), float, at::BFloat16 or at::Half. Other dtypes are an error: "<op>: unsupported <what> <t>".
template <bool kWithDouble = true, typename F>
void dispatch_float_types(const char* op, c10::ScalarType t, F&& f, const char* what = "dtype") {
  switch (t) {
    case c10::ScalarType::Double:
      if constexpr (kWithDouble) return f.template operator()<double>();
      break;
    case c10::ScalarType::Float:
      return f.template operator()<float>();
    case c10::ScalarType::BFloat16:
      return f.template operator()<c10::BFloat16>();
    case c10::ScalarType::Half:
      return f.template operator()<c10::Half>();
    default:
      break;
  }
  TORCH_CHECK(false, op, ": unsupported ", what, " ", t);
}

}  // namespace lladapter::cpu
