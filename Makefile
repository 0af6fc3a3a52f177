# Two entry points: `make run` (the main job, offline data) and `make test`.
# Both create .venv and install topoopt into it when missing or when its build files changed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.topoopt-installed

.PHONY: run test bench clean

$(STAMP): pyproject.toml setup.py topoopt/_native/engine.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[all,test,bench]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/topoopt main

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/h0.py

clean:
	rm -rf $(VENV) *.egg-info
