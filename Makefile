# The two commands a newcomer needs:  `make serve`  and  `make test`.
# Both create .venv on first use: torch first (a CPU machine takes the CPU build), then the package.
PYTHON  ?= python3
VENV    ?= .venv
TORCH   ?= torch==2.13.0
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup serve test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

serve: setup
	$(VENV)/bin/advisor serve --host 127.0.0.1 --port 8000

test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15 tests

bench: setup
	$(PY) -m bench.simulation

clean:
	rm -rf $(VENV) var .pytest_cache
