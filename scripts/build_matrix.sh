#!/usr/bin/env bash
# One leg of the build matrix (`make build-matrix`): build the extension, CUDA included, against one torch release
# in a venv of its own, out of tree (build/matrix/torch-VERSION: the in-place build is left alone), then run the
# CPU op tests against that build. No GPU needed: the CUDA code is compiled (for one architecture, to keep it
# short) and linked, not run.
#   scripts/build_matrix.sh VERSION            e.g. 2.11.0 (the GPU machine's torch)
#   scripts/build_matrix.sh VERSION PYTHON     reuse an existing interpreter that has torch==VERSION (no venv)
# Environment: MATRIX_DIR (venvs, default .venv-matrix), MATRIX_ARCH (default 9.0: the GPU machine's H200),
# CUDA_HOME (default /usr/local/cuda), MAX_JOBS (default 2), BASE_PYTHON (creates the venv; default python3),
# MATRIX_TESTS=0 (compile and import only, no op tests).
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:?usage: scripts/build_matrix.sh TORCH_VERSION [PYTHON]}
MATRIX_DIR=${MATRIX_DIR:-.venv-matrix}
ARCH=${MATRIX_ARCH:-9.0}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MAX_JOBS=${MAX_JOBS:-2}
OPS_TESTS="tests/test_rms_norm.py tests/test_rope.py tests/test_gated_prompt_attention.py tests/test_gated_prompt_attention_decode.py"
# what the op tests import besides torch: pytest, and transformers as an oracle (tests/test_rope.py)
DEPS="numpy pytest ninja transformers"
START=$(date +%s)
say() { echo "== [build-matrix torch $VERSION, $(( $(date +%s) - START ))s] $*"; }

if [ -n "${2:-}" ]; then
  PY=$2
else
  VENV="$MATRIX_DIR/torch-$VERSION"
  PY="$VENV/bin/python"
  STAMP="$VENV/.lladapter-deps"
  if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "torch==$VERSION $DEPS" ]; then
    say "venv $VENV: torch==$VERSION $DEPS"
    [ -x "$PY" ] && [ -f "$VENV/pyvenv.cfg" ] || { rm -rf "$VENV"; "${BASE_PYTHON:-python3}" -m venv "$VENV"; }
    # never install into a base interpreter (a half-removed venv's python runs as its base)
    "$PY" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)' || { echo "$PY is not a venv" >&2; exit 1; }
    "$PY" -m pip install -q "torch==$VERSION" $DEPS
    echo "torch==$VERSION $DEPS" > "$STAMP"
  fi
fi

read -r TV TCUDA <<<"$("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda)')"
[ "${TV%%+*}" = "$VERSION" ] || { echo "build-matrix: $PY has torch $TV, not $VERSION" >&2; exit 1; }
[ "$TCUDA" != None ] || { echo "build-matrix: torch $TV is a CPU-only build; the matrix builds CUDA" >&2; exit 1; }

OUT="build/matrix/torch-$VERSION"
mkdir -p "$OUT"
rm -rf "$OUT/lib"  # Python files are copied afresh; the objects in $OUT/temp are reused (ninja)
say "build: CUDA for sm_${ARCH/./}, torch $TV (CUDA $TCUDA), nvcc $("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), MAX_JOBS=$MAX_JOBS"
# the emulator (lladapter_ext._emu) is built and its tests run by `make test`; this leg checks the CUDA build
if ! LLADAPTER_BUILD_CUDA=1 LLADAPTER_BUILD_EMU=0 TORCH_CUDA_ARCH_LIST="$ARCH" "$PY" setup.py build_py --build-lib "$OUT/lib" \
     build_ext --build-lib "$OUT/lib" --build-temp "$OUT/temp" > "$OUT.log" 2>&1; then
  grep -E "error|Error" "$OUT.log" | head -30 >&2 || true
  tail -20 "$OUT.log" >&2
  say "BUILD FAILED (full log: $OUT.log)"
  exit 1
fi
say "built: $(grep -c 'warning' "$OUT.log" || true) warning lines (log: $OUT.log)"

# -P: the source tree (the cwd) is not put on sys.path, so the package comes from $OUT/lib
PYTHONPATH="$PWD/$OUT/lib" "$PY" -P -c 'import lladapter_ext, torch
info = lladapter_ext.build_info()
assert lladapter_ext.__file__.startswith("'"$PWD/$OUT"'"), lladapter_ext.__file__
assert info["with_cuda"], info
print("imported:", info)'
if [ "${MATRIX_TESTS:-1}" = 0 ]; then say "ok (compile and import only: MATRIX_TESTS=0)"; exit 0; fi
say "CPU op tests"
PYTHONPATH="$PWD/$OUT/lib" OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} "$PY" -P -m pytest $OPS_TESTS -q -p no:cacheprovider
say "ok"
