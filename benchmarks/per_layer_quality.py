"""Per-layer (Puzzle-style) architectures against the best uniform one at the same size:
SmolLM2-135M pruned to about 100M, 84.5M and 60M parameters, held-out loss right after
pruning (no training), on the built-in held-out split.

- uniform: the planner's first ``--uniform`` candidates for the budget (width first), each
  pruned by importance (layers by loss drop where a candidate drops any); the best by
  held-out loss is the row's "best uniform";
- uniform MLP-only: every layer's MLP cut to the widest width on the planner's grid within
  the budget, hidden size, attention and layers kept (``plan.mlp_only``, what ``search
  --per-layer`` adds): the per-layer space's uniform point, apart from the best uniform;
- per-layer: ``prune --per-layer`` from the same importance run's block-variant scores
  (``importance --block-variants``), the choice minimising summed KL, and summed loss change;
- time: the block-variant scoring against the calibration pass of the same run.
- ``--block-distill-steps N``: the variants are first trained by blockwise local distillation
  (importance --block-distill-steps); the per-layer rows then hold the trained weights.

    nice python benchmarks/per_layer_quality.py --json results/per_layer_quality.json
"""

from __future__ import annotations

import time

from common import CACHE, builtin_samples, parser, smollm2_block_importance, smollm2_checkpoint, write_results

BUDGETS = {"100M": "100M", "84.5M": "84.5M", "60M": "60M"}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=64, help="calibration samples of the importance run")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--block-samples", type=int, default=4, help="samples the block-variant scores use")
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--uniform", type=int, default=3, help="uniform candidates per budget")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--block-distill-steps", type=int, default=0,
                   help="train the variants by blockwise local distillation first (importance --block-distill-steps)")
    p.add_argument("--block-distill-lr", type=float, default=1e-4)
    p.add_argument("--block-distill-samples", type=int, default=16)
    args = p.parse_args()

    from nemo_minitron.checkpoint.store import is_checkpoint, load_checkpoint, load_tokenizer, read_info
    from nemo_minitron.evaluate import evaluate
    from nemo_minitron.importance.scores import ImportanceScores
    from nemo_minitron.prune.api import prune
    from nemo_minitron.prune.plan import mlp_only, plan
    from nemo_minitron.prune.targets import parse_param_count
    from nemo_minitron.runtime.distributed import init_distributed
    from nemo_minitron.runtime.precision import resolve_dtype

    init_distributed(1, 1, 1234)
    teacher = smollm2_checkpoint()
    desc = read_info(teacher).description
    dtype = resolve_dtype(args.dtype).torch
    heldout = builtin_samples("heldout", load_tokenizer(teacher), args.seq_len).take(args.eval_samples)
    distill = {}
    if args.block_distill_steps:
        distill = dict(block_distill_steps=args.block_distill_steps, block_distill_lr=args.block_distill_lr,
                       block_distill_samples=args.block_distill_samples)
    importance = smollm2_block_importance(args.samples, args.seq_len, args.block_samples, args.dtype, **distill)
    summary = ImportanceScores.load(importance).summary

    def loss_of(path) -> float:
        model, info = load_checkpoint(str(path), dtype=dtype)
        return evaluate(model, info.description.vocab_size, heldout, micro_batch=4).loss

    results = {"teacher": {"params": desc.num_parameters(), "heldout_loss": loss_of(teacher)},
               "block_variants": {k: summary["block_variants"][k] for k in
                                  ("query_groups", "ffn", "samples", "tokens", "seconds", "calibration_seconds")},
               "block_distill": {k: v for k, v in summary["block_variants"].get("distill", {}).items()
                                 if k not in ("parent_digests", "nmse")},
               "calibration_tokens": summary["tokens"], "budgets": {}}
    for label, budget in BUDGETS.items():
        rows = {}
        for k, candidate in enumerate(plan(desc, parse_param_count(budget))[:args.uniform]):
            path = CACHE / f"{importance.name}-uniform-{label}-{k}"
            if not is_checkpoint(path):
                prune(str(teacher), str(importance), str(path), target=candidate.target(), layer_metric="loss",
                      refit=False)
            rows[f"uniform {k}"] = {"params": candidate.params, "shape": candidate.target(), "heldout_loss": loss_of(path)}
        planner_rows = list(rows)
        candidate = mlp_only(desc, parse_param_count(budget))
        if candidate is not None:
            path = CACHE / f"{importance.name}-uniform-mlp-only-{label}"
            if not is_checkpoint(path):
                prune(str(teacher), str(importance), str(path), target=candidate.target(), refit=False)
            rows["uniform MLP-only"] = {"params": candidate.params, "shape": candidate.target(),
                                        "heldout_loss": loss_of(path)}
        for metric in ("kl", "loss"):
            path = CACHE / f"{importance.name}-per-layer-{metric}-{label}"
            t0 = time.time()
            if not is_checkpoint(path):
                prune(str(teacher), str(importance), str(path), per_layer=True, target_params=budget, block_score=metric,
                      refit=False)
            new = read_info(path).description
            rows[f"per-layer ({metric})"] = {
                "params": new.num_parameters(), "prune_seconds": round(time.time() - t0, 1),
                "layer_shapes": [[s.num_query_groups, s.ffn_hidden_size] for s in new.layer_shapes],
                "heldout_loss": loss_of(path)}
        best = min((rows[n] for n in planner_rows), key=lambda r: r["heldout_loss"])
        results["budgets"][label] = {"rows": rows, "best_uniform": best["heldout_loss"]}
        print(label, {n: round(r["heldout_loss"], 3) for n, r in rows.items()}, flush=True)
    write_results(args, results)


if __name__ == "__main__":
    main()
