"""One ``--data`` source: what it is, its documents, and a digest of its content.

A source is one of
- ``builtin:calib`` / ``builtin:train`` / ``builtin:heldout`` / ``builtin:docs`` (see ``builtin.py``);
- a text file, or a folder of them (``.txt``, ``.md``, ``.rst``, ``.text``, ``.jsonl`` inside, sorted):
  a text file's documents are its paragraphs, runs of lines that a blank line ends
  (``text_documents``), so that ``--split`` has documents to divide;
- a ``.jsonl`` file whose records have a ``text`` field (one document per record, as
  Megatron-LM's ``preprocess_data.py`` reads one);
- a ``.jsonl`` file of completions (records with ``prompt`` and ``completion``, as
  ``generate`` writes them): each record is one document, prompt then completion, and
  only the completion's tokens are trained on (``completion_records``);
- a Megatron indexed data set, by prefix (``PREFIX.bin`` + ``PREFIX.idx``; already tokenised).

Everything but an indexed data set is text: it is tokenised once into an indexed data set
in the data cache (``cache.py``) and read like one from then on.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Iterator

from nemo_minitron.data.builtin import SPLITS, builtin_documents
from nemo_minitron.data.indexed import IndexHeader, check_prefix
from nemo_minitron.errors import UsageError, require

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
KINDS = ("builtin", "text", "jsonl", "completions", "folder", "indexed")


@dataclasses.dataclass(frozen=True)
class DataSpec:
    kind: str  # one of KINDS
    path: str  # the split name for builtin, the prefix for indexed
    label: str  # as the user wrote it, for messages

    @property
    def is_text(self) -> bool:
        return self.kind != "indexed"


def _is_text_file(p: Path) -> bool:
    return p.is_file() and (p.suffix in TEXT_SUFFIXES or p.suffix == ".jsonl")


def _first_record(path: Path) -> Any:
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                try:
                    return json.loads(line)
                except json.JSONDecodeError:
                    return None  # reported, with its line number, when the file is read
    return None


def _spec_for_file(path: Path, label: str, flag: str) -> DataSpec:
    if path.suffix == ".jsonl":
        first = _first_record(path)
        completions = isinstance(first, dict) and "completion" in first and "text" not in first
        return DataSpec("completions" if completions else "jsonl", str(path), label)
    if path.suffix in (".bin", ".idx"):
        return parse_data_spec(str(path.with_suffix("")), flag)
    return DataSpec("text", str(path), label)


def parse_data_spec(spec: str, flag: str = "--data") -> DataSpec:
    """Validate one source (existence, readability, kind) without reading it."""
    if spec.startswith("builtin:"):
        split = spec.split(":", 1)[1]
        require(split in SPLITS, f"{flag} '{spec}': unknown split (allowed: {', '.join('builtin:' + s for s in SPLITS)})")
        return DataSpec("builtin", split, spec)
    path = Path(spec)
    if Path(spec + ".bin").exists() or Path(spec + ".idx").exists():
        check_prefix(spec, flag)
        return DataSpec("indexed", spec, spec)
    require(path.exists(), f"{flag} '{spec}' does not exist (give a text file or folder, a .jsonl file, a Megatron "
                           "prefix with .bin/.idx files, or builtin:" + "|".join(SPLITS) + ")")
    if path.is_dir():
        require(any(_is_text_file(p) for p in path.rglob("*")),
                f"{flag} '{spec}': folder holds no .txt/.md/.rst/.jsonl files")
        return DataSpec("folder", spec, spec)
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise UsageError(f"{flag} '{spec}' is not readable: {e.strerror}") from None
    return _spec_for_file(path, spec, flag)


def _files(spec: DataSpec) -> list[Path]:
    if spec.kind == "folder":
        return [p for p in sorted(Path(spec.path).rglob("*")) if _is_text_file(p)]
    return [Path(spec.path)]


def _jsonl_records(path: Path, name: str, field: str) -> Iterator[tuple[str, dict]]:
    """(``NAME line N``, record) of every non-blank line; a line that is not JSON, or whose
    record lacks a string ``field``, is a UsageError naming it."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{name} line {n}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{where}: not JSON ({e.msg})") from None
            require(isinstance(record, dict) and isinstance(record.get(field), str),
                    f"{where}: record has no string '{field}' field")
            yield where, record


def _jsonl_texts(path: Path, flag: str) -> Iterator[str]:
    for _, record in _jsonl_records(path, f"{flag} '{path}'", "text"):
        yield record["text"]


def text_documents(path: Path) -> Iterator[str]:
    """A text file's documents: its paragraphs, each a run of non-blank lines (joined by
    newlines; one or more blank or whitespace-only lines end a paragraph). Read line by
    line, so a large file is never held whole."""
    lines: list[str] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                lines.append(line.rstrip("\n"))
            elif lines:
                yield "\n".join(lines)
                lines = []
    if lines:
        yield "\n".join(lines)


def documents(spec: DataSpec, flag: str = "--data") -> Iterator[str]:
    """The source's documents in a fixed order (blank ones skipped). JSONL errors are UsageErrors."""
    if spec.kind == "builtin":
        yield from (d for d in builtin_documents(spec.path) if d.strip())
        return
    require(spec.is_text, f"{flag} '{spec.label}' is already tokenised")
    require(spec.kind != "completions", f"{flag} '{spec.label}' holds completions (prompt + completion records)")
    for path in _files(spec):
        if path.suffix == ".jsonl":
            yield from (t for t in _jsonl_texts(path, flag) if t.strip())
        else:
            yield from text_documents(path)


def document_count(spec: DataSpec, flag: str = "--data") -> int:
    """How many documents the source holds (what ``--split`` divides), without tokenising:
    an indexed data set's sequences; the records of completions; else ``documents``
    (counted once per process while the files are unchanged)."""
    return _document_count(spec, flag, stat_fingerprint(spec) if spec.kind != "indexed" else None)


@functools.lru_cache(maxsize=64)
def _document_count(spec: DataSpec, flag: str, fingerprint: str | None) -> int:
    if spec.kind == "indexed":
        return IndexHeader(spec.path, flag).sequences
    if spec.kind == "completions":
        return sum(1 for _ in _jsonl_records(Path(spec.path), f"{flag} '{spec.label}'", "completion"))
    return sum(1 for _ in documents(spec, flag))


def completion_records(spec: DataSpec, tokenizer, flag: str = "--data") -> Iterator[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) of every record of a completions file, in order.

    The ids ``generate`` recorded are used as they are (``prompt_ids``; ``completion_ids``
    unless a stop string cut the text), so the student trains on the teacher's very tokens;
    otherwise the text is tokenised (a chat prompt, with ``messages``, holds its special
    tokens already). A completion that ended at end-of-sequence gets that token, so the
    student learns to stop."""
    eos = tokenizer.eos_token_id
    for where, record in _jsonl_records(Path(spec.path), f"{flag} '{spec.label}'", "completion"):
        if isinstance(record.get("prompt_ids"), list):
            prompt = [int(i) for i in record["prompt_ids"]]
        else:
            require(isinstance(record.get("prompt"), str), f"{where}: record has neither 'prompt' nor 'prompt_ids'")
            prompt = tokenizer(record["prompt"], add_special_tokens="messages" not in record)["input_ids"]
        reason = record.get("finish_reason")
        if isinstance(record.get("completion_ids"), list) and reason != "stop":
            completion = [int(i) for i in record["completion_ids"]]
        else:
            completion = tokenizer(record["completion"], add_special_tokens=False)["input_ids"]
        if reason == "eos" and eos is not None and (not completion or completion[-1] != eos):
            completion.append(eos)
        yield prompt, completion


def check_documents(spec: DataSpec, flag: str = "--data", tokenizer=None) -> None:
    """Read every record of a JSONL source once, so that a malformed line is reported
    before any work starts (only done when the source is not in the cache yet)."""
    if spec.kind == "completions":
        for _ in completion_records(spec, tokenizer, flag):
            pass
        return
    for path in _files(spec) if spec.kind in ("jsonl", "folder") else []:
        if path.suffix == ".jsonl":
            for _ in _jsonl_texts(path, flag):
                pass


def content_digest(spec: DataSpec) -> str:
    """sha256 of what the source holds (file names relative to a folder, and bytes)."""
    digest = hashlib.sha256(spec.kind.encode())
    if spec.kind == "builtin":
        digest.update(json.dumps(builtin_documents(spec.path)).encode())
        return digest.hexdigest()
    root = Path(spec.path)
    for path in _files(spec):
        name = path.relative_to(root).as_posix() if spec.kind == "folder" else ""
        digest.update(f"\0{name}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def stat_fingerprint(spec: DataSpec) -> str | None:
    """Path, size and modification time of every file (None for builtin): a cheap key under
    which a content digest is remembered, so an unchanged corpus is not hashed at every start."""
    if spec.kind == "builtin":
        return None
    parts = []
    for path in _files(spec):
        st = path.stat()
        parts.append(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()
