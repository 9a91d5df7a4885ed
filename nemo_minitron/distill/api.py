"""``distill`` and ``finetune``: validate everything, train, write the student and a summary.

    OUT/final/          the trained student, a normal project checkpoint
    OUT/summary.json    steps, tokens, losses, held-out loss and perplexity, throughput
    OUT/metrics.jsonl   one line per step (and per evaluation)
    OUT/tensorboard/    the same as TensorBoard scalars
    OUT/checkpoints/    resumable training state (see checkpointing.py)

A run whose OUT holds a training checkpoint continues from it (also without
``resume=True``); ``resume=True`` on a directory without one is an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from nemo_minitron.distill.checkpointing import latest_checkpoint
from nemo_minitron.distill.losses import LogitLossConfig
from nemo_minitron.distill.model import LayerPair
from nemo_minitron.distill.train import TrainConfig, Trainer
from nemo_minitron.errors import UsageError, require
from nemo_minitron.model.description import ModelDescription

log = logging.getLogger("nemo_minitron")

_FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}


def parse_pairs(text: str | Sequence[str], student: ModelDescription, teacher: ModelDescription) -> list[LayerPair]:
    """'3:7,9:29' (student:teacher layer indices) -> pairs, each checked against both depths."""
    items = text.split(",") if isinstance(text, str) else list(text)
    pairs = []
    for item in filter(None, (i.strip() for i in items)):
        try:
            s, t = (int(x) for x in item.split(":"))
        except ValueError:
            raise UsageError(f"--kd-pairs: '{item}' is not student_layer:teacher_layer (e.g. 3:7)") from None
        require(0 <= s < student.num_layers, f"--kd-pairs {item}: student layer {s} is out of range "
                                             f"0..{student.num_layers - 1}")
        require(0 <= t < teacher.num_layers, f"--kd-pairs {item}: teacher layer {t} is out of range "
                                             f"0..{teacher.num_layers - 1}")
        pairs.append(LayerPair(s, t))
    return pairs


def _tokenizer_fingerprint(checkpoint: str) -> str:
    digest = hashlib.sha256()
    for f in sorted((Path(checkpoint) / "tokenizer").glob("*")):
        if f.name in ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt"):
            digest.update(f.name.encode() + f.read_bytes())
    return digest.hexdigest()


def check_compatible(teacher: ModelDescription, student: ModelDescription, teacher_ckpt: str, student_ckpt: str) -> None:
    """The student must be a model the teacher can teach: a (pruned) descendant of it."""
    require(teacher.vocab_size == student.vocab_size,
            f"--teacher and --student have different vocabularies ({teacher.vocab_size} vs {student.vocab_size})")
    require(_tokenizer_fingerprint(teacher_ckpt) == _tokenizer_fingerprint(student_ckpt),
            "--teacher and --student have different tokenizers")
    require(_FAMILIES[teacher.architecture] == _FAMILIES[student.architecture],
            f"--student ({student.architecture}) is not of the teacher's family ({teacher.architecture})")
    for axis, t, s in (("hidden", teacher.hidden_size, student.hidden_size),
                       ("ffn", teacher.ffn_hidden_size, student.ffn_hidden_size),
                       ("heads", teacher.num_attention_heads, student.num_attention_heads),
                       ("query groups", teacher.num_query_groups, student.num_query_groups),
                       ("layers", teacher.num_layers, student.num_layers)):
        require(s <= t, f"--student is not a descendant of --teacher: its {axis} ({s}) exceeds the teacher's ({t})")
    require(teacher.rope_theta == student.rope_theta and teacher.rope_scaling == student.rope_scaling,
            "--student uses another rotary position encoding than --teacher")


def _projection_init(student_ckpt: str, student: ModelDescription, teacher: ModelDescription) -> torch.Tensor | None:
    """When the student's width was pruned from a model of the teacher's width, start each
    projection as the channel selection (student channel c -> the teacher channel it came from)."""
    from nemo_minitron.checkpoint.store import read_info

    provenance = read_info(student_ckpt).provenance
    kept = (provenance.get("kept") or {}).get("hidden")
    parent = provenance.get("parent_model") or {}
    if not kept or parent.get("hidden_size") != teacher.hidden_size or len(kept) != student.hidden_size:
        return None
    init = torch.zeros(teacher.hidden_size, student.hidden_size)
    init[torch.tensor(kept), torch.arange(student.hidden_size)] = 1.0
    return init


def _check_output(out: str, resume: bool) -> Path:
    path = Path(out)
    if resume:
        require(latest_checkpoint(path) is not None, f"--resume: '{out}' holds no training checkpoint")
    elif path.exists() and latest_checkpoint(path) is None:
        require(not any(path.iterdir()), f"--out '{out}' already exists and holds no training checkpoint to resume; "
                                         "choose a new path")
    require(not (path / "summary.json").exists(), f"--out '{out}' holds a finished run (summary.json)")
    require(path.parent.exists(), f"--out '{out}': parent directory does not exist")
    return path


def _training_config(steps, global_batch, micro_batch, seq_len, lr, min_lr, warmup_steps, weight_decay, clip_grad,
                     eval_every, eval_samples, save_every, seed, logit, pairs, pair_loss, pair_weight) -> TrainConfig:
    for flag, value in (("--steps", steps), ("--global-batch", global_batch), ("--micro-batch", micro_batch),
                        ("--seq-len", seq_len), ("--eval-samples", eval_samples)):
        require(isinstance(value, int) and value >= 1, f"{flag} must be >= 1 (got {value})")
    require(lr > 0, f"--lr must be > 0 (got {lr})")
    require(pair_loss in ("cosine", "mse"), f"--kd-pair-loss must be cosine or mse (got '{pair_loss}')")
    if pair_weight != "auto":
        try:
            pair_weight = float(pair_weight)
        except ValueError:
            raise UsageError(f"--kd-pair-weight must be 'auto' or a number (got '{pair_weight}')") from None
    return TrainConfig(steps=steps, global_batch=global_batch, micro_batch=micro_batch, seq_len=seq_len, lr=lr,
                       min_lr=min_lr, warmup_steps=warmup_steps, weight_decay=weight_decay, clip_grad=clip_grad,
                       eval_every=eval_every, eval_samples=eval_samples, save_every=save_every, seed=seed,
                       logit=logit, pairs=pairs, pair_loss=pair_loss, pair_weight=pair_weight)


def _run(teacher: str | None, student: str, data: Sequence[str], out: str, *, eval_data: Sequence[str] | None,
         cfg_kwargs: dict[str, Any], logit: LogitLossConfig, kd_pairs, pair_loss: str, pair_weight,
         tp: int, pp: int, dtype, resume: bool, progress: bool, split: str | None = None,
         data_cache: str | None = None) -> dict[str, Any]:
    from nemo_minitron.checkpoint.store import (
        CheckpointInfo,
        load_checkpoint,
        load_tokenizer,
        parse_dtype,
        read_info,
        save_checkpoint,
    )
    from nemo_minitron.data.dataset import check_corpus, eval_corpus
    from nemo_minitron.runtime.distributed import check_world_size, init_distributed, is_rank0

    # ---- everything is checked before training starts
    s_info = read_info(student)
    s_desc = s_info.description
    t_desc = None
    if teacher is not None:
        t_desc = read_info(teacher).description
        check_compatible(t_desc, s_desc, teacher, student)
    pairs = parse_pairs(kd_pairs, s_desc, t_desc) if teacher is not None else []
    require(not (pairs and teacher is None), "--kd-pairs needs a teacher")
    require(logit.kind in ("forward", "reverse"), f"--kd-loss must be forward or reverse (got '{logit.kind}')")
    require(logit.temperature > 0, f"--kd-temperature must be > 0 (got {logit.temperature})")
    require(logit.top_k is None or logit.top_k >= 1, f"--kd-top-k must be >= 1 (got {logit.top_k})")
    require(not (logit.top_k and logit.kind == "reverse"),
            "--kd-top-k needs --kd-loss forward (reverse KL is infinite outside the teacher's top-k)")
    cfg = _training_config(logit=logit, pairs=pairs, pair_loss=pair_loss, pair_weight=pair_weight, **cfg_kwargs)
    limit = min(d.max_position_embeddings for d in (s_desc, t_desc) if d is not None)
    require(cfg.seq_len <= limit, f"--seq-len {cfg.seq_len} is longer than the models allow ({limit})")
    s_desc.check_layout(tp, pp)
    if t_desc is not None:
        t_desc.check_layout(tp, pp)
    dp = check_world_size(tp, pp)
    require(cfg.global_batch % (dp * cfg.micro_batch) == 0,
            f"--global-batch {cfg.global_batch} must be a multiple of --micro-batch {cfg.micro_batch} x "
            f"{dp} data-parallel ranks")
    out_path = _check_output(out, resume)
    compute_dtype = parse_dtype(dtype) if isinstance(dtype, str) else (dtype or parse_dtype(s_info.dtype))
    tokenizer = load_tokenizer(student)
    data_kwargs = dict(vocab_size=s_desc.vocab_size, cache_dir=data_cache, tokenizer=tokenizer)
    train_corpus = check_corpus(data, split=split, **data_kwargs)
    require(train_corpus.has_part("train"), f"--split {split} leaves no training part of --data")
    heldout_corpus = eval_corpus(train_corpus, eval_data, **data_kwargs)

    # ---- work
    init_distributed(tp, pp, cfg.seed)
    started = time.time()
    train_samples = train_corpus.dataset(tokenizer, seq_len=cfg.seq_len, seed=cfg.seed, part="train",
                                         num_samples=cfg.steps * cfg.global_batch, progress=progress)
    eval_samples = heldout_corpus.dataset(tokenizer, seq_len=cfg.seq_len, seed=cfg.seed, part="valid",
                                          progress=progress).first(cfg.eval_samples)
    student_model, _ = load_checkpoint(student, dtype=compute_dtype)
    teacher_model = load_checkpoint(teacher, dtype=compute_dtype)[0] if teacher is not None else None
    trainer = Trainer(student_model, teacher_model, Path(student) / "tokenizer", train_samples, eval_samples,
                      out_path, cfg, student_desc=s_desc, teacher_desc=t_desc, progress=progress,
                      projection_init=_projection_init(student, s_desc, t_desc) if pairs else None)
    resumed = trainer.prepare()
    before = None if resumed else trainer.evaluate(student_model)
    kind = "distillation" if teacher is not None else "fine-tuning"
    log.info("%s of %s (%s)%s: %d steps x %d sequences x %d tokens", kind, student, s_desc.summary(),
             f" from {teacher}" if teacher else "", cfg.steps, cfg.global_batch, cfg.seq_len)
    if before is not None:
        trainer.log_record({"kind": "eval", "step": 0, **before})
    result = trainer.train()
    after = trainer.evaluate(student_model)
    trainer.log_record({"kind": "eval", "step": cfg.steps, **after})
    teacher_eval = trainer.evaluate(teacher_model) if teacher_model is not None else None

    provenance = {**{k: v for k, v in s_info.provenance.items() if k != "created"},
                  kind.replace("-", "_"): {"teacher": teacher, "student": student, "data": train_corpus.blend.label,
                                           "steps": cfg.steps}}
    info = CheckpointInfo(s_desc, s_info.dtype, provenance)
    if compute_dtype != torch.float32 and s_info.dtype == "float32":
        student_model.float()
    save_checkpoint(student_model, info, out_path / "final", tokenizer=tokenizer)
    final = result["final_train"]
    summary = {
        "kind": kind, "teacher": teacher, "student": student, "steps": cfg.steps,
        "tokens": cfg.steps * cfg.global_batch * cfg.seq_len,
        "final_loss": final.get("loss"), "final_kd_loss": final.get("kd_loss"), "final_ce_loss": final.get("ce_loss"),
        "final_pair_losses": final.get("pair_losses"),
        "student_before": before, "student_after": after, "teacher_eval": teacher_eval,
        "wall_seconds": round(time.time() - started, 1), "train_seconds": round(result["wall_seconds"], 1),
        "tokens_per_second": result["tokens_per_second"], "trained_steps_this_run": result["trained_steps"],
        "settings": {"global_batch": cfg.global_batch, "micro_batch": cfg.micro_batch, "seq_len": cfg.seq_len,
                     "lr": cfg.lr, "min_lr": cfg.min_lr_value, "warmup_steps": cfg.warmup,
                     "kd_temperature": logit.temperature, "kd_loss": logit.kind, "kd_top_k": logit.top_k,
                     "kd_weight": logit.kd_weight, "ce_weight": logit.ce_weight,
                     "kd_pairs": [f"{p.student}:{p.teacher}" for p in pairs], "tp": tp, "pp": pp, "dp": dp,
                     "dtype": str(compute_dtype).replace("torch.", "")},
    }
    if is_rank0():
        tmp = out_path / ".summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        tmp.replace(out_path / "summary.json")
        msg = f"{kind} done: held-out loss {before['heldout_loss']:.4f} -> " if before else f"{kind} done: held-out loss "
        log.info("%s%.4f%s", msg, after["heldout_loss"],
                 f" (teacher {teacher_eval['heldout_loss']:.4f})" if teacher_eval else "")
    return summary


def distill(teacher: str, student: str, data: Sequence[str], out: str, *, eval_data: Sequence[str] | None = None,
            steps: int, global_batch: int = 8, micro_batch: int = 2, seq_len: int = 512, lr: float = 1e-4,
            min_lr: float | None = None, warmup_steps: int | None = None, weight_decay: float = 0.01,
            clip_grad: float = 1.0, eval_every: int = 0, eval_samples: int = 64, save_every: int = 0,
            kd_temperature: float = 1.0, kd_loss: str = "forward", kd_top_k: int | None = None,
            kd_weight: float = 1.0, ce_weight: float = 0.0, kd_pairs: str | Sequence[str] = "",
            kd_pair_loss: str = "cosine", kd_pair_weight: str | float = "auto", logit_chunk: int = 1024,
            seed: int = 1234, tp: int = 1, pp: int = 1, dtype=None, resume: bool = False,
            split: str | None = None, data_cache: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Distil ``student`` from ``teacher`` (both project checkpoints) on ``data``."""
    require(logit_chunk >= 1, f"--logit-chunk must be >= 1 (got {logit_chunk})")
    from nemo_minitron.checkpoint.store import read_info

    vocab = read_info(student).description.vocab_size
    logit = LogitLossConfig(temperature=kd_temperature, kind=kd_loss, top_k=kd_top_k, kd_weight=kd_weight,
                            ce_weight=ce_weight, chunk_tokens=logit_chunk, vocab_size=vocab)
    return _run(teacher, student, data, out, eval_data=eval_data, logit=logit, kd_pairs=kd_pairs,
                pair_loss=kd_pair_loss, pair_weight=kd_pair_weight, tp=tp, pp=pp, dtype=dtype, resume=resume,
                progress=progress, split=split, data_cache=data_cache, cfg_kwargs=dict(
                    steps=steps, global_batch=global_batch, micro_batch=micro_batch, seq_len=seq_len, lr=lr,
                    min_lr=min_lr, warmup_steps=warmup_steps, weight_decay=weight_decay, clip_grad=clip_grad,
                    eval_every=eval_every, eval_samples=eval_samples, save_every=save_every, seed=seed))


def finetune(model: str, data: Sequence[str], out: str, *, eval_data: Sequence[str] | None = None, steps: int,
             global_batch: int = 8, micro_batch: int = 2, seq_len: int = 512, lr: float = 1e-4,
             min_lr: float | None = None, warmup_steps: int | None = None, weight_decay: float = 0.01,
             clip_grad: float = 1.0, eval_every: int = 0, eval_samples: int = 64, save_every: int = 0,
             logit_chunk: int = 1024, seed: int = 1234, tp: int = 1, pp: int = 1, dtype=None, resume: bool = False,
             split: str | None = None, data_cache: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Plain next-token cross-entropy training (teacher correction, and the baseline to distillation)."""
    from nemo_minitron.checkpoint.store import read_info

    vocab = read_info(model).description.vocab_size
    logit = LogitLossConfig(kd_weight=0.0, ce_weight=1.0, chunk_tokens=logit_chunk, vocab_size=vocab)
    return _run(None, model, data, out, eval_data=eval_data, logit=logit, kd_pairs="", pair_loss="cosine",
                pair_weight="auto", tp=tp, pp=pp, dtype=dtype, resume=resume, progress=progress, split=split,
                data_cache=data_cache, cfg_kwargs=dict(
                    steps=steps, global_batch=global_batch, micro_batch=micro_batch, seq_len=seq_len, lr=lr,
                    min_lr=min_lr, warmup_steps=warmup_steps, weight_decay=weight_decay, clip_grad=clip_grad,
                    eval_every=eval_every, eval_samples=eval_samples, save_every=save_every, seed=seed))
