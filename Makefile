# vblk: the two commands a newcomer needs are `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test venv tools lint typecheck pytest bench clean

# The request path mypyc compiles (pyproject.toml [tool.vblk] compiled, setup.py).
COMPILED := $(shell sed -n '/^compiled = \[/,/^\]/p' pyproject.toml | grep -o '[a-z_/]*\.py')
STAMP := $(VENV)/.compiled

# pip builds the package in place (editable), compiling the request path unless VBLK_COMPILE=0.
$(BIN)/vblk: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@ $(STAMP)

# Recompiled in place when a compiled module's source changes.
$(STAMP): $(BIN)/vblk $(COMPILED)
	$(BIN)/python setup.py -q build_ext --inplace
	touch $@

venv: $(BIN)/vblk $(STAMP)

run: venv
	$(BIN)/vblk serve $(ARGS)

tools:
	@bash scripts/install-tools.sh

typecheck: venv
	$(BIN)/mypy

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

pytest: venv
	$(BIN)/pytest $(PYTEST_ARGS)

test: tools venv typecheck lint pytest

bench: venv
	$(BIN)/python -m bench.virtio_micro

# vblk vs nbdkit file, qemu-nbd and nbdkit python under fio and nbdcopy (bench/nbd_compare.py).
# Quick run: make bench-nbd ARGS='--size 256M --runs 1 --runtime 3'
.PHONY: bench-nbd
bench-nbd: venv
	$(BIN)/python -m bench.nbd_compare $(ARGS)

clean:
	rm -rf $(VENV) build .mypy_cache .ruff_cache .pytest_cache .hypothesis
	find . -name '*.so' -not -path './.git/*' -delete
