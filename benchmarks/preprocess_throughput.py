#!/usr/bin/env python3
"""`preprocess` throughput in tokens/s with 1 and 2 worker processes.

Input: a JSONL file of the built-in corpus's documents (all splits), repeated to about
``--megabytes`` MB; tokenizer: SmolLM2-135M's (49,152 ids, so uint16 tokens). Runs
alternate between 1 and 2 workers (``--repeats`` each) and the best of each is reported,
with the speed-up. The outputs of both are checked to be byte-identical.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from common import parser, write_results


def main() -> int:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--megabytes", type=float, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--model", default="smollm2-135m", help="whose tokenizer")
    args = p.parse_args()

    from nemo_minitron.data.builtin import SPLITS, builtin_documents
    from nemo_minitron.data.preprocess import preprocess

    work = Path(tempfile.mkdtemp(prefix="preprocess-bench-"))
    try:
        docs = [d for s in SPLITS for d in builtin_documents(s)]
        corpus = work / "corpus.jsonl"
        with open(corpus, "w") as f:
            while f.tell() < args.megabytes * 1e6:
                for d in docs:
                    f.write(json.dumps({"text": d}) + "\n")
        runs: dict[int, list[dict]] = {1: [], 2: []}
        outputs = {}
        for r in range(args.repeats):
            for workers in (1, 2):
                prefix = work / f"out-w{workers}-r{r}"
                runs[workers].append(preprocess([str(corpus)], args.model, str(prefix), workers=workers,
                                                progress=False))
                outputs[workers] = [Path(str(prefix) + s).read_bytes() for s in (".bin", ".idx")]
                for s in (".bin", ".idx"):
                    Path(str(prefix) + s).unlink()
        best = {w: max(runs[w], key=lambda x: x["tokens_per_second"]) for w in runs}
        results = {
            "input_megabytes": round(corpus.stat().st_size / 1e6, 1), "documents": best[1]["documents"],
            "tokens": best[1]["tokens"], "dtype": best[1]["dtype"],
            "tokens_per_second_1_worker": best[1]["tokens_per_second"],
            "tokens_per_second_2_workers": best[2]["tokens_per_second"],
            "speedup_2_workers": round(best[2]["tokens_per_second"] / best[1]["tokens_per_second"], 2),
            "identical_output": outputs[1] == outputs[2],
            "all_runs": {w: [x["tokens_per_second"] for x in runs[w]] for w in runs},
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_results(args, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
