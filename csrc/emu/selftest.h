// Self-tests of the emulator: small CUDA-style kernels (correct and deliberately broken) run by name.
#pragma once

#include <map>
#include <string>
#include <vector>

namespace llemu {

using SelftestResult = std::map<std::string, std::vector<double>>;

// Runs the named self-test and returns its outputs (named lists of numbers). A broken kernel's KernelError (and
// any std::exception of a failed in-test expectation) propagates. Throws std::invalid_argument for an unknown name.
SelftestResult run_selftest(const std::string& name);
// name -> one-line description
std::map<std::string, std::string> selftest_names();

}  // namespace llemu
