# Two commands set everything up on a fresh machine with Python 3.11:
#   make train   create .venv, install, train the debug_cpu recipe, export the model
#   make test    create .venv, install, run the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Extra pip arguments for torch, e.g. an index holding CPU-only wheels on machines where the default is a CUDA build.
TORCH_PIP_ARGS ?=
RUN_DIR ?= runs/debug_cpu

.PHONY: setup train test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.13.0" $(TORCH_PIP_ARGS)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

train: $(STAMP)
	rm -rf $(RUN_DIR)
	$(VENV)/bin/bmojo-train experiment=debug_cpu hydra.run.dir=$(RUN_DIR)

# pytest exits 5 when it collects no test; that fails here on purpose.
test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf runs multirun outputs .pytest_cache .ruff_cache
