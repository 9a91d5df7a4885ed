"""``generate``: prompts in, a JSONL file of completions out, at any TP/PP/DP layout.

Output records (one a line, in prompt order)::

    {"index": 0, "prompt": "...", "prompt_ids": [...], "completion": "...", "prompt_tokens": 12,
     "completion_tokens": 32, "completion_ids": [...], "finish_reason": "length"}

(the token ids let ``distill --synthetic-data`` train on exactly the teacher's tokens).

(``messages`` too when the prompt was a chat). Records are appended to ``OUT.partial``
one batch at a time, flushed to disk, and the file is renamed to ``OUT`` when every
prompt is done. A killed run started again with the same settings drops a torn last
line, goes back to the last whole batch and continues from there; each batch's samples
depend only on ``seed`` and the batch's position, so the resumed file equals an
uninterrupted one. Data-parallel ranks take turns at batches; rank 0 writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import torch.distributed as dist
from megatron.core import parallel_state as ps
from tqdm import tqdm

from nemo_minitron.checkpoint.api import describe_model, model_tokenizer, open_model
from nemo_minitron.config import Names, log_settings, to_dict
from nemo_minitron.data.dataset import check_corpus
from nemo_minitron.errors import UsageError, require
from nemo_minitron.files import check_new_output
from nemo_minitron.generate.config import GenerateConfig
from nemo_minitron.generate.engine import TextGenerator
from nemo_minitron.generate.prompts import Prompt, data_prefixes, read_prompt_file
from nemo_minitron.runtime.config import stage_configs
from nemo_minitron.runtime.distributed import barrier, broadcast_object, check_world_size, init_distributed, is_rank0
from nemo_minitron.runtime.precision import log_compute_dtype, resolve_dtype

log = logging.getLogger("nemo_minitron")


def check_context(prompts: Sequence[Prompt], max_new_tokens: int, context: int,
                  flag: str = "--max-new-tokens") -> None:
    """Every prompt plus its new tokens must fit the model's context."""
    require(max_new_tokens < context, f"{flag} {max_new_tokens} is beyond the model's context of {context} tokens")
    for p in prompts:
        require(len(p.tokens) + max_new_tokens <= context,
                f"{flag} {max_new_tokens}: {p.source} has {len(p.tokens)} tokens, and with the new tokens that is "
                f"beyond the model's context of {context} tokens")


class ResumableJsonl:
    """``OUT.partial`` (records) and ``OUT.partial.json`` (the settings that made them);
    ``finish`` renames the records to ``OUT``. Rank 0 only."""

    def __init__(self, out: Path, fingerprint: dict, batch_size: int):
        self.out, self.batch_size = out, batch_size
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True))  # as it reads back
        self.partial = out.with_name(out.name + ".partial")
        self.meta = out.with_name(out.name + ".partial.json")

    def resume(self) -> int:
        """How many records are complete (whole batches); a torn or partial tail is cut off."""
        if not self.partial.exists():
            self.meta.write_text(json.dumps(self.fingerprint, sort_keys=True))
            self.partial.write_bytes(b"")
            return 0
        try:
            previous = json.loads(self.meta.read_text())
        except (OSError, json.JSONDecodeError):
            previous = None
        require(previous == self.fingerprint,
                f"--out '{self.out}': '{self.partial}' was left by a run with other settings or prompts; remove it "
                f"and '{self.meta}', or rerun with the same settings to continue it")
        data = self.partial.read_bytes()
        offsets, end = [], 0
        for line in data.split(b"\n")[:-1]:  # the part after the last newline is torn
            try:
                json.loads(line)
            except json.JSONDecodeError:
                break
            end += len(line) + 1
            offsets.append(end)
        done = len(offsets) - len(offsets) % self.batch_size
        with open(self.partial, "r+b") as f:
            f.truncate(offsets[done - 1] if done else 0)
        return done

    def append(self, records: Sequence[dict]) -> None:
        with open(self.partial, "ab") as f:
            f.write(b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records))
            f.flush()
            os.fsync(f.fileno())

    def finish(self) -> None:
        os.replace(self.partial, self.out)
        self.meta.unlink(missing_ok=True)


def _resume(writer: ResumableJsonl) -> int | str:
    try:
        return writer.resume()
    except UsageError as e:
        return str(e)


def _fingerprint(model: str, prompts: Sequence[Prompt], cfg: GenerateConfig, seed: int) -> dict:
    digest = hashlib.sha1()
    for p in prompts:
        digest.update(json.dumps(p.tokens).encode())
    label = str(Path(model).resolve()) if Path(model).exists() else str(model)
    return {"model": label, "prompts": len(prompts), "prompts_sha1": digest.hexdigest(), "config": to_dict(cfg),
            "seed": seed}


def _record(index: int, prompt: Prompt, result) -> dict:
    record = {"index": index, "prompt": prompt.text, "prompt_ids": list(prompt.tokens)}
    if prompt.messages is not None:
        record["messages"] = prompt.messages
    record.update(completion=result.text, prompt_tokens=len(prompt.tokens), completion_tokens=len(result.tokens),
                  completion_ids=result.tokens, finish_reason=result.finish_reason)
    return record


def _gather_round(records: list[dict]) -> list[list[dict]] | None:
    """Each data-parallel rank's records, on global rank 0 (None elsewhere)."""
    dp = ps.get_data_parallel_world_size()
    if dp == 1:
        return [records] if dist.get_rank() == 0 else None
    if ps.get_tensor_model_parallel_rank() != 0 or ps.get_pipeline_model_parallel_rank() != 0:
        return None  # rank 0's data-parallel group holds every replica's copy
    group = ps.get_data_parallel_group()
    out = [None] * dp if dist.get_rank() == 0 else None
    dist.gather_object(records, out, dst=dist.get_global_rank(group, 0), group=group)
    return out


def generate(model: str, out: str, config: GenerateConfig | None = None, *, prompts: str | None = None,
             data: Sequence[str] | None = None, progress: bool = True, names: Names | None = None,
             data_names: Names | None = None, **options) -> Path:
    """Complete every prompt with ``model`` (checkpoint, HF directory, .gguf or alias); write ``out``.

    Prompts come from ``prompts`` (a file) or ``data`` (with ``prefix_tokens``; its training
    part under ``split``, so that generations never see held-out text).
    ``config``: a GenerateConfig (defaults if None); ``options``: any of its fields, or
    ``tp``, ``pp``, ``seed``, ``dtype``, ``split``, ``cache_dir``, overriding it."""
    # ---- everything the user gave is checked before any work
    configs = stage_configs(GenerateConfig, config, options, names, data_names)
    cfg, run_cfg, data_opts, names, data_names = configs.stage, configs.run, configs.data, configs.names, \
        configs.data_names
    tp, pp, seed, batch_size = configs.parallel.tp, configs.parallel.pp, run_cfg.seed, cfg.batch_size
    sampling = cfg.sampling()
    out_path = check_new_output(out, "--out")
    require((prompts is None) != (data is None), "give either --prompts FILE or --data SPEC ... --prefix-tokens N")
    require(data is None or cfg.prefix_tokens is not None,
            f"--data needs {names('prefix_tokens')} N (the prompt length in tokens)")
    require(prompts is None or cfg.prefix_tokens is None, f"{names('prefix_tokens')} goes with --data, not with "
                                                          "--prompts")
    desc = describe_model(model)
    desc.check_layout(tp, pp)
    check_world_size(tp, pp)
    tokenizer = model_tokenizer(model)
    corpus = None
    if prompts is not None:
        items = read_prompt_file(prompts, tokenizer)[:cfg.limit]
        check_context(items, sampling.max_new_tokens, desc.max_position_embeddings, names("max_new_tokens"))
    else:
        require(cfg.prefix_tokens >= 2, f"{names('prefix_tokens')} must be >= 2 (got {cfg.prefix_tokens})")
        corpus = check_corpus(list(data), vocab_size=desc.vocab_size, tokenizer=tokenizer, split=data_opts.split,
                              split_flag=data_names("split"), cache_dir=data_opts.cache_dir,
                              cache_flag=data_names("cache_dir"), parts=("train",))
        require(cfg.prefix_tokens + sampling.max_new_tokens <= desc.max_position_embeddings,
                f"{names('prefix_tokens')} {cfg.prefix_tokens} + {names('max_new_tokens')} "
                f"{sampling.max_new_tokens} exceeds the model's context of {desc.max_position_embeddings} tokens")
    dtype = resolve_dtype(run_cfg.dtype, names("dtype"))

    # ---- work
    init_distributed(tp, pp, seed)
    if corpus is not None:  # the sample index is built collectively
        items = data_prefixes(corpus, tokenizer, cfg.prefix_tokens, seed=seed, limit=cfg.limit)
    if is_rank0():
        source = prompts or f"the first {cfg.prefix_tokens} tokens of samples of {corpus.blend.label}"
        log_settings(log, f"generate: {model} completes {len(items)} prompts from {source} (at most "
                          f"{sampling.max_new_tokens} new tokens, temperature {sampling.temperature:g}) into {out}",
                     {"model": model, "prompts": prompts, "data": data, **to_dict(cfg), "tp": tp, "pp": pp,
                      "seed": seed, "dtype": dtype.name}, None)
    writer = ResumableJsonl(out_path, _fingerprint(model, items, cfg, seed), batch_size)
    done = broadcast_object(_resume(writer) if is_rank0() else None)
    if isinstance(done, str):  # every rank stops with rank 0's error
        raise UsageError(done)
    if done:
        log.info("continuing %s after %d of %d records", writer.partial, done, len(items))
    log_compute_dtype(dtype)
    opened = open_model(model, dtype=dtype.torch)
    generator = TextGenerator(opened.model, opened.description, opened.tokenizer)

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    starts = list(range(done, len(items), batch_size))
    bar = tqdm(total=len(items), initial=done, desc="generate", unit="prompt", dynamic_ncols=True,
               disable=not (progress and is_rank0() and sys.stderr.isatty()))
    written, new_tokens, clock, last_log = done, 0, time.perf_counter(), time.perf_counter()
    for first in range(0, len(starts), dp):
        turn = starts[first:first + dp]
        mine: list[dict] = []
        if dp_rank < len(turn):
            index = range(turn[dp_rank], min(turn[dp_rank] + batch_size, len(items)))
            results = generator.generate([items[i].tokens for i in index], sampling,
                                         seed=seed + turn[dp_rank] // batch_size)
            mine = [_record(i, items[i], r) for i, r in zip(index, results)]
        gathered = _gather_round(mine)
        if gathered is not None:
            records = [r for part in gathered for r in part]
            writer.append(records)
            new_tokens += sum(r["completion_tokens"] for r in records)
            written += len(records)
            bar.update(len(records))
            now = time.perf_counter()
            if now - last_log > 30 or first + dp >= len(starts):
                log.info("generated %d/%d: %d new tokens, %.1f tokens/s", written,
                         len(items), new_tokens, new_tokens / max(now - clock, 1e-9))
                last_log = now
    bar.close()
    if is_rank0():
        writer.finish()
    barrier()
    log.info("%d completions written to %s (%s)", len(items), out_path,
             "greedy" if sampling.greedy else f"temperature {sampling.temperature}")
    return out_path
