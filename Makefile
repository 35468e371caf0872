# Two commands do all set-up on a fresh machine: `make check` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch 2.13.0 is a CPU wheel that lies on this machine's disk; a plain `torch` requirement on a machine
# without torch would download a multi-GB CUDA build, so it is installed first, and only when missing.
TORCH_VERSION ?= 2.13.0

.PHONY: check test test-slow bench figures install clean gpu-wheels gpu-check

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

check: $(STAMP)
	$(BIN)/w2s-theory check

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" -n 2

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/w2s-theory bench --json bench.json

# A GPU machine lent without network: its Python (GPU_PYTHON_VERSION) has a CUDA build of torch and the
# scientific stack, not the dependencies below. `make gpu-wheels` downloads their x86-64 wheels into .whl/ here;
# copy the checkout with .whl/ there and run `bash experiments/gpu_check.sh` (the CUDA tests and the bench).
GPU_PYTHON_VERSION ?= 3.12
GPU_WHEELS ?= cvxpy==1.9.3 clarabel==0.11.1 highspy==1.16.0 osqp==1.1.3 qdldl==0.1.9.post1 cffi==2.1.1 pycparser==3.12

gpu-wheels: $(STAMP)
	$(BIN)/python -m pip download --no-deps --only-binary=:all: --python-version $(GPU_PYTHON_VERSION) \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)

# The same script on this machine's CPU, with a small bench: checks the script itself, not the GPU.
gpu-check: $(STAMP)
	W2S_PYTHON=$(BIN)/python W2S_WHEELS= W2S_GPU_CHECK_DEVICE=cpu OUT=results/gpu_check_cpu \
		W2S_BENCH_ARGS="--sizes 1,16 --n 200 --m 8 --linear-m 4 --cvxpy-students 1 --lbfgs-students 1 --repeats 1 --practice 16 --practice-loop-students 2" \
		bash experiments/gpu_check.sh

figures: $(STAMP)
	$(BIN)/w2s-theory figures --out figures/

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
