"""Worker: generation, log-likelihoods and an lm-eval run of one checkpoint at several
layouts of the same N processes (TP=N, then PP=N, then data parallel N).

    python -m torch.distributed.run --nproc-per-node N inference_layouts.py \
        --checkpoint CKPT --inputs INPUTS.pt --prompts P.jsonl --out DIR

INPUTS.pt holds ``prompts`` (token lists), ``max_new_tokens``, ``pairs`` ((context,
continuation) token lists), ``task`` and ``limit``. DIR receives results.pt (per layout)
and dpN.jsonl (``generate`` of P.jsonl).
"""

import argparse
import os

import common


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--inputs", required=True)
    p.add_argument("--prompts", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    import torch

    from nemo_minitron.checkpoint.api import open_model
    from nemo_minitron.generate.api import generate
    from nemo_minitron.generate.engine import SamplingConfig, TextGenerator
    from nemo_minitron.runtime.distributed import init_distributed, is_rank0
    from nemo_minitron.tasks.api import resolve_tasks, run_tasks
    from nemo_minitron.tasks.lm import MegatronLM

    inputs = torch.load(args.inputs)
    results = {}
    n = int(os.environ["WORLD_SIZE"])  # set by torchrun
    for tp, pp in ((n, 1), (1, n)):
        init_distributed(tp, pp)
        opened = open_model(args.checkpoint)
        gen = TextGenerator(opened.model, opened.description, opened.tokenizer)
        generated = gen.generate(inputs["prompts"], SamplingConfig(max_new_tokens=inputs["max_new_tokens"]))
        lm = MegatronLM(opened.model, opened.description, opened.tokenizer, batch_size=2)
        scores = lm._loglikelihood_tokens([(None, c, x) for c, x in inputs["pairs"]])
        results[f"tp{tp}-pp{pp}"] = {"generated": [g.tokens for g in generated], "loglikelihoods": scores}
        del opened, gen, lm

    init_distributed(1, 1)  # n data-parallel replicas
    opened = open_model(args.checkpoint)
    lm = MegatronLM(opened.model, opened.description, opened.tokenizer, batch_size=4)
    task = run_tasks(lm, resolve_tasks([inputs["task"]]), limit=inputs["limit"])[inputs["task"]]
    results[f"dp{n}-task"] = task.to_dict()
    del opened, lm
    # the file-level API: replicas take turns at batches of 2, rank 0 writes in prompt order
    generate(args.checkpoint, f"{args.out}/dp{n}.jsonl", prompts=args.prompts,
             max_new_tokens=inputs["max_new_tokens"], batch_size=2, progress=False)
    if is_rank0():
        torch.save(results, f"{args.out}/results.pt")


if __name__ == "__main__":
    common.run(main)
