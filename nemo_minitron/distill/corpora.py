"""What a training run reads: the training data, the teacher's generations, the held-out
data, checked before any work; and the training samples built from them."""

from __future__ import annotations

from typing import Sequence

from nemo_minitron.config import Names
from nemo_minitron.data.config import DataOptions
from nemo_minitron.data.dataset import check_corpus, eval_corpus
from nemo_minitron.distill.config import TrainingConfig
from nemo_minitron.distill.loader import MixedSamples
from nemo_minitron.errors import require

DEFAULT_EVAL_DATA = "builtin:heldout"


def training_corpora(data: Sequence[str] | None, eval_data: Sequence[str] | None, data_opts: DataOptions,
                     data_names: Names, *, vocab_size: int, tokenizer):
    """The training data (checked, with a training part; None without ``data``) and the
    held-out data of a run, and how the held-out data is named in logs: ``eval_data`` when
    given, else the training data's validation part when its split has one, else the
    built-in held-out split."""
    data_kwargs = dict(vocab_size=vocab_size, cache_dir=data_opts.cache_dir, cache_flag=data_names("cache_dir"),
                       tokenizer=tokenizer)
    if not data:  # a run on the teacher's generations alone
        heldout = check_corpus(list(eval_data or [DEFAULT_EVAL_DATA]), flag="--eval-data", **data_kwargs)
        train, label = None, heldout.blend.label
    else:
        train = check_corpus(data, split=data_opts.split, split_flag=data_names("split"), parts=("train",),
                             **data_kwargs)
        heldout = eval_corpus(train, eval_data, default=[DEFAULT_EVAL_DATA], **data_kwargs)
        label = f"the validation part of {train.blend.label}" if heldout is train else heldout.blend.label
    require(not heldout.masked, "--eval-data: completions (prompt + completion records) are training data; "
                                "evaluate on text")
    return train, heldout, label


def synthetic_corpus(synthetic_data: Sequence[str] | None, data_opts: DataOptions, data_names: Names, *,
                     vocab_size: int, tokenizer):
    """The teacher's generations (None without them): training data only, read whole, no split."""
    if not synthetic_data:
        return None
    return check_corpus(list(synthetic_data), flag="--synthetic-data", vocab_size=vocab_size,
                        cache_dir=data_opts.cache_dir, cache_flag=data_names("cache_dir"), tokenizer=tokenizer)


def training_samples(method: str, train_corpus, synthetic, cfg: TrainingConfig, tokenizer, *, seed: int,
                     progress: bool, cache=None):
    """The run's training samples (collective): the data's, the generations', or both interleaved."""
    total = cfg.steps * cfg.global_batch
    if method == "synthetic":
        return synthetic.dataset(tokenizer, seq_len=cfg.seq_len, seed=seed, part="train", progress=progress,
                                 num_samples=total)
    if method == "both":
        share = cfg.synthetic_fraction
        real = train_corpus.dataset(tokenizer, seq_len=cfg.seq_len, seed=seed, part="train", progress=progress,
                                    num_samples=total - int(total * share) + 1)
        generated = synthetic.dataset(tokenizer, seq_len=cfg.seq_len, seed=seed, part="train", progress=progress,
                                      num_samples=int(total * share) + 1)
        return MixedSamples(real, generated, share, total)
    # the cache was computed for the data set it names (built with its sample count): the
    # very samples the live teacher reads when steps x global batch equals that count
    samples = train_corpus.dataset(tokenizer, seq_len=cfg.seq_len, seed=seed, part="train", progress=progress,
                                   num_samples=cache.dataset_samples if cache is not None else total)
    if cache is not None:
        cache.check_samples(samples)
        samples = samples.first(cache.num_samples)  # the samples the cache covers
    return samples
