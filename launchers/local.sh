#!/usr/bin/env bash
# Run a recipe on this machine with torchrun.
#   launchers/local.sh RECIPE.yaml [PROCS] [key=value ...]
# PROCS defaults to the number of GPUs (1 without a GPU). Uses the project's .venv when present.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
recipe="$1"; shift
procs="${1:-}"
if [[ "$procs" =~ ^[0-9]+$ ]]; then shift; else procs=$(nvidia-smi -L 2>/dev/null | wc -l || true); fi
[[ "${procs:-0}" -ge 1 ]] || procs=1
python="${here}/.venv/bin/python"; [[ -x "$python" ]] || python=python3
if [[ "$procs" -gt 1 ]] && ! command -v nvidia-smi >/dev/null 2>&1; then
  cores=$(getconf _NPROCESSORS_ONLN)
  export OMP_NUM_THREADS=$(( cores / procs > 0 ? cores / procs : 1 ))
fi
exec "$python" -m torch.distributed.run --standalone --nproc-per-node="$procs" -m nemo_minitron run "$recipe" "$@"
