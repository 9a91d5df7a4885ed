#!/usr/bin/env python3
"""Pruning quality against NVIDIA ModelOpt 0.47 (``mcore_minitron``) as a live peer.

SmolLM2-135M (fp32, TP=1), the same calibration samples of ``builtin:calib`` per seed,
the same targets, and held-out loss right after pruning on ``builtin:docs`` (English
prose of Python's reference documentation: no docstring of the calibration or training
splits) and ``builtin:heldout``. Rows cut one axis at a time and all together; each row
is scored for ModelOpt and for every scoring variant of ours (see VARIANTS), mean over
the calibration seeds. ModelOpt runs through benchmarks/modelopt_adapter.py, which is
checked here: an identity prune reproduces the teacher's loss, ModelOpt's kept units
rebuilt by our own pruning code reproduce ModelOpt's loss, and both tools keep the same
parameter count on every row.

Cost control on 2 CPU cores: one calibration pass per seed feeds all of our variants
(several collectors on one forward), ModelOpt reuses its own score cache across targets,
and every result (scores, ModelOpt's kept units, each evaluated keep-set) is cached under
benchmarks/.cache/pruning_quality, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

import modelopt_adapter
from common import CACHE, builtin_samples, parser, save_kept, smollm2_checkpoint, write_results

OUT = CACHE / "pruning_quality"  # --out

# name: (seq_agg, batch_agg, neuron_activation, head_score, channel_norms)
VARIANTS = {
    "ours 0.1 (token heads, +final norm)": ("mean", "l2", "post", "token", "layers+final"),
    "token heads, layer norms": ("mean", "l2", "post", "token", "layers"),
    "channel heads, +final norm": ("mean", "l2", "post", "channel", "layers+final"),
    "channel heads, layer norms": ("mean", "l2", "post", "channel", "layers"),
    "neurons pre": ("mean", "l2", "pre", "channel", "layers"),
    "(seq mean, batch mean)": ("mean", "mean", "post", "channel", "layers"),
    "(seq l2, batch l2)": ("l2", "l2", "post", "channel", "layers"),
}
DEPTH_METRICS = ("best", "contiguous", "loss", "block", "greedy")
DEPTH_VARIANT = "channel heads, layer norms"  # the width variant scored with every depth metric
# prune --layer-metric's default (auto): greedy when only layers are cut, else contiguous (the
# refit and iterative variants of the width+depth row build on the latter)
DEFAULT_DEPTH_ONLY = "greedy"
DEFAULT_DEPTH = "contiguous"
# ideas ModelOpt lacks, applied on top of these variants' choices
REFIT_VARIANTS = ("channel heads, layer norms", "token heads, layer norms")
ITERATIVE_VARIANTS = ("channel heads, layer norms", "token heads, layer norms")
# collectors sharing one forward pass: (seq_agg, neuron_activation, head_score)
COLLECTORS = sorted({(v[0], v[2], v[3]) for v in VARIANTS.values()})

ROWS = {  # name: target (SmolLM2-135M: hidden 576, ffn 1536, 9 heads in 3 groups, 30 layers)
    "hidden 480": {"hidden": 480},
    "ffn 1024": {"ffn": 1024},
    "heads 6 (3 groups)": {"heads": 6},
    "depth 25% (22 layers)": {"layers": 22},
    "depth 50% (15 layers)": {"layers": 15},
    "combined: hidden 480, ffn 1024, heads 6": {"hidden": 480, "ffn": 1024, "heads": 6},
    "all axes: + 22 layers": {"hidden": 480, "ffn": 1024, "heads": 6, "layers": 22},
    "combined: hidden 384, ffn 768, heads 3": {"hidden": 384, "ffn": 768, "heads": 3},
}


class Missing(KeyError):
    """--cached-only: this result has not been computed yet."""


class Bench:
    def __init__(self, args):
        from nemo_minitron.checkpoint.store import load_checkpoint, load_tokenizer, read_info

        self.args = args
        self.ckpt = smollm2_checkpoint()
        self.old = read_info(self.ckpt).description
        self.tokenizer = load_tokenizer(self.ckpt)
        self.teacher, _ = load_checkpoint(self.ckpt)
        self.teacher.eval()
        # samples drawn by seed through the data API (megatron-core's GPTDataset order)
        self.heldout = {name: builtin_samples(name, self.tokenizer, args.seq_len, num_samples=args.eval_samples,
                                              seed=4321).take(args.eval_samples)
                        for name in ("docs", "heldout")}
        self.load_samples = lambda seed: builtin_samples("calib", self.tokenizer, args.seq_len,
                                                         num_samples=args.calib_samples, seed=seed).take(args.calib_samples)
        OUT.mkdir(parents=True, exist_ok=True)

    # ----------------------------------------------------------------- evaluation (cached)
    def evaluate(self, model) -> dict[str, float]:
        from nemo_minitron.evaluate import evaluate

        return {name: evaluate(model, self.old.vocab_size, s, micro_batch=4).loss for name, s in self.heldout.items()}

    @staticmethod
    def _path(key: dict) -> Path:
        return OUT / "evals" / (hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24] + ".json")

    def has(self, key: dict) -> bool:
        return self._path(key).is_file()

    def cached(self, key: dict, compute) -> dict:
        path = self._path(key)
        if path.is_file():
            return json.loads(path.read_text())
        if self.args.cached_only:
            raise Missing(key)
        result = compute()
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # seeds may run in parallel processes
        tmp.write_text(json.dumps({**result, "key": key}))
        tmp.replace(path)
        return result

    def eval_keep(self, keep, new, grams=None, tag: str = "") -> dict:
        """Held-out losses of the teacher pruned to ``keep`` by nemo-minitron's pruning code."""
        from nemo_minitron.prune.api import _build_pruned

        key = {"keep": keep.summary()["sha256"], "refit": grams is not None, "tag": tag,
               "eval": [self.args.eval_samples, self.args.seq_len]}

        def compute():
            model = _build_pruned(self.teacher, self.old, new, keep, [len(keep.layers)], grams=grams)
            return {**self.evaluate(model), "parameters": _param_count(model)}

        return self.cached(key, compute)

    def distilled(self, keep, new, grams, steps: int) -> dict:
        """Held-out losses of the pruned model after ``steps`` of distillation (cached); the
        student and training directories are deleted once evaluated."""
        import shutil

        sha = keep.summary()["sha256"][:24] + ("-refit" if grams is not None else "")
        key = {"distill": steps, "keep": sha, "train": TRAIN, "eval": [self.args.eval_samples, self.args.seq_len]}

        def compute():
            from nemo_minitron.checkpoint.store import load_checkpoint
            from nemo_minitron.distill.api import distill

            student, run_dir = OUT / "students" / sha, OUT / "distill" / f"{sha}-{steps}steps"
            for d in (student, run_dir):
                shutil.rmtree(d, ignore_errors=True)
            save_kept(self.teacher, self.old, new, keep, student, self.tokenizer, {}, grams=grams)
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            start = time.time()
            distill(str(self.ckpt), str(student), ["builtin:train"], str(run_dir), steps=steps,
                    warmup_steps=max(1, steps // 10), progress=False, **TRAIN)
            seconds = time.time() - start
            trained, _ = load_checkpoint(run_dir / "final", dtype=torch.float32)
            result = {**self.evaluate(trained), "train_seconds": seconds}
            del trained
            for d in (student, run_dir):
                shutil.rmtree(d, ignore_errors=True)
            return result

        return self.cached(key, compute)

    # ----------------------------------------------------------------- our scores (one pass)
    def our_scores(self, seed: int) -> dict:
        path = OUT / f"scores-seed{seed}.pt"
        if path.is_file():
            return torch.load(path)
        from nemo_minitron.importance.collect import ActivationCollector
        from nemo_minitron.importance.layers import SkipLosses, best_contiguous_blocks, layer_loss_drops
        from nemo_minitron.model.forward import run_forward_only, split_microbatches
        from nemo_minitron.importance.api import hooks_only_step
        from nemo_minitron.runtime.distributed import layout
        import contextlib

        start = time.time()
        samples = self.load_samples(seed)
        collectors = {c: ActivationCollector(self.teacher, seq_agg=c[0], neuron_activation=c[1], head_score=c[2],
                                             second_moments=(c == ("mean", "post", "channel")))
                      for c in COLLECTORS}
        with contextlib.ExitStack() as stack:
            for c in collectors.values():
                stack.enter_context(c.active())
            with torch.no_grad():
                run_forward_only(self.teacher, split_microbatches(samples, 4), hooks_only_step(layout().device))
        L = self.old.num_layers
        out = {"variants": {}, "seconds_calibration": time.time() - start}
        finals = {}
        for (seq, neuron, head), c in collectors.items():
            for batch in ("l2", "mean"):
                finals[(seq, neuron, head, batch)] = c.finalize(L, batch) if batch == "l2" or seq == "mean" else None
        for name, (seq, batch, neuron, head, norms) in VARIANTS.items():
            from nemo_minitron.importance.api import hidden_scores

            f = finals[(seq, neuron, head, batch)]
            out["variants"][name] = {"hidden": hidden_scores(f, norms).float(), "ffn": f["ffn"].float(),
                                     "heads": f["heads"].float(), "block": f["layer_block_importance"].float()}
        g = finals[("mean", "post", "channel", "l2")]
        out["grams"] = {"proj_gram": g["proj_gram"].float(), "fc2_gram": g["fc2_gram"].float()}
        layer_set = samples[: self.args.layer_samples]
        start = time.time()
        losses = SkipLosses(self.teacher, self.old.vocab_size, layer_set, 4)
        out["loss_drop"] = torch.tensor(layer_loss_drops(losses, L))
        drops = sorted({L - t["layers"] for t in ROWS.values() if "layers" in t})
        out["blocks"] = best_contiguous_blocks(losses, L, drops)
        out["seconds_layers"] = time.time() - start
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(out, tmp)
        tmp.replace(path)
        return out

    def greedy(self, seed: int, rows: list[str]) -> list[dict]:
        """importance.layers.greedy_drop_order on this seed's first --greedy-samples calibration
        samples, down to the deepest cut of ``rows`` (cached step by step: a killed run resumes,
        and a deeper row continues where a shallower one stopped)."""
        from nemo_minitron.importance.layers import SkipLosses, greedy_drop_order

        path = OUT / f"greedy-seed{seed}-{self.args.greedy_samples}.json"
        done = json.loads(path.read_text()) if path.is_file() else []
        steps = max((self.old.num_layers - ROWS[r]["layers"] for r in rows if "layers" in ROWS[r]), default=0)
        if len(done) >= steps or self.args.cached_only:  # keep_for skips rows deeper than done
            return done

        def save(order):
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(order))
            tmp.replace(path)
            print(f"seed {seed} greedy step {len(order)}: layer {order[-1]['layer']} loss {order[-1]['loss']:.4f}",
                  flush=True)

        samples = self.load_samples(seed)[: self.args.greedy_samples]
        return greedy_drop_order(SkipLosses(self.teacher, self.old.vocab_size, samples, 4), self.old.num_layers,
                                 steps, done=done, on_step=save)

    def drop_sets(self, seed: int, scores: dict) -> dict:
        """importance.layers.drop_set_losses on this seed's first --select-samples calibration
        samples (cached): the contiguous, loss and block sets, and the greedy set for every
        size the greedy elimination has reached (added to the cache when it reaches it)."""
        from nemo_minitron.importance.layers import SkipLosses, drop_set_losses

        path = OUT / f"drop-sets-seed{seed}-{self.args.select_samples}.json"
        losses = SkipLosses(self.teacher, self.old.vocab_size, self.load_samples(seed)[: self.args.select_samples], 4)
        if not path.is_file():
            block = scores["variants"][DEPTH_VARIANT]["block"].tolist()
            sets = drop_set_losses(losses, scores["blocks"], scores["loss_drop"].tolist(), block)
            path.write_text(json.dumps(sets))
        sets = json.loads(path.read_text())
        greedy, changed = scores.get("greedy", []), False
        for k, s in sets.items():
            made_by = self.args.greedy_samples
            if len(greedy) < int(k) or s.get("greedy", {}).get("greedy_samples") == made_by or self.args.cached_only:
                continue
            layers = sorted(e["layer"] for e in greedy[: int(k)])
            s["greedy"] = {"layers": layers, "greedy_samples": made_by,
                           "loss": losses(layers)}
            # the tie order of drop_set_losses
            s["best"] = min((m for m in ("contiguous", "greedy", "loss", "block") if m in s),
                            key=lambda m: s[m]["loss"])
            changed = True
        if changed:
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(sets))
            tmp.replace(path)
        return sets

    def keep_for(self, scores: dict, variant: str, new, depth: str):
        from nemo_minitron.prune.select import UnitScores, keep_plan

        v = scores["variants"][variant]
        L = self.old.num_layers
        drop = L - new.num_layers
        if drop == 0:
            layers = list(range(L))
        elif depth == "best":
            sets = scores["drop_sets"][str(drop)]
            dropped = set(sets[sets["best"]]["layers"])
            layers = [i for i in range(L) if i not in dropped]
        elif depth == "contiguous":
            dropped = set(scores["blocks"][str(drop)]["layers"])
            layers = [i for i in range(L) if i not in dropped]
        elif depth == "greedy":
            if len(scores.get("greedy", [])) < drop:
                raise Missing("greedy")
            dropped = {e["layer"] for e in scores["greedy"][:drop]}
            layers = [i for i in range(L) if i not in dropped]
        else:
            metric = scores["loss_drop"] if depth == "loss" else v["block"]
            dropped = set(torch.argsort(metric.double(), stable=True)[:drop].tolist())
            layers = [i for i in range(L) if i not in dropped]
        heads = v["heads"]
        units = UnitScores(hidden=v["hidden"], ffn=v["ffn"], heads=heads,
                           query_groups=heads.unflatten(1, (self.old.num_query_groups, -1)).sum(-1), layers=v["block"])
        return keep_plan(self.old, new, units, layers)

    @staticmethod
    def iterative_path(seed: int, keep, variant: str) -> Path:
        return OUT / "iterative" / f"{keep.summary()['sha256'][:24]}-seed{seed}-{variant.replace(' ', '_')}.pt"

    def iterative_keep(self, seed: int, keep, new, variant: str):
        """Re-estimate channel scores after the cheap axes are cut: prune every other axis
        first, score the channels of that model on the same calibration samples, then
        choose the channels (the rest of ``keep`` unchanged)."""
        import dataclasses

        from nemo_minitron.importance.api import calibration_pass
        from nemo_minitron.prune.api import _build_pruned
        from nemo_minitron.prune.select import top

        seq, batch, neuron, head, norms = VARIANTS[variant]
        path = self.iterative_path(seed, keep, variant)
        if path.is_file():
            hidden = torch.load(path)
        else:
            partial = dataclasses.replace(new, hidden_size=self.old.hidden_size)
            full_hidden = dataclasses.replace(keep, hidden=torch.arange(self.old.hidden_size))
            model = _build_pruned(self.teacher, self.old, partial, full_hidden, [len(keep.layers)])
            scores = calibration_pass(model, self.load_samples(seed), micro_batch=4, seq_agg=seq, batch_agg=batch,
                                      neuron_activation=neuron, num_layers=partial.num_layers, head_score=head,
                                      channel_norms=norms, progress=False)
            hidden = top(scores["hidden"], new.hidden_size)
            path.parent.mkdir(exist_ok=True)
            torch.save(hidden, path)
        return dataclasses.replace(keep, hidden=hidden)

    # ----------------------------------------------------------------- ModelOpt
    def modelopt(self, seed: int, target: dict, new, check: bool) -> dict:
        key = {"modelopt": modelopt_adapter.MODELOPT_VERSION, "seed": seed, "row": target,
               "calib": [self.args.calib_samples, self.args.seq_len], "check": True,
               "eval": [self.args.eval_samples, self.args.seq_len]}
        if not check and not self.has(key):  # a checked result serves an unchecked request too
            key["check"] = False

        def compute():
            from nemo_minitron.checkpoint.store import load_checkpoint

            model, _ = load_checkpoint(self.ckpt)
            kept, pruned = modelopt_adapter.prune(model, self.old, new, modelopt_adapter.forward_loop(
                self.load_samples(seed)), OUT / f"modelopt-scores-seed{seed}")
            result = {**self.evaluate(pruned), "parameters": _param_count(pruned), "kept": kept}
            del pruned, model
            keep = modelopt_adapter.keep_plan(kept, self.old)
            result["keep_sha256"] = keep.summary()["sha256"]
            if check:  # ModelOpt's kept units, rebuilt by our pruning code
                from nemo_minitron.prune.api import _build_pruned

                rebuilt = _build_pruned(self.teacher, self.old, new, keep, [len(keep.layers)])
                result["rebuilt_by_ours"] = self.evaluate(rebuilt)
            return result

        return self.cached(key, compute)


# distillation after pruning: the same for every student (the settings of benchmarks/quality.py)
TRAIN = dict(global_batch=8, micro_batch=4, seq_len=256, lr=3e-4, min_lr=3e-5, eval_samples=4, save_every=0,
             dtype="bfloat16")


def distill_rows(bench: "Bench", results: dict, keeps: dict, rows: list[str]) -> dict:
    """Per row: ModelOpt's and our best ``--distill-setups`` setups (by held-out loss right
    after pruning, mean of both splits and the seeds), pruned with --distill-seed's
    calibration, distilled ``--distill-steps`` steps from the unpruned teacher on
    builtin:train, then evaluated like the rest. {row: {setup: {docs, heldout}}}"""
    from nemo_minitron.prune.targets import apply_target

    args = bench.args
    out: dict = {}
    for row in rows:
        m = results["means"].get(row)
        if not m or (args.distill_seed, row) not in keeps:
            continue
        available = keeps[(args.distill_seed, row)]
        ours = sorted((n for n in m if n != "ModelOpt 0.47" and n in available),
                      key=lambda n: (m[n]["docs"] + m[n]["heldout"]) / 2)
        picks = ["ModelOpt 0.47"] + ours[: args.distill_setups]
        default = default_name(row, m)
        if default in available and default not in picks:
            picks.append(default)
        new = apply_target(bench.old, ROWS[row])
        for name in picks:
            keep, grams = available[name]
            try:
                r = bench.distilled(keep, new, grams, args.distill_steps)
            except Missing:
                continue
            out.setdefault(row, {})[name] = r
            print(f"distilled {args.distill_steps} steps, {row}, {name}: {r['docs']:.3f} / {r['heldout']:.3f}",
                  flush=True)
    return out


def _param_count(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def main() -> None:
    global OUT
    p = parser(__doc__)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-samples", type=int, default=4, help="held-out samples of each split")
    p.add_argument("--layer-samples", type=int, default=1, help="calibration samples for the layer loss drops")
    p.add_argument("--select-samples", type=int, default=8,
                   help="calibration samples on which --layer-metric best compares its three layer sets")
    p.add_argument("--greedy-samples", type=int, default=1,
                   help="calibration samples for the greedy layer elimination (as many as --layer-samples)")
    p.add_argument("--no-greedy", action="store_true", help="skip the greedy layer elimination")
    p.add_argument("--distill-steps", type=int, default=0,
                   help="also distil ModelOpt's and our two best setups per row this many steps (0: no)")
    p.add_argument("--distill-seed", type=int, default=1, help="the calibration seed whose pruned models are distilled")
    p.add_argument("--distill-setups", type=int, default=2, help="how many of our setups per row to distil")
    p.add_argument("--rows", nargs="*", default=None, help="row names (default: all)")
    p.add_argument("--cached-only", action="store_true", help="only tabulate results already computed")
    p.add_argument("--no-iterative", action="store_true", help="skip the iterative re-estimation variants")
    p.add_argument("--out", default=str(OUT), help="cache of every result (resumable)")
    p.add_argument("--variants", nargs="*", default=None, help="our scoring variants to score (default: all)")
    p.add_argument("--check-seeds", type=int, nargs="*", default=None,
                   help="seeds on which ModelOpt's kept units are rebuilt by our code (default: the first)")
    args = p.parse_args()
    OUT = Path(args.out)

    from nemo_minitron.prune.targets import apply_target
    from nemo_minitron.runtime.distributed import init_distributed

    init_distributed(1, 1, 1234)
    bench = Bench(args)
    rows = [r for r in ROWS if args.rows is None or r in args.rows]
    teacher = bench.cached({"teacher": str(bench.ckpt), "eval": [args.eval_samples, args.seq_len]},
                           lambda: bench.evaluate(bench.teacher))
    print(f"teacher: {teacher}", flush=True)
    results: dict = {"teacher": teacher, "rows": {}, "checks": {}}
    keeps: dict = {}  # (seed, row) -> {setup: (KeepPlan, grams for refit or None)}
    for seed in args.seeds:
        # ModelOpt's identity prune: the adapter must leave the model exactly as it was
        identity = bench.modelopt(seed, {}, bench.old, check=False) if seed == 1 else None
        if identity is not None:
            results["checks"]["identity_prune"] = {k: identity[k] for k in ("docs", "heldout")}
            for split in ("docs", "heldout"):
                modelopt_adapter.check_rebuilt(identity[split], teacher[split], bench.old, f"identity prune, {split}")
        scores = bench.our_scores(seed)
        if not args.no_greedy:
            try:
                scores["greedy"] = bench.greedy(seed, rows)
            except Missing:
                pass
        scores["drop_sets"] = bench.drop_sets(seed, scores)
        for row in rows:
            new = apply_target(bench.old, ROWS[row])
            checks = args.check_seeds if args.check_seeds is not None else args.seeds[:1]
            try:
                mo = bench.modelopt(seed, ROWS[row], new, check=seed in checks)
            except Missing:
                continue
            entry = results["rows"].setdefault(row, {"target": ROWS[row], "parameters": new.num_parameters(),
                                                     "seeds": {}})
            assert mo["parameters"] == new.num_parameters(), (row, mo["parameters"], new.num_parameters())
            per_seed = {"ModelOpt 0.47": {k: mo[k] for k in ("docs", "heldout")}}
            keeps[(seed, row)] = {"ModelOpt 0.47": (modelopt_adapter.keep_plan(mo["kept"], bench.old), None)}
            if "rebuilt_by_ours" in mo:
                results["checks"].setdefault("modelopt_rebuilt_by_ours", {})[row] = {
                    "modelopt": per_seed["ModelOpt 0.47"], "rebuilt": mo["rebuilt_by_ours"]}
                for split in ("docs", "heldout"):
                    modelopt_adapter.check_rebuilt(mo[split], mo["rebuilt_by_ours"][split], bench.old,
                                                   f"{row}, seed {seed}, {split}")
            depth_only = set(ROWS[row]) == {"layers"}
            for variant in [v for v in VARIANTS if args.variants is None or v in args.variants]:
                depths = DEPTH_METRICS if "layers" in ROWS[row] and (depth_only or variant == DEPTH_VARIANT) \
                    else (DEFAULT_DEPTH,)
                for depth in depths:
                    try:
                        keep = bench.keep_for(scores, variant, new, depth)
                        r = bench.eval_keep(keep, new)
                    except Missing:
                        continue
                    assert r["parameters"] == mo["parameters"], (row, variant, r["parameters"], mo["parameters"])
                    name = (f"depth {depth}" if depth_only else
                            variant + (f" / depth {depth}" if len(depths) > 1 else ""))
                    per_seed[name] = {k: r[k] for k in ("docs", "heldout")}
                    per_seed[name]["same_units_as_modelopt"] = keep.summary()["sha256"] == mo["keep_sha256"]
                    keeps[(seed, row)][name] = (keep, None)
                    if depth != DEFAULT_DEPTH and not depth_only:
                        continue
                    try:
                        if variant in REFIT_VARIANTS and {"ffn", "heads"} & set(ROWS[row]):
                            r = bench.eval_keep(keep, new, grams=scores["grams"])
                            per_seed[f"{variant} + refit"] = {k: r[k] for k in ("docs", "heldout")}
                            keeps[(seed, row)][f"{variant} + refit"] = (keep, scores["grams"])
                        if variant in ITERATIVE_VARIANTS and "hidden" in ROWS[row] and len(ROWS[row]) > 1 \
                                and not args.no_iterative:
                            if args.cached_only and not bench.iterative_path(seed, keep, variant).is_file():
                                raise Missing(row)
                            again = bench.iterative_keep(seed, keep, new, variant)
                            r = bench.eval_keep(again, new, tag="iterative")
                            per_seed[f"{variant} + iterative channels"] = {k: r[k] for k in ("docs", "heldout")}
                            if variant in REFIT_VARIANTS:
                                r = bench.eval_keep(again, new, grams=scores["grams"], tag="iterative")
                                per_seed[f"{variant} + iterative channels + refit"] = {
                                    k: r[k] for k in ("docs", "heldout")}
                    except Missing:
                        pass
            entry["seeds"][seed] = per_seed
            print(f"seed {seed} {row}: " + ", ".join(f"{k} {v['docs']:.3f}" for k, v in per_seed.items()), flush=True)
    results["means"] = means(results)
    if args.distill_steps:
        results["distilled"] = distill_rows(bench, results, keeps, rows)
    (OUT / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (OUT / "table.md").write_text(summary_table(results) + "\n" + table(results) + "\n" + table(results, "heldout"))
    plot(results, OUT / "pruning_quality.png")
    print(table(results))
    write_results(args, {"benchmark": "pruning_quality", **results})


def means(results: dict) -> dict:
    """{row: {setup: {split: mean over seeds, "seeds": n}}} over the seeds every setup has."""
    out = {}
    for row, entry in results["rows"].items():
        setups: dict = {}
        for per_seed in entry["seeds"].values():
            for name, r in per_seed.items():
                for split in ("docs", "heldout"):
                    setups.setdefault(name, {}).setdefault(split, []).append(r[split])
        out[row] = {name: {**{k: sum(v) / len(v) for k, v in d.items()}, "seeds": len(d["docs"])}
                    for name, d in setups.items()}
    return out


DEFAULT = "channel heads, layer norms"  # importance's defaults (head_score channel, channel_norms layers)


def default_name(row: str, entries: dict, refit: bool = False) -> str | None:
    """Our defaults' entry in a row (--layer-metric auto: DEFAULT_DEPTH_ONLY or DEFAULT_DEPTH),
    optionally + refit."""
    target = ROWS[row]
    if set(target) == {"layers"}:
        return None if refit else f"depth {DEFAULT_DEPTH_ONLY}"
    names = [f"{DEFAULT} + refit"] if refit else [f"{DEFAULT} / depth {DEFAULT_DEPTH}", DEFAULT]
    return next((n for n in names if n in entries), None)


def summary_table(results: dict) -> str:
    """Per row: ModelOpt, ours 0.1, our defaults, our defaults + refit (both splits)."""
    m = results["means"]
    lines = ["| row | parameters | ModelOpt 0.47 | ours 0.1 | ours (defaults) | ours + refit | seeds |",
             "|---|---|---|---|---|---|---|"]
    for row, entries in m.items():
        def cell(name):
            if name is None or name not in entries:
                return "-"
            return f"{entries[name]['docs']:.3f} / {entries[name]['heldout']:.3f}"
        old = "ours 0.1 (token heads, +final norm)" if "hidden" in ROWS[row] or "heads" in ROWS[row] or \
            "ffn" in ROWS[row] else "depth contiguous"
        shown = [n for n in ("ModelOpt 0.47", default_name(row, entries), default_name(row, entries, True)) if n]
        seeds = min(entries[n]["seeds"] for n in shown if n in entries)
        params = results["rows"][row]["parameters"] / 1e6
        lines.append(f"| {row} | {params:.1f}M | {cell('ModelOpt 0.47')} | {cell(old)} | "
                     f"{cell(default_name(row, entries))} | {cell(default_name(row, entries, refit=True))} | {seeds} |")
    return "\n".join(lines) + ("\n\nheld-out loss right after pruning, builtin:docs / builtin:heldout, mean over "
                               f"seeds; teacher {results['teacher']['docs']:.3f} / {results['teacher']['heldout']:.3f}\n")


def table(results: dict, split: str = "docs") -> str:
    m = results["means"]
    rows = list(m)
    setups = list(dict.fromkeys(name for row in rows for name in m[row]))
    head = "| setup | " + " | ".join(rows) + " |"
    lines = [head, "|---" * (len(rows) + 1) + "|"]
    for name in setups:
        cells = []
        for row in rows:
            r = m[row].get(name)
            if r is None:
                cells.append("")
                continue
            best = min(v[split] for v in m[row].values())
            cells.append(f"**{r[split]:.3f}**" if f"{r[split]:.3f}" == f"{best:.3f}" else f"{r[split]:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    seeds = sorted({v["seeds"] for row in rows for v in m[row].values()})
    return "\n".join(lines) + (f"\n\nheld-out loss on builtin:{split} right after pruning, mean over {seeds} "
                               f"calibration seeds; teacher {results['teacher'][split]:.3f}\n")


def plot(results: dict, path: Path, split: str = "docs", setups: tuple[str, ...] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = results["means"]
    rows = list(m)
    labels = ("ModelOpt 0.47", "ours (defaults)", "ours + refit")
    picks = {row: ("ModelOpt 0.47", default_name(row, m[row]), default_name(row, m[row], refit=True)) for row in rows}
    setups = labels
    fig, ax = plt.subplots(figsize=(10, 0.6 * len(rows) * len(setups) / 2 + 1.5))
    height = 0.8 / len(setups)
    for j, name in enumerate(setups):
        values = [m[row].get(picks[row][j], {}).get(split, float("nan")) if picks[row][j] else float("nan")
                  for row in rows]
        bars = ax.barh([i + j * height for i in range(len(rows))], values, height=height, label=name)
        ax.bar_label(bars, fmt="%.2f", padding=2, fontsize=7)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(rows))], rows, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(results["teacher"][split], color="black", linestyle="--", linewidth=1,
               label=f"teacher {results['teacher'][split]:.2f}")
    ax.set_xlabel(f"held-out loss on builtin:{split} right after pruning (lower is better)")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
