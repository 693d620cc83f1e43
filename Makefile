# Prunery — entry points named in the README.
#   make demo   one command: set up .venv, start the embedded server, prune a digits model end to end
#   make test   one command: set up .venv, run every test tier (engine, API, service)
# Both create .venv at the repository root on first use (torch/torchvision are pinned to
# the builds pip finds on the development machines' disk; see pyproject.toml).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup browser demo test test-fast test-full test-gpu test-engine test-service test-schemathesis lint fmt typecheck contracts check bench bench-engine bench-service clean

setup: $(STAMP)

$(STAMP): pyproject.toml sdk/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ./sdk
	$(PY) -m pip install --quiet -e ".[dev]"
	$(MAKE) browser
	touch $(STAMP)

# The HTML report's browser test drives the OS's Chromium with Playwright (never
# `playwright install`: nothing is downloaded outside the package manager).
browser:
	command -v chromium >/dev/null || ( \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; fi )

demo: $(STAMP)
	$(PY) scripts/demo.py

test: $(STAMP)
	$(PY) -m pytest -q

# The tier to run every few minutes (< 3 min, no Postgres/Redis): every method's mechanism
# once on tiny models (known answers), the job lifecycle on SQLite, the registry, the CLI.
FAST_TESTS := tests/core tests/test_registry.py tests/test_device_placement.py \
	tests/methods/test_known_answers.py tests/robust/test_mechanisms.py tests/learned/test_tas.py \
	tests/learned/test_pruning_from_scratch.py tests/lm/test_flop.py \
	tests/engine/test_engine_known_answers.py tests/engine/test_torch_compat.py \
	tests/engine/test_uneven_cut.py tests/engine/test_accuracy_defaults.py tests/engine/test_sweep.py \
	tests/test_cli_newcomer.py tests/test_ci_output_and_signatures.py
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not service and not gpu and not schemathesis" $(FAST_TESTS)

# Every method over every zoo model (the default runs the method tiers on one model per family).
test-full: $(STAMP)
	PRUNERY_FULL_ZOO=1 $(PY) -m pytest -q

# Every method on CUDA (one zoo model per family); skipped where no GPU is visible.
test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu tests/gpu

test-engine: $(STAMP)
	$(PY) -m pytest -q tests/engine

test-service: $(STAMP)
	$(PY) -m pytest -q tests/api tests/service

# Property-based: 200 generated requests per operation, none may answer 5xx.
test-schemathesis: $(STAMP)
	PRUNERY_SCHEMATHESIS_EXAMPLES=200 $(PY) -m pytest -q -m schemathesis tests/api

# Static checks (CI runs all of them before the tests): lint, one format, import contracts, types.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

fmt: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The layout is the architecture: app/worker/engine/methods/SDK boundaries (pyproject.toml).
contracts: $(STAMP)
	$(VENV)/bin/lint-imports

typecheck: $(STAMP)
	$(VENV)/bin/mypy

check: lint contracts typecheck

bench-engine: $(STAMP)
	$(PY) -m benchmarks.engine

bench-service: $(STAMP)
	$(PY) -m benchmarks.service

bench: bench-engine bench-service

clean:
	rm -rf .prunery .pytest_cache benchmarks/out
