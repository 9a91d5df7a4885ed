"""Can this run start: a teacher and a student that fit, a teacher-logit cache and a
method whose settings go together, an output directory to write or resume. Every
check raises a one-line UsageError naming the flag or recipe key."""

from __future__ import annotations

import hashlib
from pathlib import Path

from nemo_minitron.checkpoint.store import require_tokenizer
from nemo_minitron.config import Names
from nemo_minitron.distill.checkpointing import latest_checkpoint
from nemo_minitron.distill.config import DistillConfig, TrainingConfig
from nemo_minitron.errors import require
from nemo_minitron.files import check_output_dir
from nemo_minitron.families import family
from nemo_minitron.model.description import ModelDescription
from nemo_minitron.prune.targets import sizes


def tokenizer_fingerprint(checkpoint: str) -> str:
    digest = hashlib.sha256()
    for f in sorted(require_tokenizer(checkpoint).glob("*")):
        if f.name in ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt"):
            digest.update(f.name.encode() + f.read_bytes())
    return digest.hexdigest()


def check_compatible(teacher: ModelDescription, student: ModelDescription, teacher_ckpt: str, student_ckpt: str) -> None:
    """The student must be a model the teacher can teach: a (pruned) descendant of it."""
    require(teacher.vocab_size == student.vocab_size,
            f"--teacher and --student have different vocabularies ({teacher.vocab_size} vs {student.vocab_size})")
    require(tokenizer_fingerprint(teacher_ckpt) == tokenizer_fingerprint(student_ckpt),
            "--teacher and --student have different tokenizers")
    check_descendant(teacher, student)


def check_descendant(teacher: ModelDescription, student: ModelDescription, flag: str = "--teacher") -> None:
    """Same family, no axis larger than the teacher's, the same rotary encoding."""
    # the same kind of network (Llama and Mistral are: their family tables fix the same features)
    require(family(teacher.architecture).feature_values() == family(student.architecture).feature_values(),
            f"--student ({student.architecture}) is not of the {flag} model's family ({teacher.architecture})")
    require(teacher.is_moe == student.is_moe or teacher.is_moe,
            f"--student ({student.architecture}) has experts, the {flag} model ({teacher.architecture}) a dense MLP")
    mine, theirs = sizes(student), sizes(teacher)
    axes = ("hidden", "heads", "query_groups", "layers") + (
        ("experts", "moe_ffn", "shared_ffn") if student.is_moe else () if teacher.is_moe else ("ffn",))
    for axis in axes:
        require(mine[axis] <= theirs[axis], f"--student is not a descendant of {flag}: its "
                                            f"{axis.replace('_', ' ')} ({mine[axis]}) exceeds the teacher's "
                                            f"({theirs[axis]})")
    require(teacher.rope_theta == student.rope_theta and teacher.rope_scaling == student.rope_scaling
            and teacher.rotary_percent == student.rotary_percent,
            f"--student uses another rotary position encoding than {flag}")


def check_cache_settings(cfg: DistillConfig, names: Names, teacher: str | None) -> None:
    """Distillation settings a teacher-logit cache can serve (it holds the teacher's top-K only)."""
    require(teacher is None, "give --teacher or --teacher-logits, not both")
    require(not cfg.kd_pairs, f"--teacher-logits with {names('kd_pairs')}: intermediate losses need the live "
                              f"teacher (give --teacher, or drop {names('kd_pairs')})")
    require(cfg.kd_loss == "forward", f"--teacher-logits needs {names('kd_loss')} forward (the cache holds the "
                                      "teacher's top-K, reverse KL needs all of it)")
    require(cfg.kd_top_k is None, f"--teacher-logits with {names('kd_top_k')}: the cache's K was chosen when it "
                                  "was written (teacher-logits --top-k)")
    require(not cfg.contrastive_weight, f"--teacher-logits with {names('contrastive_weight')}: the contrastive loss "
                                        "needs the teacher's whole distributions (give --teacher)")


def check_method(cfg: TrainingConfig, names: Names, data, synthetic_data, teacher_logits) -> str:
    """What the run trains on, from ``method``; its inputs checked."""
    method = cfg.method if isinstance(cfg, DistillConfig) else "logits"
    if method == "logits":
        require(not synthetic_data, f"--synthetic-data needs {names('method')} synthetic or both")
    else:
        require(bool(synthetic_data), f"{names('method')} {method} trains on the teacher's generations: give "
                                      "--synthetic-data (a .jsonl from generate)")
        require(teacher_logits is None, f"{names('method')} {method} runs without a teacher-logit cache (the cache "
                                        "covers samples of --data only)")
        require(not cfg.kd_pairs, f"{names('kd_pairs')} with {names('method')} {method}: intermediate losses are "
                                  "for logit distillation on --data only")
    require(bool(data) or method == "synthetic", f"--data is required (unless {names('method')} synthetic)")
    return method


def check_output(out: str, resume: bool) -> Path:
    """OUT is new, empty, or holds a training checkpoint to continue from (never a finished run)."""
    path = Path(out)
    require(not (path / "summary.json").exists(),
            f"--out '{out}' holds a finished run (summary.json; its model is '{path / 'final'}'): choose a new --out "
            f"to train again, or give --student {path / 'final'} to train that model further")
    if resume:
        require(latest_checkpoint(path) is not None, f"--resume: '{out}' holds no training checkpoint")
    elif path.exists() and latest_checkpoint(path) is None:
        require(not any(path.iterdir()), f"--out '{out}' already exists and holds no training checkpoint to resume; "
                                         "choose a new path")
    require(path.parent.exists(), f"--out '{out}': parent directory does not exist")
    check_output_dir(path, "--out")
    return path
