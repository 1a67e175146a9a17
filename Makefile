# dicomnode: `make run` starts the node on the example config/dicomnode.yaml (SQLite, local
# storage, bundled models), `make test` runs the tests.
# Both install what they need on a fresh Debian machine with Python 3.11.

SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
APT_PACKAGES := dcmtk dicom3tools orthanc postgresql
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
CONFIG ?= config/dicomnode.yaml

.PHONY: run test test-slow lint typecheck check bench system-deps venv db-upgrade clean

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "dicomnode needs Python 3.11"'
	[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

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

test: system-deps $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: system-deps $(STAMP)
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check dicomnode tests
	$(BIN)/ruff format --check dicomnode tests

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck test

bench: system-deps $(STAMP)
	$(BIN)/dicomnode bench

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache
