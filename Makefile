# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: demo test lint format install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	bash examples/demo.sh $(BIN)/npr

test: $(STAMP)
	$(BIN)/ruff check npr tests examples
	$(BIN)/ruff format --check npr tests examples
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check npr tests examples

format: $(STAMP)
	$(BIN)/ruff format npr tests examples
	$(BIN)/ruff check --fix npr tests examples

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
