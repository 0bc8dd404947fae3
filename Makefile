# The two README commands: `make serve` and `make test` (plus `make bench`).
# Each target creates .venv if it is missing and (re)installs the package with its dev extras
# only when pyproject.toml is newer than the stamp .venv/.installed.
# Tools are called as .venv/bin/...: .venv/bin is never put on PATH, because pynetdicom installs
# look-alike storescu/echoscu scripts there that would shadow dcmtk's.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= deploy/config.example.toml

.DEFAULT_GOAL := help
.PHONY: help serve test bench

help:
	@echo "make serve   run the receiver with CONFIG=$(CONFIG) (data under ./data, SQLite)"
	@echo "make test    ruff, mypy, then pytest"
	@echo "make bench   ingest benchmark -> benchmarks/results/ingest-steady.json"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/dicom-ai serve --config $(CONFIG)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	mkdir -p benchmarks/results
	$(BIN)/python -m benchmarks.ingest --out benchmarks/results/ingest-steady.json
	$(BIN)/python -m benchmarks.preprocess --rounds 5 --out benchmarks/results/preprocess.json
	$(BIN)/python -m benchmarks.inference --out benchmarks/results/inference.json
	$(BIN)/python -m benchmarks.e2e --out benchmarks/results/e2e.json
	$(BIN)/python -m benchmarks.qr --out benchmarks/results/qr.json
