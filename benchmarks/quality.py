#!/usr/bin/env python3
"""What each Minitron ingredient is worth, on SmolLM2-135M and the built-in corpus.

One target size (about 84.5M parameters: hidden 480, ffn 1024, 6 heads in 3 groups,
or 16 of 30 layers for depth) and one token budget (the same training steps, batch and
learning-rate schedule for every row). Held-out LM loss on builtin:heldout for:

    importance pruning + distillation from the corrected teacher   (ours, the full method)
    importance pruning + distillation      (ours, without teacher correction)
    random pruning + distillation
    magnitude pruning + distillation
    importance pruning + cross-entropy fine-tuning
    the same architecture, random init + distillation
    depth pruning (best contiguous block) + distillation

Writes a markdown table and a bar chart next to the JSON results."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from common import CACHE, builtin_samples, parser, pruned_smollm2, smollm2_checkpoint, write_results


def random_init_copy(like: Path, out: Path, seed: int) -> Path:
    """A checkpoint of ``like``'s architecture with megatron's random initialisation."""
    import torch

    from nemo_minitron.checkpoint.store import (
        CheckpointInfo,
        is_checkpoint,
        load_tokenizer,
        read_info,
        save_checkpoint,
    )
    from nemo_minitron.model.builder import build_model
    from nemo_minitron.runtime.distributed import init_distributed

    if is_checkpoint(out):
        return out
    init_distributed(1, 1, seed)
    info = read_info(like)
    model = build_model(info.description, dtype=torch.float32)
    save_checkpoint(model, CheckpointInfo(info.description, "float32", {"random_init": True, "seed": seed}), out,
                    tokenizer=load_tokenizer(like))
    return out


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--eval-samples", type=int, default=0, help="held-out samples to score (0: all of them)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", default=str(CACHE / "quality"))
    args = p.parse_args()

    from nemo_minitron.checkpoint.store import load_checkpoint, load_tokenizer, read_info
    from nemo_minitron.distill.api import distill, finetune
    from nemo_minitron.distill.checkpointing import latest_checkpoint
    from nemo_minitron.evaluate import evaluate
    from nemo_minitron.runtime.distributed import init_distributed

    init_distributed(1, 1, 1234)  # the evaluations below load checkpoints outside the stage APIs
    teacher = smollm2_checkpoint()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    students = {
        "importance": pruned_smollm2("importance"),
        "random": pruned_smollm2("random", seed=1),
        "magnitude": pruned_smollm2("magnitude"),
        "depth": pruned_smollm2("importance", target={"layers": 16}),
    }
    students["random-init"] = random_init_copy(students["importance"], CACHE / "smollm2-84m-random-init", seed=7)
    # teacher correction (Sreenivas et al., 2024): the teacher first fine-tuned on the
    # distillation data, whose distribution (Python docstrings) it has never been trained on
    corrected = out / f"teacher-correction-{args.steps}steps"
    runs = [("importance pruning + distillation from the corrected teacher (ours, full method)", "importance",
             "kd-corrected"),
            ("importance pruning + distillation (ours, no teacher correction)", "importance", "kd"),
            ("random pruning + distillation", "random", "kd"),
            ("magnitude pruning + distillation", "magnitude", "kd"),
            ("importance pruning + cross-entropy fine-tuning", "importance", "ce"),
            ("same architecture, random init + distillation", "random-init", "kd"),
            ("depth pruning (16 of 30 layers) + distillation", "depth", "kd")]
    heldout = builtin_samples("heldout", load_tokenizer(teacher), args.seq_len).take(args.eval_samples or None)

    # held-out losses are cached by checkpoint and held-out size: a rerun after a kill (or
    # after one more row) scores only what it has not scored
    scored_path = out / f"heldout-losses-{args.seq_len}x{heldout.shape[0]}.json"
    scored = json.loads(scored_path.read_text()) if scored_path.is_file() else {}

    def loss(path: Path) -> float:
        if str(path) not in scored:
            model, info = load_checkpoint(path)
            scored[str(path)] = evaluate(model, info.description.vocab_size, heldout, micro_batch=8).loss
            tmp = scored_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(scored, indent=1))
            tmp.replace(scored_path)
        return scored[str(path)]

    train = dict(steps=args.steps, global_batch=args.global_batch, micro_batch=args.micro_batch, seq_len=args.seq_len,
                 lr=args.lr, min_lr=args.lr / 10, warmup_steps=max(1, args.steps // 10), eval_samples=16,
                 dtype=args.dtype)

    def unfinished(run_dir: Path) -> bool:
        """No finished run in ``run_dir``; one killed before its first checkpoint (nothing to
        resume from) is removed so that it starts again."""
        if (run_dir / "summary.json").is_file():
            return False
        if run_dir.is_dir() and latest_checkpoint(run_dir) is None:
            shutil.rmtree(run_dir)
        return True

    rows = []
    for label, student_key, objective in runs:
        student = students[student_key]
        run_dir = out / f"{student_key}-{objective}-{args.steps}steps"
        if objective == "kd-corrected" and unfinished(corrected):
            finetune(str(teacher), ["builtin:train"], str(corrected), **train)
        if unfinished(run_dir):
            if objective.startswith("kd"):
                kd_teacher = corrected / "final" if objective == "kd-corrected" else teacher
                distill(str(kd_teacher), str(student), ["builtin:train"], str(run_dir), **train)
            else:
                finetune(str(student), ["builtin:train"], str(run_dir), **train)
        summary = json.loads((run_dir / "summary.json").read_text())
        rows.append({"setup": label, "parameters": read_info(student).description.num_parameters(),
                     "before_training": loss(student), "after_training": loss(run_dir / "final"),
                     "train_seconds": summary["train_seconds"], "tokens": summary["tokens"]})
    teacher_loss = loss(teacher)
    teacher_params = f"{read_info(teacher).description.num_parameters() / 1e6:.1f}M"
    table = ["| setup | parameters | held-out loss right after pruning | after training |", "|---|---|---|---|",
             f"| teacher: SmolLM2-135M | {teacher_params} | {teacher_loss:.3f} | - |",
             f"| teacher after correction (the same training, cross-entropy) | {teacher_params} | - | "
             f"{loss(corrected / 'final'):.3f} |"]
    table += [f"| {r['setup']} | {r['parameters'] / 1e6:.1f}M | {r['before_training']:.3f} | "
              f"**{r['after_training']:.3f}** |" for r in rows]
    tokens = rows[0]["tokens"]
    note = (f"Same training for every row: {args.steps} steps x {args.global_batch} sequences x {args.seq_len} "
            f"tokens = {tokens:,} tokens of builtin:train, lr {args.lr} cosine, {args.dtype}. Held-out: "
            f"{heldout[:, 1:].numel():,} tokens of builtin:heldout.")
    (out / "quality.md").write_text("\n".join(table) + "\n\n" + note + "\n")
    _plot(rows, teacher_loss, out / "quality.png")
    write_results(args, {"benchmark": "quality", "teacher_loss": teacher_loss, "rows": rows, "note": note,
                         "table": str(out / "quality.md"), "plot": str(out / "quality.png")})


def _plot(rows, teacher_loss, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    labels = [r["setup"].replace(" + ", "\n+ ") for r in rows]
    bars = ax.barh(labels, [r["after_training"] for r in rows],
                   color=["tab:green"] + ["tab:grey"] * (len(rows) - 1))
    ax.bar_label(bars, fmt="%.3f", padding=3)
    ax.set_xlim(0, max(r["after_training"] for r in rows) * 1.12)
    ax.axvline(teacher_loss, color="tab:blue", linestyle="--", label=f"teacher {teacher_loss:.2f}")
    ax.invert_yaxis()
    ax.set_xlabel("held-out LM loss after the same training (lower is better)")
    ax.legend()
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
