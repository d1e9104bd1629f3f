# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: demo test lint format install clean lock

# constraints.txt pins every other dependency at the versions the README's figures were measured
# with (regenerate: `make lock`); torch is pinned here (CPU build 2.13.0).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	bash examples/demo.sh $(BIN)/npr

test: $(STAMP)
	bash tools/install_browser.sh
	$(BIN)/ruff check npr tests examples
	$(BIN)/ruff format --check npr tests examples
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check npr tests examples

format: $(STAMP)
	$(BIN)/ruff format npr tests examples
	$(BIN)/ruff check --fix npr tests examples

lock: $(STAMP)
	$(BIN)/pip freeze --exclude-editable | grep -v '^torch==' > constraints.txt

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
