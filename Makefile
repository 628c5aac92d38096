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

.PHONY: setup train test test-xla lint clean

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

# The XLA lane (DESIGN §6): the trn1 training loop on torch-xla's CPU device, in an environment of its own
# (torch 2.9 + torch-xla 2.9) cached outside the checkout under a hash of its requirements. A fresh build
# downloads ~4 GB and takes ~6 minutes; later runs reuse it.
XLA_REQUIREMENTS := requirements/xla.txt
XLA_CACHE ?= $(HOME)/.cache/bmojo
XLA_HASH := $(shell $(PYTHON) -c "import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], 'rb').read()).hexdigest()[:12])" $(XLA_REQUIREMENTS))
XLA_VENV := $(XLA_CACHE)/xla-$(XLA_HASH)
XLA_PY := $(XLA_VENV)/bin/python

# No prerequisites: the folder's name changes with the requirements, and file dates of a fresh clone say nothing.
$(XLA_VENV)/.installed:
	rm -rf $(XLA_VENV)
	$(PYTHON) -m venv $(XLA_VENV)
	$(XLA_PY) -m pip install --quiet -r $(XLA_REQUIREMENTS)
	touch $@

# bmojo goes in without its dependencies (the requirements pin them, torch included), on every run: the
# cached environment may last have served another checkout. The xla tests live in tests/test_xla*.py, so
# the lane never imports test modules that need the main environment's optional packages.
test-xla: $(XLA_VENV)/.installed
	$(XLA_PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	PJRT_DEVICE=CPU $(XLA_PY) -m pytest -q -m xla tests/test_xla*.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/shellcheck -x launch/*.sh
	$(VENV)/bin/hadolint Dockerfile

clean:
	rm -rf runs multirun outputs .pytest_cache .ruff_cache
