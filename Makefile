# The two-command quickstart: `make demo` and `make test`. Both create .venv when it is missing and install the
# project with constraints.txt, which pins the local CPU wheel of torch (no multi-GB CUDA download).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-long lint bench setup

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch setuptools ninja
	$(PY) -m pip install -q --no-build-isolation -c constraints.txt -e '.[test]'
	touch $@

demo: $(STAMP)
	$(PY) -m swarmgrad.demo

test: $(STAMP)
	$(PY) -m pytest -q

test-long: $(STAMP)
	$(PY) -m pytest -q -m long

lint: $(STAMP)
	$(VENV)/bin/ruff check swarmgrad p2p gossip training consensus sim testing tests benchmarks setup.py
	$(VENV)/bin/ruff format --check swarmgrad p2p gossip training consensus sim testing tests benchmarks setup.py
	$(VENV)/bin/mypy swarmgrad p2p gossip training consensus sim testing
	$(VENV)/bin/lint-imports

bench: $(STAMP)
	@for b in benchmarks/*.py; do echo "== $$b" >&2; $(PY) $$b || exit 1; done
