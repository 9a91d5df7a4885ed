"""A recipe's data (``data.calib``, ``data.train``, ``data.heldout``) as checked corpora:
what the pipeline checks before its first stage and what the report evaluates on."""

from __future__ import annotations

from nemo_minitron.data.dataset import check_corpus
from nemo_minitron.pipeline.recipe import Recipe


def data_corpus(recipe: Recipe, use: str, **kwargs):
    """The checked corpus of ``data.<use>`` (calib, train, heldout); None for a left-out
    heldout (the validation part of ``train`` is read instead)."""
    value = getattr(recipe.data, use)
    if value is None:
        return None
    return check_corpus(value, flag=f"data.{use}", split=None if use == "heldout" else recipe.data.split,
                        split_flag="data.split", cache_dir=recipe.data.cache_dir, cache_flag="data.cache_dir",
                        **kwargs)
