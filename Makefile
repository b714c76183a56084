# Two entry points for a fresh machine: `make run` and `make test`. Everything else is a building block.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: setup run test lint typecheck unit integration proof clean

$(BIN)/.installed: pyproject.toml setup.py caracald/core/_merkle_native.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

setup: $(BIN)/.installed

# The main job on the embedded default: an embedded PostgreSQL in ~/.local/share/caracal, migrated.
run: setup
	$(BIN)/caracald up

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: setup
	$(BIN)/mypy

# Installs and starts what the integration tests need (redis-server, the Kafka jars), then runs everything.
test: setup lint typecheck
	bash .ci/services.sh
	$(BIN)/pytest -q

# Every load, fault, tamper and hostile-input drill against a distributed deployment on this machine: one table,
# exit 1 when an invariant broke (about 21 minutes; PROOF_ARGS=--quick for about 10).
proof: setup
	bash .ci/services.sh
	$(BIN)/python bench/proof.py $(PROOF_ARGS)

unit: setup
	$(BIN)/pytest -q tests/unit

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
