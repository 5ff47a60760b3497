# The two commands of the README:  `make demo`  and  `make test`.
# Both install what is missing first (scripts/bootstrap.sh); later runs reuse the virtualenv.
STREAMML_VENV ?= $(HOME)/.cache/streamml/venv
export STREAMML_VENV
BIN := $(STREAMML_VENV)/bin

.PHONY: setup demo test lint typecheck pytest

setup:
	@scripts/bootstrap.sh

## demo: the main job, end to end on the embedded default (local Kafka broker + chDB)
demo: setup
	$(BIN)/streamml demo

## test: lint, strict type check, unit and integration tests (real broker + chDB)
test: setup
	$(BIN)/streamml fetch
	$(MAKE) --no-print-directory lint typecheck pytest

lint:
	$(BIN)/ruff check streamml tests bench
	$(BIN)/ruff format --check streamml tests bench

typecheck:
	$(BIN)/mypy

pytest:
	$(BIN)/python -m pytest
