# facetron operator entry points. The two README commands are
#   make demo   (setup + main job end to end on the embedded default)
#   make test   (setup + the test suite, which starts a real tritonserver)
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test test-all serve lint duplicates clean

setup:
	@./scripts/setup.sh

demo: setup
	$(VENV)/bin/facetron demo

test: setup
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

# includes the slow-marked tests (minutes)
test-all: setup
	$(VENV)/bin/pytest -q -m "slow or not slow" $(PYTEST_ARGS)

serve: setup
	$(VENV)/bin/facetron serve

duplicates:
	duplicates facetron training export client benchmarks tests

clean:
	rm -rf build outputs .pytest_cache
