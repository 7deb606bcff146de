# The two commands a new user runs: `make demo` and `make test`. Each bootstraps .venv first.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck migrations-check unit bench clean venv test-deps

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "medcollab needs Python 3.11 or newer")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

demo: venv
	$(BIN)/medcollab demo

lint: venv
	$(BIN)/ruff check src tests bench tools
	$(BIN)/ruff format --check src tests bench tools
	$(BIN)/lint-imports

typecheck: venv
	$(BIN)/mypy

migrations-check: venv
	@tmp=$$(mktemp -d) && trap 'rm -rf $$tmp' EXIT && \
	  $(BIN)/python -m medcollab.migrate check "sqlite:///$$tmp/check.db"

# Debian packages the suite uses: SoftHSM2 (the PKCS#11 tests). Installed when missing and root;
# the tests themselves fail, never skip, if it cannot be had.
test-deps:
	@if [ ! -e /usr/lib/softhsm/libsofthsm2.so ] && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -q softhsm2 >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q softhsm2 >/dev/null 2>&1)) || \
	  echo "warning: could not install softhsm2; the PKCS#11 tests will fail"; \
	fi

unit: venv test-deps
	# Both databases, always: an exported MEDCOLLAB_TEST_DATABASES must not narrow `make test`.
	MEDCOLLAB_TEST_DATABASES=sqlite,postgresql $(BIN)/python -m pytest -q

test: lint typecheck migrations-check unit

bench: venv
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
