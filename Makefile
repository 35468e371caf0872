# Two commands do all set-up on a fresh machine: `make check` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch 2.13.0 is a CPU wheel that lies on this machine's disk; a plain `torch` requirement on a machine
# without torch would download a multi-GB CUDA build, so it is installed first, and only when missing.
TORCH_VERSION ?= 2.13.0

.PHONY: check test test-slow bench figures install clean

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

figures: $(STAMP)
	$(BIN)/w2s-theory figures --out figures/

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
