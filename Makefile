# facetron operator entry points. The two README commands are
#   make demo   (setup + main job end to end on the embedded default)
#   make test   (setup + the test suite, which starts a real tritonserver)
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# facetron's data root (facetron/paths.py; default ~/.local/share/facetron):
# the operator targets keep it in the checkout's build/, as the README says.
# The tests sandbox their own (tests/conftest.py).
OPERATOR_TARGETS := demo serve bench bench-full
$(OPERATOR_TARGETS): export FACETRON_HOME ?= $(CURDIR)/build

.PHONY: setup demo test test-all serve lint duplicates clean bench bench-full

setup:
	@./scripts/setup.sh

demo: setup
	$(VENV)/bin/facetron demo --out outputs/demo

test: setup
	$(VENV)/bin/pytest -q --durations=30 $(PYTEST_ARGS)

# includes the slow-marked tests (minutes)
test-all: setup
	$(VENV)/bin/pytest -q -m "slow or not slow" $(PYTEST_ARGS)

serve: setup
	$(VENV)/bin/facetron serve

# latency benchmarks -> benchmarks/results/<date>-<machine>-all.{json,md,png} (~3-5 min on 2 cores)
BENCH_ARGS ?=
bench: setup
	$(VENV)/bin/facetron bench all $(BENCH_ARGS)

# + SD-1.5 shapes (random weights): ORT vs torch for a few UNet steps (several minutes more)
bench-full: setup
	$(VENV)/bin/facetron bench all --full $(BENCH_ARGS)

duplicates:
	duplicates facetron training export client benchmarks tests

clean:
	rm -rf build outputs .pytest_cache
