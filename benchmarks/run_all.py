#!/usr/bin/env python3
"""`make bench`: run every benchmark in this folder, one after another, and collect
their JSON results in benchmarks/results/. Each benchmark measures its ratios side by
side in one run; see the script's docstring for what it compares."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results"
#: reduced settings of the benchmarks whose full defaults take hours on a 2-core CPU
QUICK = {"search_cache": ["--steps", "20", "--ranking-steps", "40", "--checkpoints", "10,20", "--repeats", "2"],
         "contrastive_quality": ["--steps", "20", "--seq-len", "128", "--eval-samples", "32", "--task-limit", "64"],
         "per_layer_quality": ["--samples", "16", "--seq-len", "128", "--block-samples", "2", "--eval-samples", "16",
                               "--uniform", "2"],
         "per_layer_distill": ["--quick"],
         # the hybrid benchmarks on a 3-step hybrid (--full: the trained one)
         "hybrid_model": ["--quick"], "hybrid_pruning_quality": ["--quick"], "hybrid_kd_step_time": ["--quick"]}


def main() -> int:
    RESULTS.mkdir(exist_ok=True)
    full = "--full" in sys.argv[1:]
    only = {a for a in sys.argv[1:] if a != "--full"}
    # modules the benchmarks import or run (modelopt_hybrid_prune: in the Python 3.12 environment), not benchmarks
    helpers = {"run_all", "common", "modelopt_adapter", "modelopt_hybrid_prune"}
    scripts = [p for p in sorted(HERE.glob("*.py")) if p.stem not in helpers and (not only or p.stem in only)]
    failed = []
    for script in scripts:
        print(f"== {script.stem}", flush=True)
        start = time.time()
        extra = [] if full else QUICK.get(script.stem, [])
        proc = subprocess.run([sys.executable, str(script), "--json", str(RESULTS / f"{script.stem}.json"), *extra])
        print(f"== {script.stem}: exit {proc.returncode} after {time.time() - start:.0f} s", flush=True)
        if proc.returncode:
            failed.append(script.stem)
    summary = {p.stem: json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))}
    (RESULTS / "all.json").write_text(json.dumps(summary, indent=2))
    if failed:
        print("failed:", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
