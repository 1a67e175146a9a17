# dicomnode: `make run` starts the node on the example config/dicomnode.yaml (SQLite, local
# storage, bundled models), `make test` runs the tests.
# Both install what they need on a fresh Debian machine with Python 3.11.

SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
APT_PACKAGES := dcmtk dicom3tools orthanc orthanc-dicomweb postgresql openssl systemd prometheus rsyslog
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
CONFIG ?= config/dicomnode.yaml

.PHONY: run test test-slow lint typecheck check bench system-deps venv db-upgrade clean constraints \
	service-files install-service

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

# The tests in TEST_WORKERS processes (pytest-xdist), each test file in one of them: most of
# the suite waits on peers and sockets, so three share two cores well (`TEST_WORKERS=0`: one).
TEST_WORKERS ?= 3

test: system-deps $(TEST_STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-slow: system-deps $(TEST_STAMP)
	$(BIN)/python -m pytest -q -m slow

# The node as a systemd service (config/systemd/), run from this checkout by the system user
# dicomnode: settings in $(ETC_DIR)/dicomnode.yaml (made once from config/dicomnode.yaml, then
# the administrator's), data in $(STATE_DIR), `dicomnode` in $(ADMIN_BIN) for the admin
# commands. Run as root; the folders can be changed (the tests render into a temporary one).
UNIT_DIR ?= /etc/systemd/system
ETC_DIR ?= /etc/dicomnode
STATE_DIR ?= /var/lib/dicomnode
ADMIN_BIN ?= /usr/local/bin
SERVICE_USER ?= dicomnode
RENDER = sed -e 's|@PREFIX@|$(CURDIR)|g' -e 's|@USER@|$(SERVICE_USER)|g' -e 's|@ETC@|$(ETC_DIR)|g' -e 's|@STATE@|$(STATE_DIR)|g'

service-files:
	mkdir -p $(UNIT_DIR) $(ETC_DIR) $(ADMIN_BIN)
	for unit in dicomnode.service dicomnode-backup.service dicomnode-backup.timer; do \
		$(RENDER) config/systemd/$$unit > $(UNIT_DIR)/$$unit || exit 1; done
	$(RENDER) config/systemd/dicomnode-admin.sh > $(ADMIN_BIN)/dicomnode
	chmod 0755 $(ADMIN_BIN)/dicomnode
	@if [ -e $(ETC_DIR)/dicomnode.yaml ]; then echo "kept $(ETC_DIR)/dicomnode.yaml"; else \
		sed -e 's|^  data_dir: var/data |  data_dir: $(STATE_DIR)/data |' \
			-e 's|"sqlite:///var/dicomnode.db"|"sqlite:///$(STATE_DIR)/dicomnode.db"|' \
			-e 's|^  dir: models |  dir: $(CURDIR)/models |' \
			config/dicomnode.yaml > $(ETC_DIR)/dicomnode.yaml.new \
		&& chmod 0640 $(ETC_DIR)/dicomnode.yaml.new \
		&& mv $(ETC_DIR)/dicomnode.yaml.new $(ETC_DIR)/dicomnode.yaml \
		&& echo "wrote $(ETC_DIR)/dicomnode.yaml"; fi

install-service: $(STAMP)
	id -u $(SERVICE_USER) >/dev/null 2>&1 || useradd --system --user-group \
		--home-dir $(STATE_DIR) --no-create-home --shell /usr/sbin/nologin $(SERVICE_USER)
	runuser -u $(SERVICE_USER) -- $(CURDIR)/$(BIN)/python -c 'import dicomnode' || { echo "the user \
	$(SERVICE_USER) cannot run $(CURDIR)/$(BIN)/python: its Python (see .venv/pyvenv.cfg) must be \
	readable by other users, e.g. Debian's python3.11, not one under /root"; exit 1; }
	$(MAKE) --no-print-directory service-files
	chgrp $(SERVICE_USER) $(ETC_DIR)/dicomnode.yaml
	install -d -o $(SERVICE_USER) -g $(SERVICE_USER) -m 0750 $(STATE_DIR)
	if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "next: edit $(ETC_DIR)/dicomnode.yaml (AE title, node.uid_root, peers), then"
	@echo "      systemctl enable --now dicomnode; journalctl -u dicomnode -f; dicomnode status"
	@echo "      nightly database backups: systemctl enable --now dicomnode-backup.timer"

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
