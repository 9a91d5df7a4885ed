#!/usr/bin/env python3
"""Per-layer architectures against the best uniform one after the same distillation
(issue 24's main benchmark): SmolLM2-135M at about 100M, 84.5M and 60M parameters and at a
memory budget (weights + KV cache of 4,096 tokens, bf16), side by side in one run.

Every row of a budget is distilled the same way from the unpruned teacher (``distill``:
--steps x --global-batch sequences x --seq-len tokens of builtin:train, lr --lr cosine to
lr / 10, the same seed and dtype) and scored by distill's own held-out pass before the first
step (right after pruning) and after the last, on the same --eval-samples of builtin:heldout:

    uniform (search's best)  ``search --per-layer`` for the budget: --candidates planner shapes
                             (width, depth and mixed cuts in turn), the uniform MLP-only shape
                             and the per-layer optimum, each pruned, distilled and evaluated;
                             this row is the planner's candidate with the lowest held-out loss
                             after distillation. It is chosen on the reported held-out set:
                             optimistic for uniform, so a per-layer win is conservative
    uniform MLP-only         the search's MLP-only candidate: every layer's MLP cut to the
                             widest width on the planner's grid within the budget, hidden size,
                             attention and layers kept (the per-layer space's uniform point:
                             per-layer against it is the gain of choosing per layer alone)
    ModelOpt 0.47            NVIDIA ModelOpt's mcore_minitron prune (benchmarks/modelopt_adapter.py)
                             to that same shape, calibrated on the importance run's samples; none
                             where the shape cuts K/V groups (ModelOpt cannot)
    uniform + refit          the best uniform candidate that removes MLP neurons or heads (the
                             search's best may cut depth only) by ``prune --refit``, against
                             itself unrefit (``unrefit``: the search's losses of that candidate)
    per-layer (summed KL)    the search's per-layer candidate, ``prune --per-layer``'s choice
    per-layer + refit        ``prune --per-layer --refit``: each narrowed MLP's second linear
                             refit by least squares, the widths chosen by their refit scores
                             (the importance run scores every width refit as well)
    per-layer, block-distilled variants
                             ``prune --per-layer`` from a second importance run whose variants
                             were first trained by blockwise local distillation (importance
                             --block-distill-steps; the choice may differ); none with
                             --block-distill-steps 0

One importance run serves every row: --samples x --seq-len tokens of builtin:calib, the
block variants on the first --block-samples, second moments (for refit), and drop blocks for
every layer count the uniform candidates drop (search's layer metric auto: greedy for a depth
cut, the best contiguous block for a mixed one). The time of the per-layer scoring is set
against one calibration pass over the same samples, timed alone.

Every result is kept under --out (benchmarks/.cache/per_layer_distill) by its settings: the
importance run, each search (resumable itself), pruned student and distillation, so a killed
run continues where it stopped. Writes a markdown table and a PNG there, and the JSON.

    nice python benchmarks/per_layer_distill.py --json benchmarks/results/per_layer_distill.json
    nice python benchmarks/per_layer_distill.py --quick     # make bench's reduced size
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
import time
from pathlib import Path

import modelopt_adapter
from common import CACHE, builtin_samples, parser, save_kept, smollm2_block_importance, smollm2_checkpoint, \
    write_results

MEMORY_CONTEXT = 4096
# The memory budget sits at the 84.5M row's memory: the planner's first 84.5M shape (hidden
# 448, ffn 1024, every layer; what prune --target-params 84.5M makes) needs 250.2 MiB at
# 4,096 tokens in bf16, 90 MiB of it KV cache. Against the 84.5M row, the budget is about the
# same, but a removed attention frees its KV cache (3 MiB at 4,096 tokens) besides its
# weights (1.7 MiB): this is where removing attention pays most.
BUDGETS = {"100M": {"target_params": "100M"}, "84.5M": {"target_params": "84.5M"},
           "60M": {"target_params": "60M"},
           "250MiB @4,096": {"target_memory": "250MiB", "memory_context": MEMORY_CONTEXT}}
UNIFORM, MLP_ONLY, MODELOPT, REFIT = "uniform (search's best)", "uniform MLP-only", "ModelOpt 0.47", "uniform + refit"
PER_LAYER, PER_LAYER_REFIT, PER_LAYER_BLD = ("per-layer (summed KL)", "per-layer + refit",
                                             "per-layer, block-distilled variants")
METHODS = (UNIFORM, MLP_ONLY, MODELOPT, REFIT, PER_LAYER, PER_LAYER_REFIT, PER_LAYER_BLD)
# make bench: minutes, not hours (flags given beside --quick still win)
QUICK = dict(steps=2, global_batch=2, micro_batch=2, seq_len=64, eval_samples=4, samples=8, block_samples=1,
             layer_samples=1, candidates=2, block_distill_steps=1, block_distill_samples=2)


def key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


class Bench:
    def __init__(self, args):
        from nemo_minitron.checkpoint.store import load_tokenizer, read_info

        self.args = args
        self.out = Path(args.out)
        self.teacher = smollm2_checkpoint()
        self.old = read_info(self.teacher).description
        self.tokenizer = load_tokenizer(self.teacher)
        self.train = dict(steps=args.steps, global_batch=args.global_batch, micro_batch=args.micro_batch,
                          seq_len=args.seq_len, lr=args.lr, min_lr=args.lr / 10,
                          warmup_steps=max(1, args.steps // 10), eval_samples=args.eval_samples)
        self.run = dict(seed=args.seed, dtype=args.dtype)
        # distill's held-out samples (builtin:heldout's validation part in the run's seed order)
        self.heldout = builtin_samples("heldout", self.tokenizer, args.seq_len, seed=args.seed).take(
            args.eval_samples)

    # ------------------------------------------------------------------ set-up
    def search_config(self, budget: dict):
        from nemo_minitron.config import build
        from nemo_minitron.search.config import SearchConfig

        # refit False: the search's rows are the plain cut at every budget; refit has rows of its own
        return build(SearchConfig, per_layer=True, per_layer_candidates=1, block_score="kl", refit=False,
                     candidates=self.args.candidates, eval_every=0, **self.train, **budget)

    def importance(self, configs: dict) -> Path:
        """The importance run, prepared for the layers every budget's uniform candidates drop."""
        from nemo_minitron.config import cli_names
        from nemo_minitron.search.candidates import search_candidates
        from nemo_minitron.search.config import SearchConfig

        drops = sorted({self.old.num_layers - c.description.num_layers for cfg in configs.values()
                        for c in search_candidates(self.old, cfg, names=cli_names(SearchConfig))} - {0})
        a = self.args
        return smollm2_block_importance(a.samples, a.seq_len, a.block_samples, a.dtype, layer_samples=a.layer_samples,
                                        drop_blocks=drops, second_moments=True)

    def distilled_variants_importance(self) -> Path | None:
        """The importance run whose block variants are trained first (--block-distill-steps;
        None at 0): only per-layer pruning reads it, so one layer-loss sample suffices."""
        a = self.args
        if not a.block_distill_steps:
            return None
        return smollm2_block_importance(a.samples, a.seq_len, a.block_samples, a.dtype, layer_samples=1,
                                        block_distill_steps=a.block_distill_steps, block_distill_lr=a.block_distill_lr,
                                        block_distill_samples=a.block_distill_samples)

    def calibration_samples(self, importance: Path) -> tuple:
        """The importance run's calibration samples (the same draw) and its micro-batch size."""
        from nemo_minitron.data.dataset import check_corpus
        from nemo_minitron.importance import api
        from nemo_minitron.importance.scores import ImportanceScores

        c = ImportanceScores.load(importance).summary["config"]
        corpus = check_corpus(["builtin:calib"], vocab_size=self.old.vocab_size, tokenizer=self.tokenizer)
        return api.calibration_samples(corpus, self.tokenizer, seq_len=c["seq_len"], samples=c["samples"],
                                       seed=c["seed"]), c["micro_batch"]

    def calibration_pass_seconds(self, importance: Path) -> dict:
        """One importance pass (importance's default hooks) over the run's samples, timed alone."""
        from nemo_minitron.checkpoint.store import load_checkpoint
        from nemo_minitron.importance.api import calibration_pass
        from nemo_minitron.importance.config import ImportanceConfig
        from nemo_minitron.runtime.precision import resolve_dtype

        path = self.out / f"calibration-pass-{importance.name}.json"
        if not path.is_file():
            samples, micro_batch = self.calibration_samples(importance)
            model, _ = load_checkpoint(str(self.teacher), dtype=resolve_dtype(self.args.dtype).torch)
            d = ImportanceConfig()
            start = time.perf_counter()
            calibration_pass(model, samples, micro_batch=micro_batch, seq_agg=d.seq_agg, batch_agg=d.batch_agg,
                             neuron_activation=d.neuron_activation, num_layers=self.old.num_layers,
                             head_score=d.head_score, channel_norms=d.channel_norms, progress=False)
            record = {"seconds": round(time.perf_counter() - start, 1), "tokens": int(samples[:, 1:].numel())}
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(record))
            tmp.replace(path)
        return json.loads(path.read_text())

    # ------------------------------------------------------------------ rows
    def search(self, label: str, cfg, importance: Path) -> dict:
        from nemo_minitron.search.api import search

        name = "search-" + "".join(ch if ch.isalnum() or ch == "." else "_" for ch in label)
        out = self.out / f"{name}-{key([importance.name, cfg.__dict__, self.run])}"
        return search(str(self.teacher), str(importance), ["builtin:train"], str(out), cfg, progress=False,
                      **self.run)

    def distilled(self, cfg, student: Path) -> dict:
        """``student`` distilled as the search distils its candidates (cached by its settings)."""
        from nemo_minitron.distill.api import distill
        from nemo_minitron.distill.checkpointing import latest_checkpoint

        out = self.out / "distill" / f"{student.name}-{key([self.train, self.run])}"
        if not (out / "summary.json").is_file():
            if out.exists() and latest_checkpoint(out) is None:  # killed before its first checkpoint
                shutil.rmtree(out)
            out.parent.mkdir(parents=True, exist_ok=True)
            distill(str(self.teacher), str(student), ["builtin:train"], str(out), cfg.distill_config(),
                    progress=False, **self.run)
        s = json.loads((out / "summary.json").read_text())
        return {"after_pruning": s["student_before"]["heldout_loss"],
                "after_distillation": s["student_after"]["heldout_loss"],
                "teacher_loss": s["teacher_eval"]["heldout_loss"], "train_seconds": s["train_seconds"]}

    def per_layer_student(self, importance: Path, budget: dict, refit: bool = False) -> Path:
        """``prune --per-layer`` (summed KL, as the search's per-layer candidate) under ``budget``."""
        from nemo_minitron.checkpoint.store import is_checkpoint
        from nemo_minitron.prune.api import prune

        path = self.out / "students" / f"per-layer{'-refit' * refit}-{key([importance.name, budget, self.run])}"
        if not is_checkpoint(path):
            prune(str(self.teacher), str(importance), str(path), per_layer=True, block_score="kl", refit=refit,
                  **budget, **self.run)
        return path

    def mlp_only_student(self, importance: Path, cfg) -> Path | None:
        """The search's MLP-only shape pruned as the search prunes it (for a search finished
        before it had that candidate); None when no MLP width fits the budget."""
        from nemo_minitron.checkpoint.store import is_checkpoint
        from nemo_minitron.config import cli_names
        from nemo_minitron.prune.api import prune
        from nemo_minitron.search.candidates import SearchCandidate, mlp_only_candidate
        from nemo_minitron.search.config import SearchConfig

        desc = mlp_only_candidate(self.old, cfg, tp=1, names=cli_names(SearchConfig))
        if desc is None:
            return None
        target = SearchCandidate("", desc, "", "", "").target()
        path = self.out / "students" / f"mlp-only-{key([importance.name, target, self.run])}"
        if not is_checkpoint(path):
            prune(str(self.teacher), str(importance), str(path), target=target, order="importance",
                  layer_metric=cfg.layer_metric, refit=False, **self.run)
        return path

    def refit_student(self, importance: Path, target: dict) -> Path:
        from nemo_minitron.checkpoint.store import is_checkpoint
        from nemo_minitron.prune.api import prune

        path = self.out / "students" / f"refit-{key([importance.name, target, self.run])}"
        if not is_checkpoint(path):
            prune(str(self.teacher), str(importance), str(path), target=target, refit=True, order="importance",
                  layer_metric="auto", **self.run)  # search's prune of a uniform candidate, + refit
        return path

    def modelopt_student(self, importance: Path, new) -> tuple[Path, dict]:
        """ModelOpt's prune to ``new``'s shape, its kept units rebuilt by our code as a checkpoint;
        and ModelOpt's own pruned model's held-out loss (the rebuilt one must match it)."""
        from nemo_minitron.checkpoint.store import is_checkpoint, load_checkpoint
        from nemo_minitron.evaluate import evaluate
        from nemo_minitron.runtime.precision import resolve_dtype

        shape = modelopt_adapter.export_config(self.old, new)
        settings = [modelopt_adapter.MODELOPT_VERSION, importance.name, shape, self.run, len(self.heldout)]
        record_file = self.out / "modelopt" / f"{key(settings)}.json"
        dtype = resolve_dtype(self.args.dtype).torch
        if not record_file.is_file():
            samples, micro_batch = self.calibration_samples(importance)
            model, _ = load_checkpoint(str(self.teacher), dtype=dtype)
            scores = self.out / "modelopt" / f"scores-{key([importance.name, self.run])}"
            scores.parent.mkdir(parents=True, exist_ok=True)
            kept, pruned = modelopt_adapter.prune(model, self.old, new, modelopt_adapter.forward_loop(
                samples, micro_batch), scores)
            params = sum(p.numel() for p in {id(p): p for p in pruned.parameters()}.values())
            assert params == new.num_parameters(), (params, new.num_parameters())
            loss = evaluate(pruned, self.old.vocab_size, self.heldout, micro_batch=4).loss
            tmp = record_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"shape": shape, "kept": kept, "modelopt_loss": loss}))
            tmp.replace(record_file)
            del model, pruned
        record = json.loads(record_file.read_text())
        path = self.out / "students" / f"modelopt-{record_file.stem}"
        if not is_checkpoint(path):
            teacher, _ = load_checkpoint(str(self.teacher), dtype=dtype)
            save_kept(teacher, self.old, new, modelopt_adapter.keep_plan(record["kept"], self.old), path,
                      self.tokenizer, {"modelopt": modelopt_adapter.MODELOPT_VERSION, "shape": record["shape"]})
        return path, record


def memory_bytes(desc) -> int:
    """Weights + KV cache of one sequence of MEMORY_CONTEXT tokens, 2 bytes a value."""
    from nemo_minitron.prune.per_layer import Budget

    return int(Budget("memory", 1, context=MEMORY_CONTEXT).total(desc))


def removes_units(desc, original) -> bool:
    """Whether a uniform shape removes MLP neurons or attention heads (what refit repairs)."""
    return (desc.ffn_hidden_size, desc.num_attention_heads) != (original.ffn_hidden_size,
                                                                original.num_attention_heads)


def describe(desc, original) -> str:
    """A shape in words: a uniform one's widths, a per-layer one's removed blocks and ranges."""
    if not desc.layer_shapes:
        return (f"hidden {desc.hidden_size}, ffn {desc.ffn_hidden_size}, heads {desc.num_attention_heads}/"
                f"{desc.num_query_groups}, {desc.num_layers} layers")
    groups = [s.num_query_groups for s in desc.layer_shapes]
    ffn = [s.ffn_hidden_size for s in desc.layer_shapes]
    kept_groups, kept_ffn = [g for g in groups if g] or [0], [f for f in ffn if f] or [0]
    return (f"per layer: attention removed in {groups.count(0)}, K/V groups {min(kept_groups)}-{max(kept_groups)} "
            f"of {original.num_query_groups}; MLP removed in {ffn.count(0)}, ffn {min(kept_ffn)}-{max(kept_ffn)}")


def main() -> None:
    from nemo_minitron.checkpoint.store import read_info
    from nemo_minitron.config import default_of
    from nemo_minitron.evaluate import evaluate
    from nemo_minitron.importance.scores import ImportanceScores
    from nemo_minitron.model.description import ModelDescription
    from nemo_minitron.runtime.distributed import init_distributed
    from nemo_minitron.search.config import SearchConfig

    p = parser(__doc__.splitlines()[0])
    p.add_argument("--budgets", nargs="+", default=list(BUDGETS), choices=list(BUDGETS))
    p.add_argument("--steps", type=int, default=40, help="distillation steps of every row")
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sample: calibration, training, held-out")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (cosine to lr / 10)")
    p.add_argument("--eval-samples", type=int, default=64, help="held-out samples of builtin:heldout")
    p.add_argument("--samples", type=int, default=64, help="calibration samples of the importance run")
    p.add_argument("--block-samples", type=int, default=4, help="samples the block-variant scores use")
    p.add_argument("--layer-samples", type=int, default=8, help="samples the layer loss drops and greedy use")
    p.add_argument("--candidates", type=int, default=default_of(SearchConfig, "candidates"),
                   help="uniform candidates per search (search's default)")
    p.add_argument("--block-distill-steps", type=int, default=50,
                   help="steps of blockwise local distillation of every variant for the block-distilled per-layer "
                        "row (importance --block-distill-steps; 0: no such row)")
    p.add_argument("--block-distill-lr", type=float, default=1e-4)
    p.add_argument("--block-distill-samples", type=int, default=16)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", default=str(CACHE / "per_layer_distill"), help="cache of every result (resumable)")
    p.add_argument("--quick", action="store_true", help="make bench's reduced size: " +
                   " ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items()))
    if "--quick" in sys.argv[1:]:
        p.set_defaults(**QUICK)
    args = p.parse_args()

    init_distributed(1, 1, args.seed)
    bench = Bench(args)
    bench.out.mkdir(parents=True, exist_ok=True)
    configs = {label: bench.search_config(BUDGETS[label]) for label in args.budgets}
    importance = bench.importance(configs)
    trained_importance = bench.distilled_variants_importance()
    summary = ImportanceScores.load(importance).summary
    blocks = summary["block_variants"]
    calibration = bench.calibration_pass_seconds(importance)
    results: dict = {
        "benchmark": "per_layer_distill", "settings": {**vars(args), "importance": importance.name,
                                                       "trained_importance": getattr(trained_importance, "name", None)},
        "teacher": {"params": bench.old.num_parameters(), "memory_bytes": memory_bytes(bench.old)},
        "timing": {"block_variant_seconds": blocks["seconds"], "block_variant_tokens": blocks["tokens"],
                   "variants": {k: blocks[k] for k in ("query_groups", "ffn")},
                   "calibration_pass_seconds": calibration["seconds"], "calibration_tokens": calibration["tokens"],
                   "per_token_ratio": (blocks["seconds"] / blocks["tokens"]) / (calibration["seconds"]
                                                                                  / calibration["tokens"]),
                   "importance_run_seconds": summary["wall_seconds"]},
        "budgets": {}, "checks": {}}
    for label, cfg in configs.items():
        found = bench.search(label, cfg, importance)
        cands = found["candidates"]
        uniform = sorted((c for c in cands if c["uniform"] and c["kind"] != "mlp-only"),
                         key=lambda c: (c["final_loss"], c["name"]))
        mlp_only = next((c for c in cands if c["kind"] == "mlp-only"), None)
        per_layer = next(c for c in cands if not c["uniform"])
        best = uniform[0]
        new = ModelDescription.from_dict(best["architecture"])

        def from_search(c: dict) -> dict:
            d = ModelDescription.from_dict(c["architecture"])
            return {"candidate": c["name"], "kind": c["kind"], "shape": describe(d, bench.old), "params": c["params"],
                    "memory_bytes": memory_bytes(d), "after_pruning": c["loss_after_pruning"],
                    "after_distillation": c["final_loss"], "layer_shapes": c["layer_shapes"]}

        same_shape = {"candidate": best["name"], "kind": best["kind"], "shape": describe(new, bench.old),
                      "params": new.num_parameters(), "memory_bytes": memory_bytes(new)}
        def distilled_student(path: Path, name: str) -> dict:
            d = read_info(path).description
            return {"candidate": name, "kind": "per-layer" if d.layer_shapes else "mlp-only",
                    "shape": describe(d, bench.old), "params": d.num_parameters(), "memory_bytes": memory_bytes(d),
                    "layer_shapes": [[s.num_query_groups, s.ffn_hidden_size] for s in d.layer_shapes] or None,
                    **bench.distilled(cfg, path)}

        rows = {UNIFORM: from_search(best)}
        if mlp_only is not None:
            rows[MLP_ONLY] = from_search(mlp_only)
        else:  # a search finished before it had this candidate
            path = bench.mlp_only_student(importance, cfg)
            rows[MLP_ONLY] = distilled_student(path, "pruned alone") if path is not None else {
                "shape": "", "skipped": "no MLP width fits the budget"}
        if new.num_query_groups != bench.old.num_query_groups:
            rows[MODELOPT] = {**same_shape, "skipped": "the shape cuts K/V groups: ModelOpt cannot"}
        else:
            student, record = bench.modelopt_student(importance, new)
            rows[MODELOPT] = {**same_shape, **bench.distilled(cfg, student)}
            # ModelOpt's own pruned model and its kept units rebuilt by our code, on the same samples
            results["checks"].setdefault("modelopt_after_pruning", {})[label] = {
                "modelopt": record["modelopt_loss"], "rebuilt": rows[MODELOPT]["after_pruning"]}
        # whether refit's gain survives distillation: the best uniform candidate that removes MLP
        # neurons or heads (refit repairs those; the best may cut depth only), against itself unrefit
        cuts = [c for c in uniform if removes_units(ModelDescription.from_dict(c["architecture"]), bench.old)]
        if not cuts:
            rows[REFIT] = {**same_shape, "skipped": "no candidate removes an MLP neuron or head: nothing to refit"}
        else:
            rows[REFIT] = {**from_search(cuts[0]), **bench.distilled(cfg, bench.refit_student(importance,
                                                                                             cuts[0]["target"])),
                           "unrefit": {"after_pruning": cuts[0]["loss_after_pruning"],
                                       "after_distillation": cuts[0]["final_loss"]}}
        rows[PER_LAYER] = from_search(per_layer)
        # prune --per-layer --refit chooses its MLP widths by their refit scores: its own optimum
        refit_row = distilled_student(bench.per_layer_student(importance, BUDGETS[label], refit=True),
                                      "optimum of the refit scores")
        refit_row["same_shapes_as_per_layer"] = refit_row["layer_shapes"] == [list(s) for s in per_layer["layer_shapes"]]
        rows[PER_LAYER_REFIT] = refit_row
        if trained_importance is not None:
            rows[PER_LAYER_BLD] = distilled_student(bench.per_layer_student(trained_importance, BUDGETS[label]),
                                                    "optimum of the trained variants")
        results["budgets"][label] = {
            "budget": found["budget_text"], "best_uniform": best["name"], "rows": rows,
            "uniform_candidates": {c["name"]: {"kind": c["kind"], "target": c["target"], "params": c["params"],
                                               "after_pruning": c["loss_after_pruning"],
                                               "after_distillation": c["final_loss"]} for c in uniform}}
        print(label, {m: (round(r["after_pruning"], 3), round(r["after_distillation"], 3))
                      for m, r in rows.items() if "skipped" not in r}, flush=True)

    # the teacher on the same held-out samples; each distillation also scored it at its end
    from nemo_minitron.checkpoint.store import load_checkpoint
    from nemo_minitron.runtime.precision import resolve_dtype

    teacher_model, _ = load_checkpoint(str(bench.teacher), dtype=resolve_dtype(args.dtype).torch)
    results["teacher"]["heldout_loss"] = evaluate(teacher_model, bench.old.vocab_size, bench.heldout,
                                                  micro_batch=4).loss
    results["checks"]["teacher_loss_in_distill_runs"] = sorted({
        round(r["teacher_loss"], 6) for b in results["budgets"].values() for r in b["rows"].values()
        if "teacher_loss" in r})
    (bench.out / "per_layer_distill.md").write_text(table(results))
    plot(results, bench.out / "per_layer_distill.png")
    results.update(table=str(bench.out / "per_layer_distill.md"), plot=str(bench.out / "per_layer_distill.png"))
    print(table(results))
    write_results(args, results)


def table(results: dict) -> str:
    s, t = results["settings"], results["teacher"]
    lines = ["| budget | method | shape | parameters | memory at 4,096 tokens | held-out loss after pruning | "
             "after distillation | against the best uniform |", "|---|---|---|---|---|---|---|---|",
             f"| teacher | SmolLM2-135M | | {t['params'] / 1e6:.1f}M | {t['memory_bytes'] / 2**20:.1f} MiB | "
             f"{t['heldout_loss']:.3f} | | |"]
    for label, b in results["budgets"].items():
        base = b["rows"][UNIFORM]["after_distillation"]
        for method, r in b["rows"].items():
            name = f"{method} ({r['candidate']}, {r['kind']})" if method == UNIFORM else method
            if "unrefit" in r:
                name += (f" ({r['candidate']}; unrefit {r['unrefit']['after_pruning']:.3f} -> "
                         f"{r['unrefit']['after_distillation']:.3f})")
            if "skipped" in r:
                lines.append(f"| {label} | {name} | {r['shape']} | | | {r['skipped']} | | |")
                continue
            delta = "" if method == UNIFORM else f"{r['after_distillation'] - base:+.3f}"
            lines.append(f"| {label} | {name} | {r['shape']} | {r['params'] / 1e6:.1f}M | "
                         f"{r['memory_bytes'] / 2**20:.1f} MiB | {r['after_pruning']:.3f} | "
                         f"**{r['after_distillation']:.3f}** | {delta} |")
    tm = results["timing"]
    tokens = s["steps"] * s["global_batch"] * s["seq_len"]
    return "\n".join(lines) + (
        f"\n\nEvery row distilled the same way from the teacher: {s['steps']} steps x {s['global_batch']} x "
        f"{s['seq_len']} tokens ({tokens:,}) of builtin:train, lr {s['lr']:g} cosine to {s['lr'] / 10:g}, seed "
        f"{s['seed']}, {s['dtype']}; held-out loss on {s['eval_samples']} x {s['seq_len']} tokens of builtin:heldout. "
        f"The uniform row is the best of each search's {s['candidates']} planner candidates by the held-out loss "
        "after distillation (chosen on this held-out set). Importance on "
        f"{s['samples']} x {s['seq_len']} tokens of builtin:calib; block variants on {s['block_samples']} samples "
        f"(K/V groups {tm['variants']['query_groups']}, MLP {tm['variants']['ffn']}): "
        f"{tm['block_variant_seconds']:.0f} s "
        f"for {tm['block_variant_tokens']:,} tokens, one calibration pass {tm['calibration_pass_seconds']:.1f} s for "
        f"{tm['calibration_tokens']:,} tokens: {tm['per_token_ratio']:.0f} times its time per token."
        + (f" Block-distilled variants: {s['block_distill_steps']} steps each (lr {s['block_distill_lr']:g}, "
           f"{s['block_distill_samples']} samples), in a second importance run." if s["block_distill_steps"] else "")
        + "\n")


def plot(results: dict, path: Path) -> None:
    from nemo_minitron.runtime.plotting import pyplot, save_figure

    plt = pyplot()
    budgets = list(results["budgets"])
    losses = [r[k] for b in results["budgets"].values() for r in b["rows"].values() if "skipped" not in r
              for k in ("after_pruning", "after_distillation")]
    bottom = max(0.0, math.floor(min(losses + [results["teacher"]["heldout_loss"]])) - 1.0)  # differences show
    fig, axes = plt.subplots(1, len(budgets), figsize=(4.2 * len(budgets) + 1.5, 4.8), sharey=True, squeeze=False)
    colors = ("tab:grey", "tab:brown", "tab:orange", "tab:blue", "tab:green", "tab:olive", "tab:purple")
    for ax, label in zip(axes[0], budgets):
        rows = results["budgets"][label]["rows"]
        value = lambda m, k: rows.get(m, {}).get(k, math.nan)  # noqa: E731  (nan: skipped)
        xs = range(len(METHODS))
        for x, m in zip(xs, METHODS):
            if "skipped" in rows.get(m, {"skipped": True}):
                ax.text(x, bottom + 0.1, "n/a", ha="center", fontsize=8)
        before = ax.bar([x - 0.2 for x in xs], [value(m, "after_pruning") for m in METHODS], 0.4, color=colors,
                        alpha=0.35, hatch="//", label="right after pruning")
        after = ax.bar([x + 0.2 for x in xs], [value(m, "after_distillation") for m in METHODS], 0.4, color=colors,
                       label="after distillation")
        for bars in (before, after):
            ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=1)
        ax.axhline(results["teacher"]["heldout_loss"], color="black", linestyle="--", linewidth=1)
        ax.set_xticks(list(xs), ["uniform", "uniform\nMLP-only", "ModelOpt", "uniform\n+ refit", "per-layer",
                                 "per-layer\n+ refit", "per-layer\nBLD"], fontsize=7)
        budget = results["budgets"][label]["budget"]
        ax.set_title(budget.split(" (")[0] + (f" at {MEMORY_CONTEXT:,} tokens" if "memory" in budget else ""),
                     fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylim(bottom, max(losses) + 0.08 * (max(losses) - bottom))  # shared by all
    axes[0][0].set_ylabel("held-out loss, builtin:heldout (lower: better)", fontsize=8)
    axes[0][0].legend(fontsize=7, loc="upper left")
    # two lines: one budget's figure is too narrow for the whole title on one
    fig.suptitle(f"SmolLM2-135M: after pruning (hatched) and after {results['settings']['steps']} distillation "
                 f"steps\ndashed: teacher {results['teacher']['heldout_loss']:.2f}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
