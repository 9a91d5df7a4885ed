"""The built-in corpus: English text shipped with the running Python interpreter.

Needs no download, is the same on every machine with the same Python, and is real
English prose about code. ``calib``, ``train`` and ``heldout`` are the standard
library's docstrings, split by *source file* (a hash of its path), so they never share
a module (and a docstring that appears in several modules is kept once, in the split of
its first module): about 10% calibration, 80% training, 10% held-out. ``docs`` is
another text altogether: the prose of Python's reference manual as the interpreter
ships it for ``help()`` (``pydoc_data.topics``, one document per topic), held out from
all three.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
import sysconfig
import tempfile
from pathlib import Path

from nemo_minitron.errors import UsageError

SPLITS = ("calib", "train", "heldout", "docs")
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3"}
_MIN_CHARS = 40


def _split_of(relative_path: str) -> str:
    bucket = int(hashlib.sha1(relative_path.encode()).hexdigest(), 16) % 10
    return "calib" if bucket == 0 else "heldout" if bucket == 1 else "train"


def _is_english(text: str) -> bool:
    ascii_chars = sum(1 for c in text if ord(c) < 128)
    return ascii_chars >= 0.97 * len(text)


def _extract(stdlib: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    seen: set[str] = set()  # a docstring repeated in several modules goes to one split only
    files = sorted(p for p in stdlib.rglob("*.py") if not (_EXCLUDED_DIRS & set(p.relative_to(stdlib).parts)))
    for path in files:
        rel = path.relative_to(stdlib).as_posix()
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        docs = out[_split_of(rel)]
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=True)
                if doc and len(doc) >= _MIN_CHARS and _is_english(doc) and doc not in seen:
                    seen.add(doc)
                    docs.append(doc)
    return out


def _cache_file(stdlib: Path) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nemo_minitron"
    key = hashlib.sha1(f"{sys.version}|{stdlib}|{_MIN_CHARS}|v2".encode()).hexdigest()[:16]
    return root / f"builtin-corpus-{key}.json"


def builtin_documents(split: str) -> list[str]:
    """The docstrings of one split, in a fixed order (extracted once, then cached as JSON)."""
    if split not in SPLITS:
        raise UsageError(f"--data builtin:{split}: unknown split (allowed: {', '.join('builtin:' + s for s in SPLITS)})")
    if split == "docs":
        return _reference_manual()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    cache = _cache_file(stdlib)
    try:
        return json.loads(cache.read_text())[split]
    except (OSError, json.JSONDecodeError, KeyError):
        pass
    corpus = _extract(stdlib)
    corpus.pop("docs", None)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=cache.parent, delete=False, suffix=".tmp") as f:
            json.dump(corpus, f)
        os.replace(f.name, cache)
    except OSError:
        pass  # a read-only home only costs the extraction again next time
    return corpus[split]


def _reference_manual() -> list[str]:
    """The reference manual's topics (``help('TOPIC')`` text), in topic order."""
    from pydoc_data.topics import topics  # deferred: 700 KB of text, read when the corpus is built

    return [topics[name] for name in sorted(topics) if _is_english(topics[name])]
