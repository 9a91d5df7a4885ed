"""Two downstream tasks made from the built-in held-out split (``builtin:heldout``), so
that task accuracy needs no download. Both are lm-evaluation-harness task configs.

- ``minitron_lastword`` (LAMBADA-style): the shortest passage (12 to 120 words) from the
  start of a docstring that ends in a word which already appeared in it; the model sees
  the passage without that word and must produce it greedily (``acc``: every token of
  `` word`` is the argmax). Chance is about zero.
- ``minitron_nextsentence`` (multiple choice, 4 options): the first sentences of a
  docstring (up to 3, at most 80 words); which of four sentences comes next: its own
  next sentence, or that of three other held-out docstrings, of about the same length
  in characters so that length gives nothing away (``acc``, ``acc_norm``).
  Chance is 0.25.

The held-out split shares no source module with the calibration and training splits,
and the examples are the same on every machine with the same Python (fixed seed).
"""

from __future__ import annotations

import random
import re
from functools import lru_cache

from nemo_minitron.data.builtin import builtin_documents

LASTWORD, NEXTSENTENCE = "minitron_lastword", "minitron_nextsentence"
BUILTIN_TASKS = (LASTWORD, NEXTSENTENCE)
CHANCE = {LASTWORD: 0.0, NEXTSENTENCE: 0.25}

_SENTENCE_END = re.compile(r"(?<=[a-z0-9)][.!?])\s+(?=[A-Z])")
_WORD = re.compile(r"[A-Za-z]+")
_SEED = 20241129
_CONTEXT_SENTENCES = 3


def _sentences(doc: str) -> list[str]:
    """The sentences of a docstring's prose paragraphs (examples, lists and directives skipped)."""
    out = []
    for block in re.split(r"\n\s*\n", doc):
        text = " ".join(block.split())
        if len(text.split()) >= 6 and not text.startswith((">>>", "-", "*", "..")):
            out += [s for s in _SENTENCE_END.split(text) if s]
    return out


@lru_cache(maxsize=1)
def lastword_examples() -> list[dict]:
    out = []
    for doc in builtin_documents("heldout"):
        sentences, passage = _sentences(doc), ""
        for sentence in sentences:
            passage = f"{passage} {sentence}".strip()
            words = passage.rstrip(".!?").split(" ")
            last = words[-1]
            earlier = {w.lower() for w in _WORD.findall(" ".join(words[:-1]))}
            if len(words) > 120:
                break
            if len(words) >= 12 and _WORD.fullmatch(last) and len(last) >= 3 and last.lower() in earlier:
                out.append({"context": " ".join(words[:-1]), "target": " " + last})
                break
    return out


@lru_cache(maxsize=1)
def nextsentence_examples() -> list[dict]:
    pairs = []
    for doc in builtin_documents("heldout"):
        s = _sentences(doc)
        if len(s) < 2:
            continue
        k = min(_CONTEXT_SENTENCES, len(s) - 1)
        context, following = " ".join(s[:k]), s[k]
        if len(context.split()) <= 80 and 4 <= len(following.split()) <= 40:
            pairs.append((context, following))
    rng = random.Random(_SEED)
    out = []
    for i, (context, second) in enumerate(pairs):
        # distractors of about the same length, so that length alone does not give the answer away
        n = len(second)
        nearest = sorted((j for j in range(len(pairs)) if j != i and pairs[j][1] != second),
                         key=lambda j: (abs(len(pairs[j][1]) - n), j))[:12]
        others = rng.sample(nearest, 3)
        choices = [second] + [pairs[j][1] for j in others]
        rng.shuffle(choices)
        out.append({"context": context, "choices": choices, "label": choices.index(second)})
    return out


def _dataset(name: str):
    def load(**_kwargs):
        import datasets  # deferred: 2 s to import, needed when a built-in task loads its data

        rows = lastword_examples() if name == LASTWORD else nextsentence_examples()
        return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})

    return load


def task_config(name: str) -> dict:
    """The lm-eval task config (a dict, loaded without any download)."""
    common = {"task": name, "custom_dataset": _dataset(name), "test_split": "test", "doc_to_text": "context",
              "metadata": {"version": 1.0}}
    if name == LASTWORD:
        return {**common, "output_type": "loglikelihood", "doc_to_target": "target",
                "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    return {**common, "output_type": "multiple_choice", "doc_to_choice": "choices", "doc_to_target": "label",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}
