# meshlm: `make train` runs the main job, `make test` the tests; both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
TRAIN_ARGS ?=
TEST_ARGS ?=

.PHONY: install train test test-all bench lint clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test,tpu]"
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(BIN)/python -m train $(TRAIN_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(TEST_ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest $(TEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench.pipeline
	$(BIN)/python -m bench.moe
	$(BIN)/python -m bench.decode

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs *.egg-info .pytest_cache .ruff_cache
