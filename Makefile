# Two commands: `make demo` (offline demo) and `make test` (the test suite). Each creates .venv and
# installs the package (with its test extras, and the cluster, loggers and diffusion extras their tests use) on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tta-installed

.PHONY: demo test install clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,cluster,loggers,diffusion]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tta demo

test: $(STAMP)
	$(PY) -m pytest -q -ra -n 2 --durations=15

clean:
	rm -rf $(VENV) results
