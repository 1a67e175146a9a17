# dicomnode: `make run` starts the node on the example config/dicomnode.yaml (SQLite, local
# storage, bundled models), `make test` runs the tests.
# Both install what they need on a fresh Debian machine with Python 3.11.

SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
APT_PACKAGES := dcmtk dicom3tools orthanc postgresql openssl
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
CONFIG ?= config/dicomnode.yaml

.PHONY: run test test-slow lint typecheck check bench system-deps venv db-upgrade clean constraints

# The node: dicomnode with the PostgreSQL driver. Debian's Python makes venvs only with the
# python3.11-venv package; a venv left without pip by an earlier failed attempt is made again.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "dicomnode needs Python 3.11"'
	@$(PYTHON) -c 'import ensurepip' 2>/dev/null || { \
		echo "installing the Debian package python3.11-venv (venv needs it)"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends python3.11-venv; }
	[ -x $(BIN)/pip ] || { rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[postgres]'
	touch $(STAMP)

# The tests and the developer tools (pytest, ruff, mypy, shap, pydicom-data) on top.
$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(TEST_STAMP)

venv: $(TEST_STAMP)

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

db-upgrade: $(STAMP)
	$(BIN)/dicomnode --config $(CONFIG) db upgrade

run: $(STAMP) db-upgrade
	$(BIN)/dicomnode --config $(CONFIG) serve

test: system-deps $(TEST_STAMP)
	$(BIN)/python -m pytest -q

test-slow: system-deps $(TEST_STAMP)
	$(BIN)/python -m pytest -q -m slow

lint: $(TEST_STAMP)
	$(BIN)/ruff check dicomnode tests
	$(BIN)/ruff format --check dicomnode tests

typecheck: $(TEST_STAMP)
	$(BIN)/mypy

check: lint typecheck test

bench: system-deps $(TEST_STAMP)
	$(BIN)/dicomnode bench

# After an upgrade that passed `make check`: record the venv's versions as the tested ones.
constraints: $(TEST_STAMP)
	{ sed -n '/^#/p' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable \
		| grep -viE '^(nvidia-|cuda-|triton==)'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache
