"""Text -> Megatron indexed data set, tokenised over worker processes.

``preprocess`` is the ``nemo-minitron preprocess`` command's work: text files, folders,
JSONL or the built-in corpus in, ``PREFIX.bin/.idx`` out, readable by Megatron-LM and
Megatron-Bridge unchanged. It follows Megatron-LM's ``tools/preprocess_data.py
--append-eod``: every document is tokenised without special tokens and ends with the
tokenizer's end-of-sequence token, one sequence per document, token dtype uint16 below
65,500 ids and int32 above. The same function fills the data cache (``cache.py``).
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from nemo_minitron.checkpoint.hf_import import resolve_source
from nemo_minitron.checkpoint.store import is_checkpoint, load_tokenizer, megatron_checkpoint
from nemo_minitron.config import build, cli_names
from nemo_minitron.data.config import PreprocessConfig
from nemo_minitron.data.indexed import atomic_indexed, token_dtype
from nemo_minitron.data.sources import _files, check_documents, documents, parse_data_spec
from nemo_minitron.errors import require
from nemo_minitron.files import check_writable_dir
from nemo_minitron.runtime.progress import progress_bar

log = logging.getLogger("nemo_minitron")

BATCH_DOCUMENTS = 256  # documents per tokenizer call (and per message to a worker)

_worker_tokenizer = None


def _init_worker(tokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def encode(tokenizer, docs: Sequence[str]) -> list[np.ndarray]:
    """Token ids of each document, end-of-sequence appended (Megatron's --append-eod)."""
    eos = tokenizer.eos_token_id
    ids = tokenizer(list(docs), add_special_tokens=False)["input_ids"]
    return [np.asarray(i + ([eos] if eos is not None else []), dtype=np.int32) for i in ids]


def _encode_in_worker(docs: Sequence[str]) -> tuple[list[np.ndarray], int]:
    return encode(_worker_tokenizer, docs), sum(len(d.encode("utf-8", "ignore")) for d in docs)


def _batches(docs: Iterable[str]) -> Iterator[list[str]]:
    it = iter(docs)
    while batch := list(itertools.islice(it, BATCH_DOCUMENTS)):
        yield batch


def _encoded(docs: Iterable[str], tokenizer, workers: int) -> Iterator[tuple[list[np.ndarray], int]]:
    """Encoded batches in document order; with workers > 1 from a pool of processes."""
    if workers == 1:
        for batch in _batches(docs):
            yield encode(tokenizer, batch), sum(len(d.encode("utf-8", "ignore")) for d in batch)
        return
    # fork starts workers at once (Hugging Face tokenizers turn their own threads off in a
    # forked child); spawn where fork does not exist
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        yield from pool.imap(_encode_in_worker, _batches(docs), chunksize=1)


def tokenize_into(writer, docs: Iterable[str], tokenizer, *, workers: int, total_bytes: int | None = None,
                  progress: bool = False, desc: str = "tokenise") -> None:
    """Tokenise ``docs`` into an ``IndexedWriter``, in document order."""
    # One process per core: the Rust tokenizer's own thread pool would compete with the workers.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    bar = progress_bar(total_bytes, desc, progress, unit="B", unit_scale=True)
    for encoded, nbytes in _encoded(docs, tokenizer, workers):
        for ids in encoded:
            writer.add(ids)
        bar.update(nbytes)
        bar.set_postfix(tokens=f"{writer.tokens:,}", refresh=False)
    bar.close()


def _source_bytes(specs) -> int | None:
    if any(s.kind == "builtin" for s in specs):
        return None
    return sum(p.stat().st_size for s in specs for p in _files(s))


def load_any_tokenizer(model: str, flag: str = "--model"):
    """The tokenizer of a project checkpoint, HF directory, .gguf or alias (no weights read)."""
    if is_checkpoint(model) or megatron_checkpoint(model) is not None:  # Megatron: read in place
        return load_tokenizer(model)
    return resolve_source(model, flag).tokenizer()


def preprocess(inputs: Sequence[str], model: str, out: str, config: PreprocessConfig | None = None, *,
               progress: bool = True, **options: Any) -> dict[str, Any]:
    """Tokenise ``inputs`` with ``model``'s tokenizer into ``out.bin``/``out.idx`` (atomic).
    ``config``: a PreprocessConfig (defaults if None); ``options``: any of its fields (``workers``)."""
    # ---- everything is checked before any work
    workers = build(PreprocessConfig, config, cli_names(PreprocessConfig), **options).workers
    require(len(inputs) > 0, "--input is required (text files, folders, .jsonl files or builtin:*)")
    specs = [parse_data_spec(i, "--input") for i in inputs]
    for spec in specs:
        require(spec.is_text, f"--input '{spec.label}' is already a Megatron indexed data set")
    prefix = str(out)[:-4] if str(out).endswith((".bin", ".idx")) else str(out)
    parent = Path(prefix).parent
    existing = next(p for p in [parent, *parent.parents] if p.exists())  # made below, once all is checked
    check_writable_dir(existing, "--out", out)
    require(not Path(prefix + ".idx").exists(), f"--out '{prefix}' already exists ({prefix}.idx); choose a new prefix")
    tokenizer = load_any_tokenizer(model)
    require(tokenizer.eos_token_id is not None, f"--model '{model}': its tokenizer has no end-of-sequence token "
                                                "to end documents with")
    for spec in specs:
        check_documents(spec, "--input")

    # ---- work
    start = time.time()
    parent.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(len(tokenizer))
    with atomic_indexed(prefix, dtype) as writer:
        tokenize_into(writer, itertools.chain.from_iterable(documents(s, "--input") for s in specs), tokenizer,
                      workers=workers, total_bytes=_source_bytes(specs), progress=progress, desc="preprocess")
    seconds = time.time() - start
    stats = {"prefix": prefix, "documents": writer.documents, "tokens": writer.tokens, "dtype": dtype.name,
             "workers": workers, "seconds": round(seconds, 2),
             "tokens_per_second": round(writer.tokens / seconds, 1) if seconds > 0 else None}
    log.info("preprocess: %s documents, %s tokens (%s) in %.1f s (%s tokens/s, %d worker%s) -> %s.bin/.idx",
             f"{writer.documents:,}", f"{writer.tokens:,}", dtype.name, seconds,
             f"{stats['tokens_per_second']:,.0f}" if stats["tokens_per_second"] else "-", workers,
             "s" if workers > 1 else "", prefix)
    return stats
