#!/usr/bin/env python3
"""Pruning quality right after pruning on a small trained hybrid (Nemotron-H-like).

The model is benchmarks/hybrid_model.py's (trained from scratch on ``builtin:train``).
Rows cut Mamba heads, Mamba head dim, hidden, depth, and all together; each is pruned
from importance computed in float32 (as ModelOpt scores) on ``--samples`` calibration
sequences of ``builtin:calib`` per seed (``--seeds``), and scored by held-out loss on
``builtin:heldout`` and ``builtin:docs`` (``--eval`` sequences of 256 tokens each, the
trained model's tokenizer), mean over seeds; the magnitude order (no calibration) is the floor. Layers are chosen by
the loss drop of each (``--layer-metric loss``, one calibration sequence): greedy
elimination costs 69 passes here, more than this shared CPU allowed.

ModelOpt 0.47 (``mcore_minitron``) prunes the same model to the same targets from the same
calibration sequences of each seed. Its hybrid path imports ``megatron.core.models.hybrid``
(megatron-core >= 0.17, Python >= 3.12), so it runs in the separate Python 3.12 environment
(``make setup-py312``; ``$PY312_ENV``) as a subprocess, benchmarks/modelopt_hybrid_prune.py,
which writes the units ModelOpt keeps; those are applied to our checkpoint by our own
pruning code (modelopt_adapter.keep_plan, as benchmarks/pruning_quality.py does for dense
models) and scored by the same evaluator as our rows. A second setup of ours takes
ModelOpt's two scoring choices (``OUR_SCORING``: Mamba heads and head channels scored on
in_proj's x section, layers by Block Importance); each row counts how many kept units each
of ours shares with ModelOpt's. Without that environment the ModelOpt column says so.
Every result is cached under benchmarks/.cache/hybrid_pruning_quality/full-<N>steps (the trained model's
steps) by its settings.

    python benchmarks/hybrid_pruning_quality.py [--seeds 1 2] [--samples 16] [--eval 16] [--quick]
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import torch

import modelopt_adapter
from common import CACHE, HERE, parser, save_kept, write_results
from hybrid_model import SEQ, sequences, trained_hybrid_checkpoint
from modelopt_hybrid_prune import next_token_loss

OUT = CACHE / "hybrid_pruning_quality"
PY312_ENV = Path(os.environ.get("PY312_ENV", CACHE / "py312"))  # make setup-py312 (benchmarks/py312_env.sh)
NOT_RUN = "not run (make setup-py312)"
# our scorings: importance options, prune --layer-metric
DEFAULT = "ours (defaults)"
OUR_SCORING = {DEFAULT: ({}, "loss"),
               # ModelOpt's choices in our code: Mamba heads scored on in_proj's x, layers by Block Importance
               "ours, ModelOpt's scoring": ({"mamba_activation": "x"}, "block")}
# the trained model: hidden 384, ffn 1536, 24 Mamba heads x 32 in 4 groups, 14 layers (6 M, 2 *, 6 -)
ROWS = {
    "Mamba heads 16 (of 24)": {"mamba_heads": 16},
    "Mamba head dim 24 (of 32)": {"mamba_head_dim": 24},
    "hidden 320 (of 384)": {"hidden": 320},
    "depth 11 layers (of 14)": {"layers": 11},
    "combined: Mamba heads 16, head dim 24, hidden 320, ffn 1024, 12 layers": {
        "mamba_heads": 16, "mamba_head_dim": 24, "hidden": 320, "ffn": 1024, "layers": 12},
}


def py312_python() -> Path | None:
    """The Python 3.12 environment's interpreter, None where ``make setup-py312`` has not built it."""
    return PY312_ENV / "bin" / "python" if (PY312_ENV / ".installed").is_file() else None


def calibration_tokens(ckpt: Path, tokenizer, samples: int, seed: int, out: Path) -> Path:
    """This seed's calibration inputs, drawn as compute_importance draws them, saved for ModelOpt."""
    from nemo_minitron.checkpoint.store import read_info
    from nemo_minitron.data.dataset import check_corpus
    from nemo_minitron.importance.api import calibration_samples

    path = out / f"calib-seed{seed}-{samples}x{SEQ}.pt"
    if not path.is_file():
        corpus = check_corpus(["builtin:calib"], vocab_size=read_info(ckpt).description.vocab_size, tokenizer=tokenizer)
        tokens = calibration_samples(corpus, tokenizer, seq_len=SEQ, samples=samples, seed=seed)[:, :-1]
        torch.save(tokens.contiguous(), f"{path}.tmp")
        os.replace(f"{path}.tmp", path)
    return path


def modelopt_kept(python: Path, ckpt: Path, tokens: Path, target: dict, path: Path) -> dict:
    """ModelOpt's kept units for ``target`` (our axis names), from modelopt_hybrid_prune.py in
    the Python 3.12 environment (cached in ``path``; the targets of one calibration set share
    ModelOpt's score cache next to it)."""
    if not path.is_file():
        from nemo_minitron.prune.targets import MODELOPT_AXES

        ours_to_theirs = {v: k for k, v in MODELOPT_AXES.items()}  # mamba_head_dim: the same name
        export = {ours_to_theirs.get(k, k): v for k, v in target.items()}
        subprocess.run([str(python), str(HERE / "modelopt_hybrid_prune.py"), str(ckpt), "--tokens", str(tokens),
                        "--target", json.dumps(export), "--out", str(path), "--batch-size", "2",
                        "--scores-path", str(tokens.parent / f"modelopt-scores-{tokens.stem}-rank.pth")], check=True)
    return json.loads(path.read_text())


def shared_units(ours: dict, theirs: dict, target: dict) -> dict[str, list[int]]:
    """Per cut axis of ``target``: [units both keep, units kept], summed over the layers both
    keep (``KeepPlan.summary()`` dicts). Two choices made at random would share a fraction
    kept / original of them (within each B/C group for Mamba heads alike)."""
    from nemo_minitron.prune.select import mask_to_indices

    def overlap(a, b) -> list[int]:
        return [len(set(a) & set(b)), len(b)]

    out = {}
    if "layers" in target:
        out["layers"] = overlap(ours["layers"], theirs["layers"])
    if "hidden" in target:
        out["hidden"] = overlap(ours["hidden"], theirs["hidden"])
    per_layer = {"mamba_heads": "mamba_heads", "mamba_head_dim": "mamba_head_dim", "ffn": "ffn_mask"}
    for axis, key in per_layer.items():
        if axis not in target:
            continue
        read = mask_to_indices if key.endswith("_mask") else list
        both = set(ours[key]) & set(theirs[key])
        pairs = [overlap(read(ours[key][i]), read(theirs[key][i])) for i in both]
        out[axis] = [sum(p[0] for p in pairs), sum(p[1] for p in pairs)]
    return out


def heldout_loss(path: Path, data) -> float:
    from nemo_minitron.checkpoint.store import load_checkpoint
    from nemo_minitron.model.forward import full_logits

    model, info = load_checkpoint(str(path))
    model.eval()
    x, y = data
    with torch.no_grad():
        logits = full_logits(model, x, info.description.vocab_size).float()
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).item()


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--samples", type=int, default=16, help="calibration sequences per seed")
    p.add_argument("--eval", type=int, default=16, help="held-out sequences per split")
    p.add_argument("--quick", action="store_true", help="the 3-step model, one seed, 2 + 2 sequences, two rows")
    args = p.parse_args()
    if args.quick:
        args.seeds, args.samples, args.eval = [1], 2, 2

    from nemo_minitron.checkpoint.store import load_checkpoint, load_tokenizer, read_info
    from nemo_minitron.importance.api import compute_importance
    from nemo_minitron.prune.api import prune
    from nemo_minitron.prune.targets import apply_target, sizes
    from nemo_minitron.runtime.distributed import init_distributed

    ckpt = trained_hybrid_checkpoint(quick=args.quick)
    out = OUT / ("quick" if args.quick else "full-" + ckpt.name.removeprefix("checkpoint-"))  # full-700steps
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(str(ckpt))
    old = read_info(ckpt).description
    data = {split: tuple(t[: args.eval] for t in sequences(tokenizer, split)) for split in ("heldout", "docs")}
    init_distributed(1, 1)
    python = py312_python()
    rows = dict(list(ROWS.items())[:2]) if args.quick else ROWS
    results = {"model": str(ckpt), "description": old.summary(), "seeds": args.seeds,
               "calibration": f"{args.samples} x {SEQ} tokens of builtin:calib per seed",
               "eval": f"{args.eval} x {SEQ} tokens each of builtin:heldout / builtin:docs",
               "teacher": {s: heldout_loss(ckpt, d) for s, d in data.items()},
               "modelopt": f"ModelOpt {modelopt_adapter.MODELOPT_VERSION} in {python}" if python else NOT_RUN,
               "rows": {}}
    teacher = None  # loaded once ModelOpt's first kept units are applied

    def ours(seed: int, target: dict, variant: str) -> Path:
        """Our checkpoint pruned with importance computed in float32 (as ModelOpt scores)."""
        calib, tag = f"seed{seed}-{args.samples}x{SEQ}", "-".join(f"{k}{v}" for k, v in target.items())
        importance_options, layer_metric = OUR_SCORING[variant]
        suffix = "-".join(f"{v}" for v in importance_options.values())
        imp = out / f"importance-{calib}-float32{'-' + suffix if suffix else ''}"
        if not imp.exists():
            compute_importance(str(ckpt), ["builtin:calib"], str(imp), samples=args.samples, seq_len=SEQ,
                               micro_batch=2, layer_samples=1, greedy_layers=False, seed=seed, dtype="float32",
                               progress=False, **importance_options)
        pruned = out / f"pruned-{tag}-{imp.name.removeprefix('importance-')}-{layer_metric}"
        if not pruned.exists():
            prune(str(ckpt), str(imp), str(pruned), target=target, layer_metric=layer_metric)
        return pruned

    start = time.time()
    for name, target in rows.items():
        row = {"target": target, **{v: {} for v in OUR_SCORING}, "magnitude": {}, "modelopt": {}}
        tag = "-".join(f"{k}{v}" for k, v in target.items())
        for seed in args.seeds:
            pruned = {v: ours(seed, target, v) for v in OUR_SCORING}
            for variant, path in pruned.items():
                row[variant][seed] = {s: heldout_loss(path, d) for s, d in data.items()}
            row["parameters"] = {v: read_info(path).description.num_parameters() for v, path in pruned.items()}
            if python is None:
                continue
            # ModelOpt's choice on the same calibration sequences, applied by our pruning code
            tokens = calibration_tokens(ckpt, tokenizer, args.samples, seed, out)
            settings = f"{tag}-seed{seed}-{args.samples}x{SEQ}"
            kept = modelopt_kept(python, ckpt, tokens, target,
                                 out / f"modelopt{modelopt_adapter.MODELOPT_VERSION}-{settings}.json")
            theirs = out / f"modelopt{modelopt_adapter.MODELOPT_VERSION}-pruned-{settings}"
            keep = modelopt_adapter.keep_plan(kept, old)
            if not theirs.exists():
                if teacher is None:
                    teacher, _ = load_checkpoint(str(ckpt))
                new = apply_target(old, target, kept_layers=keep.layers)
                save_kept(teacher, old, new, keep, theirs, tokenizer, {"modelopt": kept, "target": target})
            rebuilt, _ = load_checkpoint(str(theirs))
            row["parameters"]["modelopt"] = read_info(theirs).description.num_parameters()
            row["modelopt"][seed] = {**{s: heldout_loss(theirs, d) for s, d in data.items()},
                                     "seconds": kept["seconds"],
                                     # the adapter's check: ModelOpt's own pruned model, and ours rebuilt
                                     "calibration_loss": {"modelopt": kept["loss_on_tokens"],
                                                          "rebuilt_by_ours": next_token_loss(
                                                              rebuilt, torch.load(tokens), old.vocab_size)},
                                     "shared_units": {v: shared_units(read_info(path).provenance["kept"],
                                                                      keep.summary(), target)
                                                      for v, path in pruned.items()}}
            check = row["modelopt"][seed]["calibration_loss"]
            modelopt_adapter.check_rebuilt(check["modelopt"], check["rebuilt_by_ours"], old, f"{name}, seed {seed}")
        mag = out / f"magnitude-{tag}"
        if not mag.exists():
            prune(str(ckpt), str(out / f"importance-seed{args.seeds[0]}-{args.samples}x{SEQ}-float32"), str(mag),
                  target=target, order="magnitude", layer_metric="loss")
        row["magnitude"] = {s: heldout_loss(mag, d) for s, d in data.items()}
        row["parameters"]["magnitude"] = read_info(mag).description.num_parameters()
        results["rows"][name] = row
        print(name, json.dumps(row), flush=True)
    results["seconds"] = time.time() - start
    checks = [abs(r["calibration_loss"]["modelopt"] - r["calibration_loss"]["rebuilt_by_ours"])
              for row in results["rows"].values() for r in row["modelopt"].values()]
    if checks:
        results["modelopt_rebuilt_max_loss_difference"] = max(checks)
    results["table"] = table(results["rows"], list(data), sizes(old))
    print("\n".join(results["table"]))
    if checks:
        print(f"ModelOpt's own pruned models against ours rebuilt from its kept units: calibration losses differ by "
              f"at most {max(checks):.2g}", flush=True)
    write_results(args, results)


def table(rows: dict, splits: list[str], original: dict[str, int]) -> list[str]:
    """Markdown: per row the mean over seeds of each setup's held-out losses, and the kept
    units each of ours shares with ModelOpt's (summed over seeds; in brackets, as many as
    two random choices would share)."""
    def mean(per_seed: dict) -> str:
        return " / ".join(f"{sum(r[s] for r in per_seed.values()) / len(per_seed):.3f}" for s in splits)

    setups = [*OUR_SCORING, "magnitude order", "ModelOpt 0.47"]
    lines = ["| row | parameters | " + " | ".join(setups) + " | kept units shared with ModelOpt's: "
             + "; ".join(OUR_SCORING) + " |", "|---" * (len(setups) + 3) + "|"]
    for name, row in rows.items():
        mo = row["modelopt"]
        cells = [mean(row[v]) for v in OUR_SCORING] + [mean({0: row["magnitude"]}), mean(mo) if mo else NOT_RUN]
        counts = {f"{n / 1e6:.2f}M": None for n in row["parameters"].values()}
        shared = "-"
        if mo:
            def axes(variant: str) -> str:
                units = [r["shared_units"][variant] for r in mo.values()]
                return ", ".join(f"{axis} {sum(u[axis][0] for u in units)}/{total} "
                                 f"({total * row['target'][axis] / original[axis]:.0f})"
                                 for axis, total in ((a, sum(u[a][1] for u in units)) for a in units[0]))
            shared = "; ".join(axes(v) for v in OUR_SCORING)
        lines.append(f"| {name} | {' / '.join(counts)} | " + " | ".join(cells) + f" | {shared} |")
    return lines


if __name__ == "__main__":
    main()
