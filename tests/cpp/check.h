// Minimal pass/fail bookkeeping shared by the CTest executables.
#pragma once

#include <cstdio>
#include <string>

namespace lladapter_test {

inline int g_passed = 0, g_failed = 0;

inline void expect(bool ok, const std::string& what) {
  if (ok) {
    ++g_passed;
  } else {
    ++g_failed;
    std::printf("FAILED: %s\n", what.c_str());
  }
}

// Prints the summary line and gives main's exit code.
inline int finish() {
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}

}  // namespace lladapter_test
