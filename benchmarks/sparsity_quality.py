#!/usr/bin/env python3
"""2:4 sparsity by magnitude, Wanda and SparseGPT, ours and ModelOpt 0.47's side by side:
held-out loss right after, and after a short distillation; SparseGPT's calibration time
against one importance pass.

Two dense models: SmolLM2-135M, and its 84.4M width-pruned student (structured + 2:4).
Each is made 2:4 sparse on every decoder linear layer by each method from the same
calibration samples of builtin:calib, then scored on the same held-out samples of
builtin:heldout; the best method's sparse model is distilled from SmolLM2-135M (the masks
kept) and scored again. ModelOpt's ``modelopt.torch.sparsity`` (``sparse_magnitude``,
``sparsegpt``; it has no Wanda) runs on the same megatron-core GPTModel, loaded from the
same checkpoint in the same dtype, with a forward loop over the same calibration
micro-batches (benchmarks/modelopt_adapter.py); its result is saved as our sparse
checkpoint (weights and masks), so the same scorer and the same distillation apply.
To tell method from implementation, our SparseGPT also runs with ModelOpt's settings
(one pass of the dense model; damping 0.1 instead of our 0.01), and the masks of each
ModelOpt row are compared with ours computed the same way."""

from __future__ import annotations

import time
from pathlib import Path

from common import CACHE, parser, width_pruned_pair, write_results

METHODS = ["magnitude", "wanda", "sparsegpt"]
MODELOPT_METHODS = ["magnitude", "sparsegpt"]
#: our SparseGPT with settings of ModelOpt's: name -> (sequential, damp)
VARIANTS = {"sparsegpt-onepass": (False, 0.01), "sparsegpt-onepass-damp0.1": (False, 0.1)}
#: the row of ours each ModelOpt method is computed like (its masks are compared with it)
MODELOPT_TWIN = {"magnitude": "magnitude", "sparsegpt": "sparsegpt-onepass-damp0.1"}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-samples", type=int, default=32)
    p.add_argument("--distill-steps", type=int, default=20)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--no-modelopt", action="store_true", help="our rows only")
    p.add_argument("--out", default=str(CACHE / "sparsity_quality"))
    args = p.parse_args()

    from nemo_minitron.checkpoint.store import is_checkpoint, load_checkpoint, read_info
    from nemo_minitron.distill.api import distill
    from nemo_minitron.evaluate import evaluate
    from nemo_minitron.importance.api import compute_importance
    from nemo_minitron.sparsity.api import sparsify

    dtype, teacher, student, out, heldout = width_pruned_pair(args)
    size = f"{args.calib_samples}x{args.seq_len}"

    def loss(path: Path) -> float:
        model, info = load_checkpoint(path, dtype=dtype.torch)
        return evaluate(model, info.description.vocab_size, heldout, micro_batch=8).loss

    def distilled(sparse: Path) -> float:
        trained = sparse.parent / f"{sparse.name.removesuffix('-' + size)}-distilled-{args.distill_steps}"
        if not (trained / "summary.json").is_file():
            distill(str(teacher), str(sparse), ["builtin:train"], str(trained), eval_data=["builtin:heldout"],
                    steps=args.distill_steps, global_batch=8, micro_batch=8, seq_len=128, lr=3e-4, min_lr=3e-5,
                    warmup_steps=max(1, args.distill_steps // 10), eval_samples=16, dtype=dtype.name)
        return loss(trained / "final")

    calib = dict(samples=args.calib_samples, seq_len=args.seq_len, micro_batch=8, dtype=dtype.name)
    rows, seconds, agreement, beyond, ties = [], {}, {}, {}, {}
    for name, dense in (("SmolLM2-135M", teacher), ("84.4M width-pruned", student)):
        row = {"model": name, "by": "ours", "dense": loss(dense)}
        ours = {}
        for method, (sequential, damp) in [(m, (True, 0.01)) for m in METHODS] + list(VARIANTS.items()):
            path = ours[method] = out / f"{dense.name}-2of4-{method}-{size}"
            if not is_checkpoint(path):
                start = time.time()
                sparsify(str(dense), str(path), None if method == "magnitude" else ["builtin:calib"], pattern="2:4",
                         method=method.split("-")[0], progress=False, sequential=sequential, damp=damp, **calib)
                seconds[f"{name} {method}"] = time.time() - start
            row[method] = loss(path)
        best = min(METHODS, key=lambda m: row[m])
        row.update(best=best, distilled=distilled(ours[best]))
        rows.append(row)
        if args.no_modelopt:
            continue
        row = {"model": name, "by": "ModelOpt 0.47", "dense": rows[-1]["dense"]}
        theirs = {}
        for method in MODELOPT_METHODS:
            path = theirs[method] = out / f"{dense.name}-2of4-modelopt-{method}-{size}"
            if not is_checkpoint(path):
                seconds[f"{name} ModelOpt {method}"] = modelopt_sparsify(dense, path, method, args, dtype)
            row[method] = loss(path)
            over = [z - 0.5 for z in read_info(path).provenance["sparsity"]["weights"].values() if z > 0.5]
            if over:
                beyond[f"{name} {method}"] = (len(over), max(over))
            agreement[f"{name} {method}"] = mask_agreement(path, ours[MODELOPT_TWIN[method]])
            if method == "magnitude":
                ties[name] = differing_groups(dense, path, ours["magnitude"], dtype)
        best = min(MODELOPT_METHODS, key=lambda m: row[m])
        row.update(best=best, distilled=distilled(theirs[best]))
        rows.append(row)
    start = time.time()
    compute_importance(str(teacher), ["builtin:calib"], str(out / f"importance-{time.time_ns()}"),
                       samples=args.calib_samples, seq_len=args.seq_len, micro_batch=8, layer_samples=1,
                       drop_blocks=[], greedy_layers=False, dtype=dtype.name, progress=False)
    importance_seconds = time.time() - start

    cell = lambda r, m: f"{r[m]:.3f}" if m in r else "-"  # noqa: E731
    table = ["| model | by | dense | magnitude | Wanda | SparseGPT | best, after distillation |",
             "|---|---|---|---|---|---|---|"]
    table += [f"| {r['model']} | {r['by']} | {r['dense']:.3f} | {cell(r, 'magnitude')} | {cell(r, 'wanda')} | "
              f"{cell(r, 'sparsegpt')} | {r['best']}: **{r['distilled']:.3f}** |" for r in rows]
    table += ["", "| model | SparseGPT by | sequential, damp 0.01 | one pass, damp 0.01 | one pass, damp 0.1 |",
              "|---|---|---|---|---|"]
    table += [f"| {r['model']} | {r['by']} | {r['sparsegpt']:.3f} | {r['sparsegpt-onepass']:.3f} | "
              f"{r['sparsegpt-onepass-damp0.1']:.3f} |" if r["by"] == "ours" else
              f"| {r['model']} | {r['by']} (weights not updated) | - | - | {r['sparsegpt']:.3f} |" for r in rows]
    note = (f"2:4 on every decoder linear layer; calibration {args.calib_samples} x {args.seq_len} tokens of "
            f"builtin:calib; held-out loss on {heldout[:, 1:].numel():,} tokens of builtin:heldout; distillation "
            f"{args.distill_steps} steps x 8 x 128 tokens from SmolLM2-135M, masks kept; {dtype.name}. Seconds: "
            + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())
            + f"; one importance pass on the same samples (no layer drops) {importance_seconds:.0f}."
            + (" ModelOpt's masks equal to ours computed the same way (magnitude: our magnitude; sparsegpt: ours "
               "in one pass, damp 0.1): " + ", ".join(f"{k} {v:.4%}" for k, v in agreement.items()) + "."
               if agreement else "")
            + "".join(f" {k} magnitude: {d:.1%} of the groups of four differ, all of them groups whose 2nd and 3rd "
                      f"largest |w| are equal ({t:.1%} of all groups have such a tie) and which the two break "
                      "differently." if u == 0 else f" {k} magnitude: {u} differing groups without a tie!"
                      for k, (d, t, u) in ties.items())
            + "".join(f" {k}: {n} weights more than half zero (kept weights that its update made exactly zero "
                      f"are masked too), by up to {x:.1e}." for k, (n, x) in beyond.items()))
    (out / "sparsity_quality.md").write_text("\n".join(table) + "\n\n" + note + "\n")
    print("\n".join(table) + "\n\n" + note)
    write_results(args, {"benchmark": "sparsity_quality", "rows": rows, "seconds": seconds,
                         "importance_seconds": importance_seconds, "mask_agreement": agreement,
                         "magnitude_ties": ties, "beyond_2of4": beyond, "note": note})


def modelopt_sparsify(dense: Path, path: Path, method: str, args, dtype) -> float:
    """``dense`` made 2:4 sparse by ModelOpt's ``method`` on our calibration samples, saved
    at ``path`` as our sparse checkpoint; returns ModelOpt's seconds."""
    import modelopt_adapter
    import torch

    from nemo_minitron.checkpoint.store import (CheckpointInfo, dtype_name, load_checkpoint, load_tokenizer,
                                                save_checkpoint)
    from nemo_minitron.config import DEFAULT_SEED
    from nemo_minitron.data.dataset import check_corpus
    from nemo_minitron.importance.api import calibration_samples, hooks_only_step
    from nemo_minitron.model.forward import run_forward_only, split_microbatches
    from nemo_minitron.model.params import named_weights
    from nemo_minitron.runtime.distributed import layout
    from nemo_minitron.runtime.precision import stored_dtype
    from nemo_minitron.sparsity.collect import linear_modules
    from nemo_minitron.sparsity.config import DECODER_MODULES, MODULES
    from nemo_minitron.sparsity.masks import set_mask

    compute = stored_dtype(dtype.name)  # as our sparsify computes: auto keeps the checkpoint's dtype
    model, info = load_checkpoint(dense, dtype=compute)
    desc, tokenizer = info.description, load_tokenizer(dense)
    # what our sparsify calibrates on: the same corpus check, samples, seed and micro-batches
    corpus = check_corpus(["builtin:calib"], vocab_size=desc.vocab_size, tokenizer=tokenizer)
    samples = calibration_samples(corpus, tokenizer, seq_len=args.seq_len, samples=args.calib_samples,
                                  seed=DEFAULT_SEED)
    batches = split_microbatches(samples, 8)

    def forward_loop(m):
        run_forward_only(m, batches, hooks_only_step(layout().device))

    targets = {f"decoder.layers.{i}.{MODULES[m]}" for i in range(desc.num_layers) for m in DECODER_MODULES}
    modules = linear_modules(model, targets)
    assert set(modules) == targets, sorted(targets - set(modules))
    start = time.time()
    masks = modelopt_adapter.sparsify(model, method, forward_loop, modules)
    seconds = time.time() - start
    weights = dict(named_weights(model))  # ModelOpt's export made new parameters: the weights times its masks
    zeros = {}
    for name, mask in masks.items():
        assert torch.equal(weights[name] != 0, mask & (weights[name] != 0)), f"{name}: non-zero where masked"
        set_mask(weights[name], mask)
        zeros[name] = 1.0 - mask.float().mean().item()
        assert mask.reshape(-1, 4).sum(1).le(2).all(), f"{name}: ModelOpt's mask is not 2:4"
    # SparseGPT's mask is ``weight != 0`` after its updates: a kept weight that is zero is masked too
    extra = {n: z - 0.5 for n, z in zeros.items() if z > 0.5}
    if extra:
        print(f"ModelOpt {method}: {len(extra)} weights more than 2:4 sparse, by up to {max(extra.values()):.2e}")
    record = {"pattern": "2:4", "method": f"modelopt-{modelopt_adapter.MODELOPT_VERSION}-{method}",
              "modules": list(DECODER_MODULES), "sparsified_from": str(dense), "data": "builtin:calib",
              "config": {"samples": args.calib_samples, "seq_len": args.seq_len, "micro_batch": 8,
                         "seed": DEFAULT_SEED},
              "weights": {n: round(z, 6) for n, z in sorted(zeros.items())}, "wall_seconds": round(seconds, 1)}
    kept = {k: v for k, v in info.provenance.items() if k != "created"}
    saved_dtype = dtype_name(compute) if compute else info.dtype
    save_checkpoint(model, CheckpointInfo(desc, saved_dtype, {**kept, "sparsity": record}), path, tokenizer=tokenizer)
    return seconds


def mask_agreement(a: Path, b: Path) -> float:
    """Fraction of mask entries equal between two sparse checkpoints of the same model."""
    from nemo_minitron.checkpoint.store import load_checkpoint
    from nemo_minitron.sparsity.masks import masked_parameters

    masks = [{n: m for n, _, m in masked_parameters(load_checkpoint(p)[0])} for p in (a, b)]
    assert masks[0].keys() == masks[1].keys() and masks[0], (sorted(masks[0]), sorted(masks[1]))
    equal = sum(int((masks[0][n] == masks[1][n]).sum()) for n in masks[0])
    return equal / sum(m.numel() for m in masks[0].values())


def differing_groups(dense: Path, a: Path, b: Path, dtype) -> tuple[float, float, int]:
    """Two magnitude 2:4 masks of ``dense`` (its weights in ``dtype``): (fraction of the groups
    of four where they differ, fraction of groups whose 2nd and 3rd largest |w| tie, groups
    that differ without such a tie: where the two rules would disagree on more than a tie)."""
    from nemo_minitron.checkpoint.store import load_checkpoint
    from nemo_minitron.model.params import named_weights
    from nemo_minitron.sparsity.masks import masked_parameters

    weights = dict(named_weights(load_checkpoint(dense, dtype=dtype.torch)[0]))
    masks = [{n: m for n, _, m in masked_parameters(load_checkpoint(p)[0])} for p in (a, b)]
    groups = differ = tied = untied = 0
    for name, mask in masks[0].items():
        top = weights[name].float().abs().reshape(-1, 4).sort(dim=1, descending=True).values
        tie = top[:, 1] == top[:, 2]
        diff = (mask.reshape(-1, 4) != masks[1][name].reshape(-1, 4)).any(1)
        groups, differ, tied, untied = (groups + len(top), differ + int(diff.sum()), tied + int(tie.sum()),
                                        untied + int((diff & ~tie).sum()))
    return differ / groups, tied / groups, untied


if __name__ == "__main__":
    main()
