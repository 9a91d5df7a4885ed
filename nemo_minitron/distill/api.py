"""``distill`` and ``finetune``: validate everything, train, write the student and a summary.

    OUT/final/          the trained student, a normal project checkpoint
    OUT/summary.json    steps, tokens, losses, held-out loss and perplexity, throughput
    OUT/metrics.jsonl   one line per step (and per evaluation)
    OUT/tensorboard/    the same as TensorBoard scalars
    OUT/checkpoints/    resumable training state (see checkpointing.py)
    OUT/config.yaml     the resolved settings (also logged at the start)

The teacher is a checkpoint (run alongside the student) or a teacher-logit cache
(``teacher_logits``, written by ``teacher-logits``): then no teacher runs, the loss is
forward KL over the cached top-K plus the remainder bucket, and the run trains on the
samples the cache covers.

A run whose OUT holds a training checkpoint continues from it (also without
``resume=True``); ``resume=True`` on a directory without one is an error. A resumed run
whose settings differ from the saved ones (other than logging and checkpoint cadence)
is refused, naming the keys, unless forced; a forced resume follows the new settings,
learning-rate schedule included, and ``summary.json`` lists what changed at which step.

A run is checked whole (``checks.py``: models, cache, method, output; ``corpora.py``: the
data) before the first collective; then it trains (``train.py``) and writes what it
keeps (``outputs.py``); it returns a ``DistillResult`` (``result.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from megatron.core import parallel_state as ps

from nemo_minitron.checkpoint.store import CheckpointInfo, load_checkpoint, load_tokenizer, read_info
from nemo_minitron.config import Names, check_resume, log_settings, resume_safe_fields, to_dict
from nemo_minitron.data.config import DataOptions
from nemo_minitron.distill import outputs
from nemo_minitron.distill.checks import (
    check_cache_settings,
    check_compatible,
    check_descendant,
    check_method,
    check_output,
    tokenizer_fingerprint,
)
from nemo_minitron.distill.config import DistillConfig, TrainingConfig
from nemo_minitron.distill.corpora import synthetic_corpus, training_corpora, training_samples
from nemo_minitron.distill.model import LayerPair, parse_pairs
from nemo_minitron.distill.result import DistillResult
from nemo_minitron.distill.teacher_logits import TeacherLogits
from nemo_minitron.distill.train import Trainer
from nemo_minitron.errors import require
from nemo_minitron.model.builder import training_needs_sequence_parallel
from nemo_minitron.model.description import ModelDescription
from nemo_minitron.runtime.config import StageConfigs, stage_configs
from nemo_minitron.runtime.distributed import check_world_size, init_distributed, is_rank0
from nemo_minitron.runtime.precision import ComputeDtype, log_compute_dtype, resolve_dtype

log = logging.getLogger("nemo_minitron")


def _projection_init(student_ckpt: str, student: ModelDescription, teacher: ModelDescription) -> torch.Tensor | None:
    """When the student's width was pruned from a model of the teacher's width, start each
    projection as the channel selection (student channel c -> the teacher channel it came from)."""
    provenance = read_info(student_ckpt).provenance
    kept = (provenance.get("kept") or {}).get("hidden")
    parent = provenance.get("parent_model") or {}
    if not kept or parent.get("hidden_size") != teacher.hidden_size or len(kept) != student.hidden_size:
        return None
    init = torch.zeros(teacher.hidden_size, student.hidden_size)
    init[torch.tensor(kept), torch.arange(student.hidden_size)] = 1.0
    return init


def load_training_models(student: str, teacher: str | None, dtype: torch.dtype, student_desc: ModelDescription):
    """The student (and teacher) at the current layout, built for training: a
    mixture-of-experts student at TP > 1 trains with sequence parallelism, and then so does
    its teacher (their stages exchange activations split the same way)."""
    sp = training_needs_sequence_parallel(student_desc, ps.get_tensor_model_parallel_world_size())
    student_model, _ = load_checkpoint(student, dtype=dtype, sequence_parallel=sp)
    teacher_model = load_checkpoint(teacher, dtype=dtype, sequence_parallel=sp)[0] if teacher is not None else None
    return student_model, teacher_model


@dataclasses.dataclass
class _Run:
    """A run as checked before any work: its models, data and resolved settings."""

    kind: str  # distillation | fine-tuning
    teacher: str | None
    student: str
    teacher_logits: str | None
    cfg: TrainingConfig
    seed: int
    tp: int
    pp: int
    dp: int
    student_info: CheckpointInfo
    teacher_desc: ModelDescription | None
    cache: TeacherLogits | None
    method: str  # logits | synthetic | both
    pairs: list[LayerPair]
    out: Path
    tokenizer: Any
    train_corpus: Any
    synthetic_corpus: Any
    heldout: Any
    resolved: dict[str, Any]  # what config.yaml holds
    saved: dict[str, Any] | None  # the config.yaml of the run being resumed
    forced: list[str]  # the settings a forced resume changes
    dtype: ComputeDtype


def _check_run(teacher: str | None, student: str, data: Sequence[str], out: str, configs: StageConfigs, *,
               eval_data: Sequence[str] | None, resume: bool, force: bool, force_hint: str,
               teacher_logits: str | None, synthetic_data: Sequence[str] | None) -> _Run:
    """Everything is checked before training starts."""
    cfg, run, data_opts, names, data_names = configs.stage, configs.run, configs.data, configs.names, configs.data_names
    tp, pp = configs.parallel.tp, configs.parallel.pp
    s_info = read_info(student)
    s_desc = s_info.description
    t_desc = cache = None
    if teacher_logits is not None:
        check_cache_settings(cfg, names, teacher)
        cache = TeacherLogits.open(teacher_logits)
        check_descendant(ModelDescription.from_dict(cache.index["teacher_model"]), s_desc, "--teacher-logits")
    elif teacher is not None:
        t_desc = read_info(teacher).description
        check_compatible(t_desc, s_desc, teacher, student)
    method = check_method(cfg, names, data, synthetic_data, teacher_logits)
    pairs = parse_pairs(cfg.kd_pairs, s_desc, t_desc, flag=names("kd_pairs")) if teacher is not None else []
    limit = min(d.max_position_embeddings for d in (s_desc, t_desc) if d is not None)
    require(cfg.seq_len <= limit, f"{names('seq_len')} {cfg.seq_len} is longer than the models allow ({limit})")
    s_desc.check_layout(tp, pp)
    if t_desc is not None:
        t_desc.check_layout(tp, pp)
    require(not training_needs_sequence_parallel(s_desc, tp) or cfg.seq_len % tp == 0,
            f"{names('seq_len')} {cfg.seq_len} must be a multiple of --tp {tp}: a mixture of experts trains with "
            "sequence parallelism (megatron-core's requirement at --tp > 1)")
    require(cfg.moe_aux_loss_coeff is None or s_desc.is_moe,
            f"{names('moe_aux_loss_coeff')} applies to a mixture-of-experts student; this one is "
            f"{s_desc.architecture} with a dense MLP")
    dp = check_world_size(tp, pp)
    require(cfg.global_batch % (dp * cfg.micro_batch) == 0,
            f"{names('global_batch')} {cfg.global_batch} must be a multiple of {names('micro_batch')} "
            f"{cfg.micro_batch} x {dp} data-parallel ranks")
    out_path = check_output(out, resume)
    kind = "distillation" if teacher is not None or cache is not None else "fine-tuning"
    tokenizer = load_tokenizer(student)
    train_corpus, heldout, eval_label = training_corpora(data, eval_data, data_opts, data_names,
                                                         vocab_size=s_desc.vocab_size, tokenizer=tokenizer)
    synthetic = synthetic_corpus(synthetic_data, data_opts, data_names, vocab_size=s_desc.vocab_size,
                                 tokenizer=tokenizer)
    dtype = resolve_dtype(run.dtype, names("dtype"))
    resolved = {"kind": kind, "teacher": teacher, "student": str(student),
                "data": train_corpus.blend.label if train_corpus else None,
                **({"synthetic_data": synthetic.blend.label} if synthetic else {}),
                "eval_data": eval_label, "seed": run.seed, "dtype": dtype.name, **to_dict(data_opts), **to_dict(cfg)}
    if cache is not None:  # which cache, by content: another one is another teacher
        resolved.update(teacher_logits=str(teacher_logits), teacher_logits_id=cache.identity)
        cache.check_settings(tokenizer=tokenizer_fingerprint(student), seq_len=cfg.seq_len, seed=run.seed,
                             vocab_size=s_desc.vocab_size, temperature=cfg.kd_temperature,
                             data=train_corpus.blend.label, split=data_opts.split, names=names,
                             data_names=data_names)
    saved = outputs.saved_config(out_path)
    forced = check_resume(saved, resolved, what=f"the {kind} run in '{out}'", force=force,
                          force_hint=force_hint, ignore=resume_safe_fields(type(cfg), DataOptions))
    return _Run(kind, teacher, student, teacher_logits, cfg, run.seed, tp, pp, dp, s_info, t_desc, cache, method,
                pairs, out_path, tokenizer, train_corpus, synthetic, heldout, resolved, saved, forced, dtype)


def _train(r: _Run, *, progress: bool, stop_at: int | None) -> DistillResult:
    """The work: train, then finish (final student and summary), or stop resumably."""
    cfg, s_desc = r.cfg, r.student_info.description
    init_distributed(r.tp, r.pp, r.seed)
    log_compute_dtype(r.dtype)
    started = time.time()
    train_samples = training_samples(r.method, r.train_corpus, r.synthetic_corpus, cfg, r.tokenizer, seed=r.seed,
                                     progress=progress, cache=r.cache)
    eval_samples = r.heldout.dataset(r.tokenizer, seq_len=cfg.seq_len, seed=r.seed, part="valid",
                                     progress=progress).first(cfg.eval_samples)
    # synthetic: the student learns from the teacher's generations; the teacher does not run
    student_model, teacher_model = load_training_models(r.student, r.teacher if r.method != "synthetic" else None,
                                                        r.dtype.torch, s_desc)
    trainer = Trainer(student_model, teacher_model, train_samples, eval_samples, r.out, cfg, seed=r.seed,
                      student_desc=s_desc, teacher_desc=r.teacher_desc, pairs=r.pairs, progress=progress,
                      projection_init=_projection_init(r.student, s_desc, r.teacher_desc) if r.pairs else None,
                      override_schedule=bool(r.forced), teacher_logits=r.cache)
    resumed = trainer.prepare(config=r.resolved)
    if is_rank0():
        if r.forced:
            outputs.record_forced_resume(r.out, trainer.step, r.forced, r.saved, r.resolved)
        outputs.save_config(r.out, r.resolved)
    before = None if resumed else trainer.evaluate(student_model)
    source = f" from {r.teacher}" if r.teacher else \
        f" from the cached teacher logits {r.teacher_logits}" if r.cache else ""
    if is_rank0():
        log_settings(log, f"{r.kind} of {r.student} ({s_desc.summary()}){source}: {cfg.steps} steps x "
                          f"{cfg.global_batch} sequences x {cfg.seq_len} tokens, lr {cfg.lr:g}", r.resolved,
                     str(r.out / outputs.CONFIG_FILE))
    if before is not None:
        trainer.log_record({"kind": "eval", "step": 0, **before})
    result = trainer.train(stop_at)
    if result["stopped"]:  # a stop signal: the checkpoint is saved, the run continues when started again
        trainer.close()
        log.info("%s stopped by %s at step %d of %d; start it again to continue", r.kind, result["stopped"],
                 trainer.step, cfg.steps)
        return DistillResult("stopped", r.kind, trainer.step, cfg.steps, signal=result["stopped"])
    if trainer.step < cfg.steps:  # stopped early (stop_at): resumable, nothing final written
        last = trainer.last_eval
        if last is None or last["step"] != trainer.step:
            last = {"kind": "eval", "step": trainer.step, **trainer.evaluate(student_model)}
            trainer.log_record(last)
        trainer.close()
        return DistillResult("paused", r.kind, trainer.step, cfg.steps, student_before=before, student_now=last,
                             final_train=result["final_train"])
    summary = _finish(r, trainer, student_model, teacher_model, before, result, started)
    return DistillResult("finished", r.kind, trainer.step, cfg.steps, summary=summary, student_before=before,
                         final_train=result["final_train"])


def _finish(r: _Run, trainer: Trainer, student_model, teacher_model, before: dict[str, float] | None,
            result: dict[str, Any], started: float) -> dict[str, Any]:
    """Every step trained: evaluate, save OUT/final and write summary.json (returned)."""
    cfg = r.cfg
    after = trainer.evaluate(student_model)
    trainer.log_record({"kind": "eval", "step": cfg.steps, **after})
    teacher_eval = trainer.evaluate(teacher_model) if teacher_model is not None else None
    provenance = {r.kind.replace("-", "_"): {
        "teacher": r.teacher, "student": r.student, "data": r.train_corpus.blend.label if r.train_corpus else None,
        **({"method": r.method, "synthetic_data": r.synthetic_corpus.blend.label} if r.synthetic_corpus else {}),
        "steps": cfg.steps, **({"teacher_logits": str(r.teacher_logits)} if r.cache else {})}}
    outputs.save_final(student_model, r.student_info, r.out, provenance=provenance, compute_dtype=r.dtype.torch,
                       tokenizer=r.tokenizer)
    final = result["final_train"]
    summary = {
        "kind": r.kind, "teacher": r.teacher, "student": r.student, "steps": cfg.steps,
        "teacher_logits": str(r.teacher_logits) if r.cache is not None else None,
        "tokens": cfg.steps * cfg.global_batch * cfg.seq_len,
        "final_loss": final.get("loss"), "final_kd_loss": final.get("kd_loss"), "final_ce_loss": final.get("ce_loss"),
        "final_pair_losses": final.get("pair_losses"), "final_moe_aux_loss": final.get("moe_aux_loss"),
        "student_before": before, "student_after": after, "teacher_eval": teacher_eval,
        "wall_seconds": round(time.time() - started, 1), "train_seconds": round(result["wall_seconds"], 1),
        "tokens_per_second": result["tokens_per_second"], "trained_steps_this_run": result["trained_steps"],
        "config": r.resolved,
        # forced resumes: at which step which settings changed (the schedule follows the new ones)
        "forced_resumes": outputs.forced_resumes(r.out),
        "layout": {"tp": r.tp, "pp": r.pp, "dp": r.dp, "dtype": r.dtype.name, "dtype_reason": r.dtype.describe(),
                   "lr_min": cfg.min_lr_value, "warmup_steps": cfg.warmup,
                   "kd_pairs": [f"{p.student}:{p.teacher}" for p in r.pairs]},
    }
    trainer.close()
    if is_rank0():
        outputs.write_summary(r.out, summary)
        msg = f"{r.kind} done: held-out loss {before['heldout_loss']:.4f} -> " if before else \
            f"{r.kind} done: held-out loss "
        log.info("%s%.4f%s", msg, after["heldout_loss"],
                 f" (teacher {teacher_eval['heldout_loss']:.4f})" if teacher_eval else "")
    return summary


def _run(teacher: str | None, student: str, data: Sequence[str], out: str, configs: StageConfigs, *,
         eval_data: Sequence[str] | None, resume: bool, force: bool, progress: bool, force_hint: str,
         teacher_logits: str | None = None, stop_at: int | None = None,
         synthetic_data: Sequence[str] | None = None) -> DistillResult:
    checked = _check_run(teacher, student, data, out, configs, eval_data=eval_data, resume=resume, force=force,
                         force_hint=force_hint, teacher_logits=teacher_logits, synthetic_data=synthetic_data)
    return _train(checked, progress=progress, stop_at=stop_at)


def distill(teacher: str | None, student: str, data: Sequence[str], out: str, config: DistillConfig | None = None, *,
            teacher_logits: str | None = None, eval_data: Sequence[str] | None = None, resume: bool = False,
            force: bool = False, progress: bool = True, names: Names | None = None, data_names: Names | None = None,
            force_hint: str = "--force", stop_at: int | None = None, synthetic_data: Sequence[str] | None = None,
            **options: Any) -> DistillResult:
    """Distil ``student`` from ``teacher`` on ``data``; either may be a project checkpoint or a
    Megatron-LM / Megatron-Bridge (an ``iter_N`` directory chooses the iteration) / NeMo 2 one.
    With ``teacher=None`` and ``teacher_logits`` a cache directory, from the cached teacher.

    ``config``: a DistillConfig (defaults if None); ``options``: any of its fields, or
    ``tp``, ``pp``, ``seed``, ``dtype``, ``split``, ``cache_dir``, overriding it. A run whose ``out`` holds a training
    checkpoint continues from it, unless its settings changed: then ``force=True`` is
    needed, and the new settings (learning-rate schedule included) apply from there.
    ``stop_at``: train only up to that step on the full schedule, save a training
    checkpoint there and evaluate (the result's status is ``paused``, with ``student_now``);
    a later call continues (successive halving in ``search``).

    ``synthetic_data``: the teacher's generations (a ``generate`` JSONL: only completion
    tokens are trained on), for ``method="synthetic"`` (cross-entropy on them alone; the
    teacher does not run, ``data`` may be empty) or ``"both"`` (KD on ``data`` plus
    cross-entropy on them, a ``synthetic_fraction`` of every step's samples).

    Returns how the run ended: a DistillResult (``summary``: the content of summary.json
    when it finished)."""
    require(teacher is not None or teacher_logits is not None, "give --teacher or --teacher-logits")
    configs = stage_configs(DistillConfig, config, options, names, data_names)
    return _run(teacher, student, data, out, configs, eval_data=eval_data, resume=resume, force=force,
                progress=progress, force_hint=force_hint, teacher_logits=teacher_logits, stop_at=stop_at,
                synthetic_data=synthetic_data)


def finetune(model: str, data: Sequence[str], out: str, config: TrainingConfig | None = None, *,
             eval_data: Sequence[str] | None = None, resume: bool = False, force: bool = False,
             progress: bool = True, names: Names | None = None, data_names: Names | None = None,
             force_hint: str = "--force", **options: Any) -> DistillResult:
    """Plain next-token cross-entropy training (teacher correction, and the baseline to distillation)."""
    if config is not None and type(config) is not TrainingConfig:  # e.g. a recipe's teacher_correction
        config = TrainingConfig(**{f.name: getattr(config, f.name) for f in dataclasses.fields(TrainingConfig)})
    configs = stage_configs(TrainingConfig, config, options, names, data_names)
    return _run(None, model, data, out, configs, eval_data=eval_data, resume=resume, force=force, progress=progress,
                force_hint=force_hint)
