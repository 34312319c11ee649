#!/usr/bin/env bash
# The one prepared script for a CUDA machine (no internet): build from source, run the tests (CUDA variants
# included), the GPU benchmarks (kernels and end-to-end vs PEFT/LitGPT), then compute-sanitizer over the CUDA
# tests with the time left. Everything it prints goes to OUT/gpu-check.log; results to OUT/*.json.
# Budget: under 8 minutes on an H100. A failed build stops it at once (exit 2) with the errors on stdout.
#   scripts/gpu_check.sh [OUT]        (default OUT: $OUT if set, else gpu-check-out)
#   PYTHON=...  interpreter to use (default: .venv/bin/python if present, else python3)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu-check-out}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOG="$OUT_DIR/gpu-check.log"
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
step() { echo "== [$(elapsed)s] $*" | tee -a "$LOG"; }
status=0

: > "$LOG"
step "machine"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "no nvidia-smi";
  nvcc --version 2>&1 | tail -1; } >> "$LOG" 2>&1
# The torch this run builds against, on stdout too: the extension is compiled here against whatever torch the
# machine has (2.11 on the GPU machine), and that is the first thing to know when the build fails.
if ! TORCH_DESC=$($PY -c 'import sys, torch; print(f"torch {torch.__version__} (CUDA {torch.version.cuda}, GPU visible: {torch.cuda.is_available()}), Python {sys.version.split()[0]}")' 2>&1); then
  step "NO USABLE TORCH for $PY: $TORCH_DESC"; exit 2
fi
step "building against $TORCH_DESC, $(nvcc --version 2>/dev/null | tail -1 || echo 'no nvcc on PATH')"

# The GPU machine's CXX is a wrapper around a private GCC that has only a static libstdc++: an extension linked by
# it segfaults on the first C++ exception torch raises through it (setup.py refuses such a compiler). The
# machine's system g++ links libstdc++.so.6, as torch does.
cxx_shared_libstdcxx() { f=$("$1" -print-file-name=libstdc++.so 2>/dev/null); [ -n "$f" ] && [ -e "$f" ]; }
if ! cxx_shared_libstdcxx "${CXX:-c++}" && [ -x /usr/bin/g++ ] && cxx_shared_libstdcxx /usr/bin/g++; then
  step "CXX=${CXX:-c++} has no shared libstdc++: building with the system compiler (/usr/bin/g++)"
  export CXX=/usr/bin/g++ CC=/usr/bin/gcc
fi
step "build from source (setup.py build_ext --inplace; log: build.log)"
if ! $PY setup.py build_ext --inplace > "$OUT_DIR/build.log" 2>&1; then
  cat "$OUT_DIR/build.log" >> "$LOG"
  step "BUILD FAILED against $TORCH_DESC: nothing else was run. First errors, then the end of build.log:"
  grep -m 20 -E "error|Error|refus|needs torch" "$OUT_DIR/build.log" | cut -c1-400 | tee -a "$LOG"
  tail -25 "$OUT_DIR/build.log" | cut -c1-400
  exit 2
fi
cat "$OUT_DIR/build.log" >> "$LOG"
# built in place, not installed: benchmarks and their child processes import it from the tree
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Fail fast too when the build does not load, has no CUDA kernels, or crashes when an op raises (an argument
# check's exception must reach Python): every test after this would fail, skip or die.
if ! $PY -c 'import lladapter_ext, torch; i = lladapter_ext.build_info(); print(i); assert i["with_cuda"], "no CUDA kernels compiled in"
try:
    torch.ops.lladapter.rms_norm(torch.ones(2, 3), torch.ones(2), 1e-6)
except RuntimeError as e:
    print("an op error reaches Python:", str(e).splitlines()[0])' >> "$LOG" 2>&1; then
  step "BUILT, BUT lladapter_ext DOES NOT LOAD WITH CUDA KERNELS (or an op's error killed the process): nothing else was run"
  tail -15 "$LOG"
  exit 2
fi
step "built: $(tail -1 "$LOG" | cut -c1-300)"

KERNEL_TESTS="tests/test_rms_norm.py tests/test_rope.py tests/test_gated_prompt_attention.py tests/test_gated_prompt_attention_decode.py tests/test_quantized_linear.py tests/test_swiglu.py"
# the CPU and emulated variants run in every CI; here the GPU's minutes go to the real CUDA ones
step "pytest: the op tests, CUDA variants"
timeout 200 $PY -m pytest $KERNEL_TESTS -q -rs -m "not emu" -k cuda --maxfail=25 --junitxml="$OUT_DIR/pytest-kernels.xml" >> "$LOG" 2>&1 \
  || { status=1; step "kernel tests FAILED"; }
step "pytest: the emulator against the GPU (wmma fragment layouts, every kernel path on identical inputs)"
timeout 90 $PY -m pytest tests/test_emulator_vs_gpu.py -q -rs --junitxml="$OUT_DIR/pytest-emu-vs-gpu.xml" \
  >> "$LOG" 2>&1 || { status=1; step "emulator vs GPU FAILED"; }
step "pytest: every other CUDA test (model, loaders, generation), whatever packages this machine has"
if [ "$(elapsed)" -lt 330 ]; then
  timeout 60 $PY -m pytest tests -q -rs -k cuda -m "not emu" --continue-on-collection-errors \
    --deselect tests/test_rms_norm.py --deselect tests/test_rope.py --deselect tests/test_gated_prompt_attention.py \
    --deselect tests/test_gated_prompt_attention_decode.py --deselect tests/test_emulator_vs_gpu.py \
    --deselect tests/test_quantized_linear.py --deselect tests/test_swiglu.py \
    >> "$LOG" 2>&1 || { status=1; step "other CUDA tests FAILED (collection errors from missing packages count)"; }
else
  step "other CUDA tests skipped: out of time"
fi

# LitGPT for the end-to-end benchmark: the Makefile installs it into .deps (pure Python, travels with the tree)
[ -d .deps/litgpt ] && export PYTHONPATH="$PWD/.deps${PYTHONPATH:+:$PYTHONPATH}"
# Benchmarks before the sanitizer, each bounded (bench_e2e: 4 variants of a LLaMA-7B-shape bf16 model, B 4, T 512).
for b in benchmarks/bench_*.py; do
  [ "$(elapsed)" -lt 400 ] || { step "skipping $b: out of time"; continue; }
  name=$(basename "$b" .py)
  cap=120; extra=""
  [ "$name" = bench_e2e ] && { cap=200; extra="--iters 8 --decode-new 64 --decode-iters 2"; }
  [ "$name" = bench_quant ] && extra="--shapes smollm2-135m"  # TinyLlama's random init on the host is ~20 s a variant
  left=$(( 460 - $(elapsed) )); [ $left -lt $cap ] && cap=$left
  step "$name (limit ${cap}s)"
  timeout $cap $PY "$b" --device cuda --json "$OUT_DIR/$name.json" $extra >> "$LOG" 2>&1 || { status=1; step "$name FAILED"; }
done

if command -v compute-sanitizer >/dev/null 2>&1 && [ "$(elapsed)" -lt 380 ]; then
  step "compute-sanitizer memcheck on the CUDA tests"
  timeout $(( 470 - $(elapsed) )) compute-sanitizer --tool memcheck --error-exitcode 3 \
      $PY -m pytest $KERNEL_TESTS -q -x -k cuda -p no:cacheprovider >> "$LOG" 2>&1
  rc=$?
  [ $rc -eq 124 ] && step "compute-sanitizer: out of time (not a failure)"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && { status=1; step "compute-sanitizer FAILED (rc $rc)"; }
else
  step "compute-sanitizer skipped (not found or out of time)"
fi

step "done, status $status"
exit $status
