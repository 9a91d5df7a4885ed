"""The data cache: tokenised text sources and megatron-core's sample index files.

    CACHE/tokens/<key>/data.bin, data.idx, source.json   a text source, tokenised
    CACHE/tokens/<key>/mask.bin, mask.idx                 completions: 1 where a token is trained on
        key = sha256(content of the source, the tokenizer, the tokenisation settings)
    CACHE/index/<key>/<attempt>/...npy                    GPTDataset/BlendedDataset indices
    CACHE/index/<key>/complete                            names the finished attempt
        key = sha256(the data sets, weights, sizes, seed, sequence length, split)
    CACHE/digests/<stat key>.json                         content digest of unchanged files

Text is tokenised once and read like any Megatron data set from then on. megatron-core
writes its index files in place and would read a half-written set after a kill; here
every build goes to a fresh attempt directory and ``complete`` is written (atomically)
only after the build finished, so a killed build is simply rebuilt. The cache must be
on a file system every rank sees (rank 0 builds, the others read).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from nemo_minitron.data.indexed import IndexedWriter, token_dtype
from nemo_minitron.data.preprocess import tokenize_into
from nemo_minitron.data.sources import DataSpec, completion_records, content_digest, documents, stat_fingerprint
from nemo_minitron.errors import UsageError

TOKENIZE_VERSION = 2  # bump when tokenisation changes, so old cache entries are not reused (2: paragraphs)
ENV = "NEMO_MINITRON_DATA_CACHE"
STALE_SECONDS = 24 * 3600


def default_cache_dir() -> Path:
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nemo_minitron" / "data"


def check_cache_dir(path: str | os.PathLike | None, flag: str = "--data-cache") -> Path:
    """The cache directory, created if needed; UsageError if it cannot be written."""
    root = Path(path) if path else default_cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".probe-"):
            pass
    except OSError as e:
        raise UsageError(f"{flag} '{root}' is not a writable directory ({e.strerror or e}); "
                         f"give another with {flag} or ${ENV}") from None
    return root


def tokenizer_fingerprint(tokenizer) -> str:
    """What decides the token ids: the tokenizer's full definition and its end-of-sequence id."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    digest = hashlib.sha256(f"{type(tokenizer).__name__}\0{tokenizer.eos_token_id}\0{len(tokenizer)}\0".encode())
    digest.update(definition.encode())
    return digest.hexdigest()


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


class DataCache:
    def __init__(self, root: Path):
        self.root = Path(root)

    # ---------------------------------------------------------------- text sources
    def _digest(self, spec: DataSpec) -> str:
        """Content digest, remembered under the files' stat fingerprint."""
        stat = stat_fingerprint(spec)
        memo = self.root / "digests" / f"{stat}.json" if stat else None
        if memo is not None and memo.is_file():
            try:
                return json.loads(memo.read_text())["digest"]
            except (OSError, ValueError, KeyError):
                pass
        digest = content_digest(spec)
        if memo is not None:
            try:
                memo.parent.mkdir(parents=True, exist_ok=True)
                _write_json(memo, {"digest": digest, "source": spec.label})
            except OSError:
                pass  # only costs hashing again next time
        return digest

    def text_prefix(self, spec: DataSpec, tokenizer_key: str) -> str:
        """Where the tokenised source lives (``is_complete`` says whether it is there yet)."""
        key = hashlib.sha256(f"{TOKENIZE_VERSION}\0{tokenizer_key}\0{self._digest(spec)}".encode()).hexdigest()[:24]
        return str(self.root / "tokens" / key / "data")

    @staticmethod
    def is_complete(prefix: str) -> bool:
        return Path(prefix + ".idx").is_file() and (Path(prefix).parent / "source.json").is_file()

    def tokenize(self, spec: DataSpec, tokenizer, prefix: str, *, progress: bool = False) -> None:
        """Tokenise ``spec`` into ``prefix`` (written into a temporary directory, renamed into place)."""
        final = Path(prefix).parent
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            writer = IndexedWriter(str(tmp / "data.bin"), str(tmp / "data.idx"), token_dtype(len(tokenizer)))
            if spec.kind == "completions":
                self._tokenize_completions(spec, tokenizer, writer, tmp)
            else:
                # tokenised in this process (preprocess --workers is for bulk jobs)
                tokenize_into(writer, documents(spec), tokenizer, workers=1, progress=progress,
                              desc=f"tokenise {spec.label}")
            writer.finalize()
            _write_json(tmp / "source.json", {"source": spec.label, "kind": spec.kind, "documents": writer.documents,
                                              "tokens": writer.tokens})
            try:
                os.replace(tmp, final)
            except OSError:  # another process finished the same entry first: same content
                if not self.is_complete(prefix):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @staticmethod
    def _tokenize_completions(spec: DataSpec, tokenizer, writer, directory: Path) -> None:
        """Each record as one document (prompt + completion) and, in ``mask``, the same
        documents with 0 for prompt tokens and 1 for completion tokens: megatron-core cuts
        both into the same samples (same document lengths, same seed)."""
        mask = IndexedWriter(str(directory / "mask.bin"), str(directory / "mask.idx"), np.dtype(np.uint8))
        for prompt, completion in completion_records(spec, tokenizer):
            if completion:  # a record with nothing to learn from is left out
                writer.add(np.asarray(prompt + completion, dtype=np.int64))
                mask.add(np.asarray([0] * len(prompt) + [1] * len(completion), dtype=np.uint8))
        mask.finalize()

    # ---------------------------------------------------------------- sample indices
    def index_dir(self, key: str) -> tuple[Path, bool]:
        """(directory for this index, whether it is complete). A new attempt directory is
        named by rank 0 (callers broadcast it)."""
        base = self.root / "index" / key
        marker = base / "complete"
        if marker.is_file():
            done = base / marker.read_text().strip()
            if done.is_dir():
                return done, True
        return base / f"attempt-{uuid.uuid4().hex[:8]}", False

    @staticmethod
    def mark_complete(directory: Path) -> None:
        base = directory.parent
        tmp = base / f".complete.tmp-{uuid.uuid4().hex[:8]}"
        tmp.write_text(directory.name)
        os.replace(tmp, base / "complete")
        for stale in base.glob("attempt-*"):  # left by killed builds (a day old: not a build in progress)
            if stale.name != directory.name and time.time() - stale.stat().st_mtime > STALE_SECONDS:
                shutil.rmtree(stale, ignore_errors=True)
