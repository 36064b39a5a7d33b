# vblk: the two commands a newcomer needs are `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c

.PHONY: run test venv test-venv tools client-tools lint typecheck pytest bench clean

# The request path mypyc compiles (pyproject.toml [tool.vblk] compiled, setup.py).
COMPILED := $(shell sed -n '/^compiled = \[/,/^\]/p' pyproject.toml | grep -o '[a-z0-9_/]*\.py')
STAMP := $(VENV)/.compiled
INSTALLED := $(VENV)/.installed
TEST_INSTALLED := $(VENV)/.test-installed

$(BIN)/python:
	@echo "vblk: [1/3] creating the virtual environment $(VENV)"
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --progress-bar off --upgrade pip setuptools

# vblk itself, editable, with what it needs to run (aiohttp, uvloop, structlog, prometheus-client)
# and mypy, whose mypyc compiles the request path below. Pure Python here: the compile is its own step.
$(INSTALLED): pyproject.toml setup.py | $(BIN)/python
	@echo "vblk: [2/3] installing vblk and what it needs to run"
	VBLK_COMPILE=0 $(PIP) install --progress-bar off --no-build-isolation --config-settings editable_mode=compat -e . 'mypy>=1.18'
	touch $@

# Compiled in place beside the sources (and again when one of them changes): mypyc translates the
# modules to one C file, gcc compiles it. About two minutes on two cores the first time.
$(STAMP): $(INSTALLED) $(COMPILED)
	@echo "vblk: [3/3] compiling the request path to C with mypyc ($(words $(COMPILED)) modules; about 2 minutes the first time)"
	$(BIN)/python setup.py build_ext --inplace 2>&1 | sed -nE 's/^gcc .* -c ([^ ]+) .*/  cc \1/p; /[Ee]rror|WARNING/p'
	touch $@
	@echo "vblk: ready; the command line is $(BIN)/vblk"

venv: $(STAMP)

$(TEST_INSTALLED): $(INSTALLED) pyproject.toml
	@echo "vblk: installing the test tools (pytest, hypothesis, ruff, the ovirt-imageio client)"
	VBLK_COMPILE=0 $(PIP) install --progress-bar off --no-build-isolation --config-settings editable_mode=compat -e '.[test]'
	touch $@

test-venv: $(STAMP) $(TEST_INSTALLED)

run: venv
	$(BIN)/vblk serve $(ARGS)

# Every client and server the test suite talks to (Debian packages, as root): QEMU, a kernel,
# Ceph, Chromium, Prometheus, ... A few hundred MB.
tools:
	@bash scripts/install-tools.sh all

# Just the clients the README's walk-through uses: nbdinfo/nbdcopy/nbdsh, qemu-img, curl, xxd.
client-tools:
	@bash scripts/install-tools.sh client

typecheck: test-venv
	$(BIN)/mypy

lint: test-venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

pytest: test-venv
	$(BIN)/pytest $(PYTEST_ARGS)

test: tools test-venv typecheck lint pytest

bench: venv
	$(BIN)/python -m bench.virtio_micro $(ARGS)

# vblk vs nbdkit file, qemu-nbd and nbdkit python under fio and nbdcopy (bench/nbd_compare.py).
# Quick run: make bench-nbd ARGS='--size 256M --runs 1 --runtime 3'; revisions: ARGS='--servers vblk,vblk@HEAD~1' (bench/README.md)
.PHONY: bench-nbd
bench-nbd: venv
	$(BIN)/python -m bench.nbd_compare $(ARGS)

clean:
	rm -rf $(VENV) build .mypy_cache .ruff_cache .pytest_cache .hypothesis
	find . -name '*.so' -not -path './.git/*' -delete
