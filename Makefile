# Every target creates or reuses .venv and installs what it needs, so each works alone on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | md5sum | cut -c1-12)

.PHONY: run test bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.*"
	$(BIN)/python -m pip install -q -e ".[dev]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# a second `make run` continues runs/default (says it is complete, or resumes it after an interrupt)
run: $(STAMP)
	if [ -f runs/default/config.yaml ]; then $(BIN)/altgrad train --resume runs/default; else $(BIN)/altgrad train; fi

test: $(STAMP)
	WANDB_MODE=disabled HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -n 2 tests

bench: $(STAMP)
	$(BIN)/python bench/quantize.py
	$(BIN)/python bench/diagnostics.py
	$(BIN)/python bench/train_step.py

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) build src/*.egg-info
