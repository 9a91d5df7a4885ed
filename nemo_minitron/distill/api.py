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
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from nemo_minitron.config import Names
from nemo_minitron.data.dataset import check_corpus
from nemo_minitron.data.config import DataOptions
from nemo_minitron.distill.checkpointing import latest_checkpoint
from nemo_minitron.distill.config import DistillConfig, TrainingConfig
from nemo_minitron.distill.model import LayerPair
from nemo_minitron.distill.train import Trainer
from nemo_minitron.errors import UsageError, require
from nemo_minitron.families import family
from nemo_minitron.model.description import ModelDescription
from nemo_minitron.runtime.config import ParallelConfig, RunConfig

log = logging.getLogger("nemo_minitron")

CONFIG_FILE = "config.yaml"        # the resolved settings of the run, checked on resume
RESUMES_FILE = "resumes.jsonl"     # forced resumes: the step and the settings that changed
DEFAULT_EVAL_DATA = "builtin:heldout"

def parse_pairs(items: str | Sequence[str], student: ModelDescription, teacher: ModelDescription,
                flag: str = "--kd-pairs") -> list[LayerPair]:
    """['3:7', 'embedding:embedding'] or '3:7,final_norm:final_norm' (student:teacher; a
    0-indexed layer output, the embedding output or the final norm's output) -> pairs,
    each checked against both depths."""
    from nemo_minitron.distill.model import EMBEDDING, FINAL_NORM

    def point(value: str, item: str, side: str, depth: int):
        value = value.strip()
        if value in (EMBEDDING, FINAL_NORM):
            return value
        try:
            index = int(value)
        except ValueError:
            raise UsageError(f"{flag}: '{item}' is not student:teacher, each a layer number, {EMBEDDING} or "
                             f"{FINAL_NORM} (e.g. 3:7)") from None
        require(0 <= index < depth, f"{flag} {item}: {side} layer {index} is out of range 0..{depth - 1}")
        return index

    items = items.split(",") if isinstance(items, str) else list(items)
    pairs = []
    for item in filter(None, (str(i).strip() for i in items)):
        parts = item.split(":")
        require(len(parts) == 2, f"{flag}: '{item}' is not student_layer:teacher_layer (e.g. 3:7)")
        pairs.append(LayerPair(point(parts[0], item, "student", student.num_layers),
                               point(parts[1], item, "teacher", teacher.num_layers)))
    return pairs


def tokenizer_fingerprint(checkpoint: str) -> str:
    from nemo_minitron.checkpoint.store import require_tokenizer

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
    from nemo_minitron.prune.targets import sizes

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


def load_training_models(student: str, teacher: str | None, dtype: torch.dtype, student_desc: ModelDescription):
    """The student (and teacher) at the current layout, built for training: a
    mixture-of-experts student at TP > 1 trains with sequence parallelism, and then so does
    its teacher (their stages exchange activations split the same way)."""
    from megatron.core import parallel_state as ps

    from nemo_minitron.checkpoint.store import load_checkpoint
    from nemo_minitron.model.builder import training_needs_sequence_parallel

    sp = training_needs_sequence_parallel(student_desc, ps.get_tensor_model_parallel_world_size())
    student_model, _ = load_checkpoint(student, dtype=dtype, sequence_parallel=sp)
    teacher_model = load_checkpoint(teacher, dtype=dtype, sequence_parallel=sp)[0] if teacher is not None else None
    return student_model, teacher_model


def training_corpora(data: Sequence[str] | None, eval_data: Sequence[str] | None, data_opts: DataOptions,
                     data_names: Names, *, vocab_size: int, tokenizer):
    """The training data (checked, with a training part; None without ``data``) and the
    held-out data of a run, and how the held-out data is named in logs: ``eval_data`` when
    given, else the training data's validation part when its split has one, else the
    built-in held-out split."""
    from nemo_minitron.data.dataset import eval_corpus

    data_kwargs = dict(vocab_size=vocab_size, cache_dir=data_opts.cache_dir, cache_flag=data_names("cache_dir"),
                       tokenizer=tokenizer)
    if not data:  # a run on the teacher's generations alone
        heldout = check_corpus(list(eval_data or [DEFAULT_EVAL_DATA]), flag="--eval-data", **data_kwargs)
        train, label = None, heldout.blend.label
    else:
        train = check_corpus(data, split=data_opts.split, split_flag=data_names("split"), **data_kwargs)
        require(train.has_part("train"), f"{data_names('split')} {data_opts.split} leaves no training part of --data")
        heldout = eval_corpus(train, eval_data, default=[DEFAULT_EVAL_DATA], **data_kwargs)
        label = f"the validation part of {train.blend.label}" if heldout is train else heldout.blend.label
    require(not heldout.masked, "--eval-data: completions (prompt + completion records) are training data; "
                                "evaluate on text")
    return train, heldout, label


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


def _saved_config(out: Path) -> dict[str, Any] | None:
    """The resolved config a resumable run in ``out`` was started (or last forced) with."""
    import yaml

    if latest_checkpoint(out) is None or not (out / CONFIG_FILE).is_file():
        return None
    return yaml.safe_load((out / CONFIG_FILE).read_text())


def _check_cache_settings(cfg: DistillConfig, names: Names, teacher: str | None) -> None:
    require(teacher is None, "give --teacher or --teacher-logits, not both")
    require(not cfg.kd_pairs, f"--teacher-logits with {names('kd_pairs')}: intermediate losses need the live "
                              f"teacher (give --teacher, or drop {names('kd_pairs')})")
    require(cfg.kd_loss == "forward", f"--teacher-logits needs {names('kd_loss')} forward (the cache holds the "
                                      "teacher's top-K, reverse KL needs all of it)")
    require(cfg.kd_top_k is None, f"--teacher-logits with {names('kd_top_k')}: the cache's K was chosen when it "
                                  "was written (teacher-logits --top-k)")


def _check_method(cfg: TrainingConfig, names: Names, data, synthetic_data, teacher_logits) -> str:
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


def _training_samples(method: str, train_corpus, synthetic_corpus, cfg: TrainingConfig, tokenizer, *, seed: int,
                      progress: bool, cache=None):
    """The run's training samples (collective): the data's, the generations', or both interleaved."""
    from nemo_minitron.distill.loader import MixedSamples

    total = cfg.steps * cfg.global_batch
    if method == "synthetic":
        return synthetic_corpus.dataset(tokenizer, seq_len=cfg.seq_len, seed=seed, part="train", progress=progress,
                                        num_samples=total)
    if method == "both":
        share = cfg.synthetic_fraction
        real = train_corpus.dataset(tokenizer, seq_len=cfg.seq_len, seed=seed, part="train", progress=progress,
                                    num_samples=total - int(total * share) + 1)
        synthetic = synthetic_corpus.dataset(tokenizer, seq_len=cfg.seq_len, seed=seed, part="train",
                                             progress=progress, num_samples=int(total * share) + 1)
        return MixedSamples(real, synthetic, share, total)
    # the cache was computed for the data set it names (built with its sample count): the
    # very samples the live teacher reads when steps x global batch equals that count
    samples = train_corpus.dataset(tokenizer, seq_len=cfg.seq_len, seed=seed, part="train", progress=progress,
                                   num_samples=cache.dataset_samples if cache is not None else total)
    if cache is not None:
        cache.check_samples(samples)
        samples = samples.first(cache.num_samples)  # the samples the cache covers
    return samples


def _run(teacher: str | None, student: str, data: Sequence[str], out: str, *, cfg: TrainingConfig,
         parallel: ParallelConfig, run: RunConfig, data_opts: DataOptions, eval_data: Sequence[str] | None,
         resume: bool, force: bool, progress: bool, names: Names, data_names: Names,
         force_hint: str, teacher_logits: str | None = None, stop_at: int | None = None,
         synthetic_data: Sequence[str] | None = None) -> dict[str, Any]:
    from nemo_minitron.checkpoint.store import CheckpointInfo, load_tokenizer, parse_dtype, read_info, save_checkpoint
    from nemo_minitron.config import check_resume, resume_safe_fields, to_dict, yaml_text
    from nemo_minitron.runtime.distributed import check_world_size, init_distributed, is_rank0

    # ---- everything is checked before training starts
    tp, pp = parallel.tp, parallel.pp
    s_info = read_info(student)
    s_desc = s_info.description
    t_desc = cache = None
    if teacher_logits is not None:
        from nemo_minitron.distill.teacher_logits import TeacherLogits

        _check_cache_settings(cfg, names, teacher)
        cache = TeacherLogits.open(teacher_logits)
        check_descendant(ModelDescription.from_dict(cache.index["teacher_model"]), s_desc, "--teacher-logits")
    elif teacher is not None:
        t_desc = read_info(teacher).description
        check_compatible(t_desc, s_desc, teacher, student)
    method = _check_method(cfg, names, data, synthetic_data, teacher_logits)
    pairs = parse_pairs(cfg.kd_pairs, s_desc, t_desc, flag=names("kd_pairs")) if teacher is not None else []
    limit = min(d.max_position_embeddings for d in (s_desc, t_desc) if d is not None)
    require(cfg.seq_len <= limit, f"{names('seq_len')} {cfg.seq_len} is longer than the models allow ({limit})")
    s_desc.check_layout(tp, pp)
    if t_desc is not None:
        t_desc.check_layout(tp, pp)
    from nemo_minitron.model.builder import training_needs_sequence_parallel

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
    out_path = _check_output(out, resume)
    kind = "distillation" if teacher is not None or cache is not None else "fine-tuning"
    tokenizer = load_tokenizer(student)
    train_corpus, heldout, eval_label = training_corpora(data, eval_data, data_opts, data_names,
                                                         vocab_size=s_desc.vocab_size, tokenizer=tokenizer)
    # generations are training data only: read whole, no split
    synthetic_corpus = check_corpus(list(synthetic_data), flag="--synthetic-data", vocab_size=s_desc.vocab_size,
                                    cache_dir=data_opts.cache_dir, cache_flag=data_names("cache_dir"),
                                    tokenizer=tokenizer) if synthetic_data else None
    resolved = {"kind": kind, "teacher": teacher, "student": str(student),
                "data": train_corpus.blend.label if train_corpus else None,
                **({"synthetic_data": synthetic_corpus.blend.label} if synthetic_corpus else {}),
                "eval_data": eval_label, "seed": run.seed, "dtype": run.dtype, **to_dict(data_opts), **to_dict(cfg)}
    if cache is not None:  # which cache, by content: another one is another teacher
        resolved.update(teacher_logits=str(teacher_logits), teacher_logits_id=cache.identity)
        cache.check_settings(tokenizer=tokenizer_fingerprint(student), seq_len=cfg.seq_len, seed=run.seed,
                             vocab_size=s_desc.vocab_size, temperature=cfg.kd_temperature,
                             data=train_corpus.blend.label, split=data_opts.split, names=names,
                             data_names=data_names)
    saved = _saved_config(out_path)
    forced = check_resume(saved, resolved, what=f"the {kind} run in '{out}'", force=force,
                          force_hint=force_hint, ignore=resume_safe_fields(type(cfg), DataOptions))
    compute_dtype = parse_dtype(run.dtype, names("dtype")) if run.dtype else parse_dtype(s_info.dtype)

    # ---- work
    init_distributed(tp, pp, run.seed)
    if is_rank0():
        log.info("%s config:\n%s", kind, yaml_text(resolved).rstrip())
    started = time.time()
    train_samples = _training_samples(method, train_corpus, synthetic_corpus, cfg, tokenizer, seed=run.seed,
                                      progress=progress, cache=cache)
    eval_samples = heldout.dataset(tokenizer, seq_len=cfg.seq_len, seed=run.seed, part="valid",
                                   progress=progress).first(cfg.eval_samples)
    # synthetic: the student learns from the teacher's generations; the teacher does not run
    student_model, teacher_model = load_training_models(student, teacher if method != "synthetic" else None,
                                                        compute_dtype, s_desc)
    trainer = Trainer(student_model, teacher_model, train_samples, eval_samples, out_path, cfg, seed=run.seed,
                      student_desc=s_desc, teacher_desc=t_desc, pairs=pairs, progress=progress,
                      projection_init=_projection_init(student, s_desc, t_desc) if pairs else None,
                      override_schedule=bool(forced), teacher_logits=cache)
    resumed = trainer.prepare(config=resolved)
    if is_rank0():
        if forced:
            record = {"step": trainer.step, "changed": {k: [flat_get(saved, k), flat_get(resolved, k)]
                                                        for k in forced}}
            with open(out_path / RESUMES_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")
            log.warning("resuming at step %d with changed settings (forced): %s", trainer.step,
                        ", ".join(f"{k} {a} -> {b}" for k, (a, b) in record["changed"].items()))
        tmp = out_path / f".{CONFIG_FILE}.tmp"
        tmp.write_text(yaml_text(resolved))
        tmp.replace(out_path / CONFIG_FILE)
    before = None if resumed else trainer.evaluate(student_model)
    source = f" from {teacher}" if teacher else f" from the cached teacher logits {teacher_logits}" if cache else ""
    log.info("%s of %s (%s)%s: %d steps x %d sequences x %d tokens", kind, student, s_desc.summary(), source,
             cfg.steps, cfg.global_batch, cfg.seq_len)
    if before is not None:
        trainer.log_record({"kind": "eval", "step": 0, **before})
    result = trainer.train(stop_at)
    if result["stopped"]:  # a stop signal: the checkpoint is saved, the run continues when started again
        trainer.close()
        log.info("%s stopped by %s at step %d of %d; start it again to continue", kind, result["stopped"],
                 trainer.step, cfg.steps)
        return {"kind": kind, "stopped": result["stopped"], "step": trainer.step, "steps": cfg.steps}
    if trainer.step < cfg.steps:  # stopped early (stop_at): resumable, nothing final written
        last = trainer.last_eval
        if last is None or last["step"] != trainer.step:
            last = {"kind": "eval", "step": trainer.step, **trainer.evaluate(student_model)}
            trainer.log_record(last)
        trainer.close()
        return {"stopped_at": trainer.step, "student_before": before, "student_now": last,
                "final_train": result["final_train"]}
    after = trainer.evaluate(student_model)
    trainer.log_record({"kind": "eval", "step": cfg.steps, **after})
    teacher_eval = trainer.evaluate(teacher_model) if teacher_model is not None else None

    provenance = {**{k: v for k, v in s_info.provenance.items() if k != "created"},
                  kind.replace("-", "_"): {"teacher": teacher, "student": student,
                                           "data": train_corpus.blend.label if train_corpus else None,
                                           **({"method": method, "synthetic_data": synthetic_corpus.blend.label}
                                              if synthetic_corpus else {}),
                                           "steps": cfg.steps,
                                           **({"teacher_logits": str(teacher_logits)} if cache else {})}}
    info = CheckpointInfo(s_desc, s_info.dtype, provenance)
    if compute_dtype != torch.float32 and s_info.dtype == "float32":
        student_model.float()
    save_checkpoint(student_model, info, out_path / "final", tokenizer=tokenizer)
    final = result["final_train"]
    resumes = [json.loads(line) for line in (out_path / RESUMES_FILE).read_text().splitlines() if line.strip()] \
        if (out_path / RESUMES_FILE).is_file() else []
    summary = {
        "kind": kind, "teacher": teacher, "student": student, "steps": cfg.steps,
        "teacher_logits": str(teacher_logits) if cache is not None else None,
        "tokens": cfg.steps * cfg.global_batch * cfg.seq_len,
        "final_loss": final.get("loss"), "final_kd_loss": final.get("kd_loss"), "final_ce_loss": final.get("ce_loss"),
        "final_pair_losses": final.get("pair_losses"), "final_moe_aux_loss": final.get("moe_aux_loss"),
        "student_before": before, "student_after": after, "teacher_eval": teacher_eval,
        "wall_seconds": round(time.time() - started, 1), "train_seconds": round(result["wall_seconds"], 1),
        "tokens_per_second": result["tokens_per_second"], "trained_steps_this_run": result["trained_steps"],
        "config": resolved,
        # forced resumes: at which step which settings changed (the schedule follows the new ones)
        "forced_resumes": resumes,
        "layout": {"tp": tp, "pp": pp, "dp": dp, "dtype": str(compute_dtype).replace("torch.", ""),
                   "lr_min": cfg.min_lr_value, "warmup_steps": cfg.warmup,
                   "kd_pairs": [f"{p.student}:{p.teacher}" for p in pairs]},
    }
    trainer.close()
    if is_rank0():
        tmp = out_path / ".summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        tmp.replace(out_path / "summary.json")
        msg = f"{kind} done: held-out loss {before['heldout_loss']:.4f} -> " if before else f"{kind} done: held-out loss "
        log.info("%s%.4f%s", msg, after["heldout_loss"],
                 f" (teacher {teacher_eval['heldout_loss']:.4f})" if teacher_eval else "")
    return summary


def flat_get(tree: dict[str, Any] | None, key: str) -> Any:
    from nemo_minitron.config import flatten

    return flatten(tree or {}).get(key)


def _configs(cls, config, options: dict[str, Any], names: Names | None, data_names: Names | None):
    from nemo_minitron.config import build, cli_names, split_overrides

    stage, par, run, dat = split_overrides(options, cls, ParallelConfig, RunConfig, DataOptions)
    names = names or cli_names(cls)
    data_names = data_names or cli_names(DataOptions)
    return dict(cfg=build(cls, config, names, **stage), parallel=build(ParallelConfig, None, names, **par),
                run=build(RunConfig, None, names, **run), data_opts=build(DataOptions, None, data_names, **dat),
                names=names, data_names=data_names)


def distill(teacher: str | None, student: str, data: Sequence[str], out: str, config: DistillConfig | None = None, *,
            teacher_logits: str | None = None, eval_data: Sequence[str] | None = None, resume: bool = False,
            force: bool = False, progress: bool = True, names: Names | None = None, data_names: Names | None = None,
            force_hint: str = "--force", stop_at: int | None = None, synthetic_data: Sequence[str] | None = None,
            **options: Any) -> dict[str, Any]:
    """Distil ``student`` from ``teacher`` on ``data``; either may be a project checkpoint or a
    Megatron-LM / Megatron-Bridge (an ``iter_N`` directory chooses the iteration) / NeMo 2 one.
    With ``teacher=None`` and ``teacher_logits`` a cache directory, from the cached teacher.

    ``config``: a DistillConfig (defaults if None); ``options``: any of its fields, or
    ``tp``, ``pp``, ``seed``, ``dtype``, ``split``, ``cache_dir``, overriding it. A run whose ``out`` holds a training
    checkpoint continues from it, unless its settings changed: then ``force=True`` is
    needed, and the new settings (learning-rate schedule included) apply from there.
    ``stop_at``: train only up to that step on the full schedule, save a training
    checkpoint there and evaluate (returns ``{"stopped_at", "student_now", ...}``); a later
    call continues (successive halving in ``search``).

    ``synthetic_data``: the teacher's generations (a ``generate`` JSONL: only completion
    tokens are trained on), for ``method="synthetic"`` (cross-entropy on them alone; the
    teacher does not run, ``data`` may be empty) or ``"both"`` (KD on ``data`` plus
    cross-entropy on them, a ``synthetic_fraction`` of every step's samples)."""
    require(teacher is not None or teacher_logits is not None, "give --teacher or --teacher-logits")
    return _run(teacher, student, data, out, eval_data=eval_data, resume=resume, force=force, progress=progress,
                force_hint=force_hint, teacher_logits=teacher_logits, stop_at=stop_at, synthetic_data=synthetic_data,
                **_configs(DistillConfig, config, options, names, data_names))


def finetune(model: str, data: Sequence[str], out: str, config: TrainingConfig | None = None, *,
             eval_data: Sequence[str] | None = None, resume: bool = False, force: bool = False,
             progress: bool = True, names: Names | None = None, data_names: Names | None = None,
             force_hint: str = "--force", **options: Any) -> dict[str, Any]:
    """Plain next-token cross-entropy training (teacher correction, and the baseline to distillation)."""
    if config is not None and type(config) is not TrainingConfig:  # e.g. a recipe's teacher_correction
        config = TrainingConfig(**{f.name: getattr(config, f.name) for f in dataclasses.fields(TrainingConfig)})
    return _run(None, model, data, out, eval_data=eval_data, resume=resume, force=force, progress=progress,
                force_hint=force_hint, **_configs(TrainingConfig, config, options, names, data_names))
