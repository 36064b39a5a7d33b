# vblk: the two commands a newcomer needs are `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test venv tools lint typecheck pytest bench clean

$(BIN)/vblk: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/vblk

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

test: venv tools typecheck lint pytest

bench: venv
	$(BIN)/python -m bench.virtio_micro

# vblk vs nbdkit file, qemu-nbd and nbdkit python under fio and nbdcopy (bench/nbd_compare.py).
# Quick run: make bench-nbd ARGS='--size 256M --runs 1 --runtime 3'
.PHONY: bench-nbd
bench-nbd: venv
	$(BIN)/python -m bench.nbd_compare $(ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
