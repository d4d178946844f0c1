# Two commands: `make demo` and `make test`. Each creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.clex-installed
QUIET_PIP = $(PY) -m pip install -q --disable-pip-version-check

.PHONY: demo test test-fast lint bench setup clean test-engines

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "setting up $(VENV) (first run only; log in $(VENV)/install.log)"
	@( $(QUIET_PIP) torch==2.13.0 && $(QUIET_PIP) -c constraints.txt -e '.[train,eval,dev,lmeval,trl]' ) > $(VENV)/install.log 2>&1 \
		|| { tail -40 $(VENV)/install.log; exit 1; }
	@touch $(STAMP)

demo: $(STAMP)
	@$(VENV)/bin/clex demo

test: $(STAMP)
	@$(PY) -m pytest

test-fast: $(STAMP)
	@$(PY) -m pytest -m "not slow"

lint: $(STAMP)
	@$(VENV)/bin/ruff check src tests benchmarks engines experiments

bench: $(STAMP)
	@$(PY) benchmarks/overhead.py

# The engines' conformance suite (not part of `make test`): builds .engines/vllm and .engines/llamacpp on first
# use (llama.cpp compiles for 15-30 min on 2 cores), then compares clex, stock transformers, vLLM and llama.cpp
# on a fetched, CLEX-trained SmolLM2 and writes docs/serving.md.
test-engines: $(STAMP)
	@bash engines/setup.sh
	@$(PY) engines/conformance.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
