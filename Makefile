# Each target does all of its own set-up (deploy/setup.sh is idempotent).
VENV := .venv
ARGS ?=

.PHONY: setup serve test lint

setup:
	deploy/setup.sh

serve: setup
	$(VENV)/bin/vllm-compaction serve $(ARGS)

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/python -m pytest -q -ra

lint: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
