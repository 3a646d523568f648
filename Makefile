# keepflow: the two set-up commands. Each installs what it needs first.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# These machines reach only the package registries: nothing else is called.
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.PHONY: demo test install install-test servers clean

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "keepflow needs $(PYTHON)"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
	$(PIP) install -q -e '.[test]' 2>&1 | grep -v "is ignored" || true
	$(PY) -c "import flows.cli, tasks.core.backup, prefect" 
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m flows.demo

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) demo-work .pytest_cache .hypothesis
