"""Where prompts come from, validated and tokenised before any model is loaded.

- ``--prompts FILE.jsonl``: one JSON object a line, with ``prompt`` (text) or
  ``messages`` (a chat: ``[{"role": ..., "content": ...}, ...]``, rendered with the
  tokenizer's chat template, generation prompt added);
- ``--prompts FILE`` (any other suffix): one prompt a line, blank lines skipped;
- ``--data SPEC ... --prefix-tokens N``: the first N tokens of consecutive windows of
  any ``--data`` source (read through megatron-core's GPTDataset), e.g. to let a teacher continue real text.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from nemo_minitron.errors import UsageError, require


@dataclasses.dataclass(frozen=True)
class Prompt:
    text: str  # what the model reads (a chat already rendered with its template)
    tokens: list[int]
    source: str  # "FILE line N" or "SPEC window N", for error messages
    messages: list[dict[str, Any]] | None = None


def _chat_template_or_error(tokenizer, where: str) -> None:
    require(getattr(tokenizer, "chat_template", None),
            f"{where}: 'messages' need a tokenizer with a chat template, and this model's tokenizer has none "
            "(give the prompt as 'prompt' text instead)")


def _check_messages(messages: Any, where: str) -> list[dict[str, Any]]:
    ok = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages)
    require(bool(ok), f"{where}: 'messages' must be a non-empty list of {{\"role\": str, \"content\": str}} objects")
    return messages


def read_prompt_file(path: str, tokenizer, flag: str = "--prompts") -> list[Prompt]:
    p = Path(path)
    require(p.is_file(), f"{flag} '{path}' does not exist or is not a file")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{flag} '{path}' is not readable as UTF-8 text: {e}") from None
    prompts: list[Prompt] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{flag} '{path}' line {n}"
        if p.suffix != ".jsonl":
            prompts.append(Prompt(line, tokenizer(line)["input_ids"], where))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{where}: not JSON ({e.msg})") from None
        require(isinstance(record, dict) and ("prompt" in record or "messages" in record),
                f"{where}: record has neither a 'prompt' nor a 'messages' field")
        if "messages" in record:
            messages = _check_messages(record["messages"], where)
            _chat_template_or_error(tokenizer, where)
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            # the template writes the special tokens itself
            prompts.append(Prompt(text, tokenizer(text, add_special_tokens=False)["input_ids"], where, messages))
        else:
            require(isinstance(record["prompt"], str) and record["prompt"], f"{where}: 'prompt' must be non-empty text")
            prompts.append(Prompt(record["prompt"], tokenizer(record["prompt"])["input_ids"], where))
    require(prompts, f"{flag} '{path}' holds no prompts")
    return prompts


def data_prefixes(corpus, tokenizer, prefix_tokens: int, *, seed: int, limit: int | None = None) -> list[Prompt]:
    """The first ``prefix_tokens`` tokens of samples of ``corpus`` (a checked ``data.dataset.Corpus``),
    in megatron-core's GPTDataset order. Collective: every rank calls it after ``init_distributed``."""
    require(prefix_tokens >= 2, f"--prefix-tokens must be >= 2 (got {prefix_tokens})")
    # a sample of seq_len s holds s + 1 tokens
    windows = corpus.dataset(tokenizer, seq_len=prefix_tokens - 1, seed=seed, num_samples=limit, exact=True,
                             samples_flag="--limit", shown=f"{prefix_tokens} tokens (--prefix-tokens)")
    label = corpus.blend.label
    return [Prompt(tokenizer.decode(w.tolist()), w.tolist(), f"--data {label} sample {i}")
            for i, w in enumerate(windows.take())]
