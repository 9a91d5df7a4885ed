"""``nemo-minitron eval``'s work: the held-out loss and perplexity of one model on data,
and its downstream task accuracy, checked whole before the model is loaded."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

from nemo_minitron.checkpoint.api import describe_model, open_model
from nemo_minitron.checkpoint.store import megatron_checkpoint, require_tokenizer
from nemo_minitron.config import Names, log_settings, to_dict
from nemo_minitron.data.config import DataOptions
from nemo_minitron.data.dataset import check_corpus
from nemo_minitron.data.preprocess import load_any_tokenizer
from nemo_minitron.errors import require
from nemo_minitron.eval_config import EvalConfig
from nemo_minitron.files import check_output_file
from nemo_minitron.evaluate import evaluate
from nemo_minitron.runtime.distributed import check_world_size, init_distributed, is_rank0
from nemo_minitron.runtime.precision import log_compute_dtype, resolve_dtype
from nemo_minitron.tasks.api import resolve_tasks, run_tasks
from nemo_minitron.tasks.config import TaskConfig
from nemo_minitron.tasks.lm import MegatronLM

log = logging.getLogger("nemo_minitron")


def evaluate_model(model: str, data: Sequence[str] | None, cfg: EvalConfig, task_cfg: TaskConfig,
                   data_opts: DataOptions, data_names: Names, *, tp: int, pp: int, seed: int, dtype: str | None,
                   json_out: str | None = None) -> dict[str, Any]:
    """Evaluate ``model`` (a checkpoint, HF directory, .gguf or alias) on the held-out part of
    ``data`` and on the tasks of ``task_cfg``; print the results (rank 0), write them to
    ``json_out`` when given, and return them."""
    if json_out:
        check_output_file(json_out, "--json")
    desc = describe_model(model)
    if megatron_checkpoint(model) is not None:
        require_tokenizer(model, "eval tokenizes --data and --tasks")
    corpus = tokenizer = None
    if data:
        tokenizer = load_any_tokenizer(model, "MODEL")
        # with --split, the validation part of the data: what training on the rest did not see
        corpus = check_corpus(data, vocab_size=desc.vocab_size, split=data_opts.split,
                              split_flag=data_names("split"), cache_dir=data_opts.cache_dir,
                              cache_flag=data_names("cache_dir"), tokenizer=tokenizer, parts=("valid",))
        require(cfg.seq_len <= desc.max_position_embeddings,
                f"--seq-len {cfg.seq_len} exceeds the model's max_position_embeddings "
                f"({desc.max_position_embeddings})")
    desc.check_layout(tp, pp)
    check_world_size(tp, pp)
    tasks = resolve_tasks(task_cfg.tasks, task_cfg.tasks_path) if task_cfg.tasks else None
    compute = resolve_dtype(dtype)
    init_distributed(tp, pp, seed)
    resolved = {"model": model, "data": corpus.blend.label if corpus else None, "dtype": compute.name,
                **to_dict(data_opts), **to_dict(cfg), **to_dict(task_cfg)}
    if is_rank0():
        parts = [f"held-out loss on {corpus.blend.label} ({cfg.seq_len} tokens per sample)"] if corpus else []
        parts += [f"tasks {', '.join(task_cfg.tasks)}"] if tasks is not None else []
        log_settings(log, f"eval of {model}: {' and '.join(parts)}", resolved, json_out)
    log_compute_dtype(compute)
    opened = open_model(model, dtype=compute.torch)
    record = dict(resolved)
    if corpus is not None:
        samples = corpus.dataset(tokenizer, seq_len=cfg.seq_len, seed=seed, part="valid")
        if cfg.max_tokens is not None:
            samples = samples.first(cfg.max_tokens // cfg.seq_len)
        result = evaluate(opened.model, desc.vocab_size, samples, micro_batch=cfg.micro_batch)
        record.update(result.to_dict())
        if is_rank0():
            print(f"{model}: loss {result.loss:.4f}  perplexity {result.perplexity:.2f}  "
                  f"tokens {result.tokens}  samples {result.samples}")
    if tasks is not None:
        lm = MegatronLM(opened.model, opened.description, opened.tokenizer, batch_size=cfg.micro_batch, seed=seed)
        results = run_tasks(lm, tasks, limit=task_cfg.task_limit, num_fewshot=task_cfg.num_fewshot, seed=seed)
        record["tasks"] = {name: r.to_dict() for name, r in results.items()}
        if is_rank0():
            for name, r in results.items():
                shown = "  ".join(f"{k} {v:.4f}" + (f" ± {r.stderr[k]:.4f}" if k in r.stderr else "")
                                  for k, v in r.metrics.items())
                print(f"{model}: {name}: {shown}  ({r.samples} examples)")
    if is_rank0() and json_out:
        Path(json_out).write_text(json.dumps(record, indent=2))
    return record
