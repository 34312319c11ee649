#!/usr/bin/env bash
# Configure, build and run the CMake/CTest C++ tests against the venv's torch (CPU kernels).
# Usage: scripts/ctest.sh [python]   (default: .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
PREFIX=$($PY -c 'import torch; print(torch.utils.cmake_prefix_path)')
SITE=$($PY -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')
ARGS=(-DCMAKE_PREFIX_PATH="$PREFIX" -DCMAKE_BUILD_TYPE=Release)
LIBS=""
if [ "$($PY -c 'import torch; print(torch.version.cuda is not None)')" = "True" ]; then
  # Torch's CMake config for a CUDA build looks for the toolkit and nvrtc; the pip CUDA libs live in site-packages.
  CUDA_ROOT=${CUDA_HOME:-/usr/local/cuda}
  # without a GPU, Torch's CMake cannot detect archs; name them so it does not try
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}
  CULIB=$(ls -d "$SITE"/nvidia/cu*/lib 2>/dev/null | head -1 || true)
  ARGS+=(-DCUDA_TOOLKIT_ROOT_DIR="$CUDA_ROOT" -DCMAKE_CUDA_COMPILER="$CUDA_ROOT/bin/nvcc")
  if [ -n "$CULIB" ]; then
    NVRTC=$(ls "$CULIB"/libnvrtc.so* 2>/dev/null | head -1 || true)
    [ -n "$NVRTC" ] && ARGS+=(-DCUDA_nvrtc_LIBRARY="$NVRTC")
    LIBS="$CULIB"
  fi
fi
cmake -S . -B cmake-build "${ARGS[@]}" > cmake-build.log 2>&1 || { cat cmake-build.log; exit 1; }
cmake --build cmake-build -j "${MAX_JOBS:-2}" >> cmake-build.log 2>&1 || { tail -50 cmake-build.log; exit 1; }
LD_LIBRARY_PATH="${LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ctest --test-dir cmake-build --output-on-failure
