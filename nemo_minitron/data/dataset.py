"""Token samples for every stage, streamed through megatron-core's data sets.

Two steps, the first before any work, the second collective (every rank calls it):

    corpus = check_corpus(["0.7", "/data/a", "0.3", "/data/b"], vocab_size=..., split="99,1,0")
    train = corpus.dataset(tokenizer, seq_len=4096, seed=1234, part="train", num_samples=steps * batch)
    train[i]  # LongTensor [seq_len + 1]: input tokens and, shifted by one, their labels

``check_corpus`` validates the blend, its sources (Megatron headers, a sample of token
ids against the vocabulary), the split and the cache directory. ``Corpus.dataset``
tokenises text sources into the data cache once (rank 0), then builds megatron-core's
``BlendedMegatronDatasetBuilder`` + ``GPTDataset`` over the blend: documents shuffled
and concatenated, cut into ``seq_len + 1`` windows that overlap by one token, samples
shuffled, sources interleaved by weight, by ``seed`` alone. Its index files are cached;
samples are read by index from memory-mapped files, so memory and start-up time do not
grow with the corpus. Sample ``i`` is the same at every TP/PP/DP layout and in every run
with the same data and settings.

Parts: with a split (``99,1,0``: train, validation, test shares of every source's
documents) training and calibration read the train part and evaluation the validation
part; without one every use reads the whole blend.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from nemo_minitron.data.blend import DataBlend, parse_blend, split_fractions
from nemo_minitron.data.cache import DataCache, check_cache_dir, tokenizer_fingerprint
from nemo_minitron.data.indexed import IndexHeader, check_vocabulary
from nemo_minitron.data.sources import check_documents, document_count
from nemo_minitron.errors import require
from nemo_minitron.runtime.distributed import all_ranks_ok, barrier, broadcast_object, is_rank0

log = logging.getLogger("nemo_minitron")

PARTS = ("train", "valid")


class TokenDataset(torch.utils.data.Dataset):
    """``len(ds)`` samples; ``ds[i]`` is a LongTensor of ``seq_len + 1`` token ids. Made from
    completions, ``ds.loss_mask(i)`` is 1.0 where token ``i`` of the window is trained on
    (a completion's) and 0.0 where it is not (a prompt's); without, None."""

    def __init__(self, megatron_dataset, seq_len: int, length: int | None = None, mask_dataset=None):
        self.megatron_dataset = megatron_dataset
        self.mask_dataset = mask_dataset
        self.seq_len = seq_len
        self.length = len(megatron_dataset) if length is None else min(length, len(megatron_dataset))

    def __len__(self) -> int:
        return self.length

    @staticmethod
    def _window(dataset, index: int) -> torch.Tensor:
        sample = dataset[index]
        # GPTDataset returns tokens [0, s) and labels [1, s]: the window is tokens + the last label
        return torch.cat([sample["tokens"], sample["labels"][-1:]])

    def __getitem__(self, index: int) -> torch.Tensor:
        if not -self.length <= index < self.length:
            raise IndexError(f"sample {index} of {self.length}")
        return self._window(self.megatron_dataset, index % self.length)

    @property
    def masked(self) -> bool:
        return self.mask_dataset is not None

    def loss_mask(self, index: int) -> torch.Tensor | None:
        if self.mask_dataset is None:
            return None
        return self._window(self.mask_dataset, index % self.length).float()

    def first(self, count: int) -> "TokenDataset":
        """The first ``count`` samples (or all, if fewer) as a data set."""
        return TokenDataset(self.megatron_dataset, self.seq_len, min(count, self.length), self.mask_dataset)

    def take(self, count: int | None = None, start: int = 0) -> torch.Tensor:
        """Samples ``[start, start + count)`` stacked into ``[count, seq_len + 1]``."""
        stop = self.length if count is None else min(self.length, start + count)
        if stop <= start:
            return torch.zeros(0, self.seq_len + 1, dtype=torch.long)
        return torch.stack([self[i] for i in range(start, stop)])


def data_parallel_bounds(count: int, dp_rank: int, dp_size: int) -> tuple[int, int]:
    """A contiguous share of ``count`` samples for one data-parallel rank (sizes differ by at most one)."""
    bounds = np.linspace(0, count, dp_size + 1).round().astype(int)
    return int(bounds[dp_rank]), int(bounds[dp_rank + 1])


def data_parallel_slice(samples, dp_rank: int, dp_size: int) -> torch.Tensor:
    """This rank's share of a ``[N, s+1]`` tensor or a TokenDataset, as a tensor."""
    lo, hi = data_parallel_bounds(len(samples), dp_rank, dp_size)
    if isinstance(samples, torch.Tensor):
        return samples[lo:hi]
    return samples.take(hi - lo, lo)


class _TokenizerView:
    """What megatron-core's GPTDataset asks of a tokenizer. The samples do not depend on
    it (the data is already tokenised), so its identity in the cache key is constant.
    It has no ``pad``: no token of the data is ever masked out as padding."""

    vocab_size = None
    unique_identifiers = collections.OrderedDict(tokenizer="nemo_minitron")

    def __init__(self, eod: int):
        self.eod = eod


@dataclasses.dataclass
class Corpus:
    """A validated blend with its split and data cache, ready to be opened as data sets."""

    blend: DataBlend
    split: str | None  # as given
    fractions: tuple[float, float, float] | None
    cache: DataCache
    vocab_size: int | None = None
    split_flag: str = "--split"

    @property
    def flag(self) -> str:
        return self.blend.flag

    @property
    def masked(self) -> bool:
        """Made of completions (prompt + completion records): training reads a loss mask too."""
        return any(i.source.kind == "completions" for i in self.blend.items)

    def has_part(self, part: str) -> bool:
        return self.fractions is None or self.fractions[PARTS.index(part)] > 0

    def require_part(self, part: str) -> None:
        """A one-line error when the split leaves nothing of ``part`` to read."""
        require(self.has_part(part), f"{self.split_flag} {self.split} leaves no "
                                     f"{'validation' if part == 'valid' else 'training'} part of {self.flag} to read")

    @property
    def split_shares(self) -> str:
        """The split as megatron-core applies it: its weights normalised (50,60 -> 45.5/54.5/0 %)."""
        assert self.fractions is not None
        return "/".join(f"{100 * f:.3g}" for f in self.fractions) + " %"

    def check_parts(self, *parts: str, eval_flag: str | None = None) -> None:
        """Before any work: under a split, every source has a document in each of ``parts``
        (megatron-core divides each source's documents, rounding the bounds; a text file's
        documents are its paragraphs). Reads the sources that are text (no tokenising).
        ``eval_flag``: where else held-out data can come from, for the message."""
        if self.fractions is None:
            return
        matrix = self._split_matrix()
        for item in self.blend.items:
            count = None
            for part in parts:
                bounds = matrix[PARTS.index(part)]
                if count is None:
                    count = document_count(item.source, self.flag)
                first, last = (int(round(b * float(count))) for b in bounds) if bounds else (0, 0)
                what = "validation" if part == "valid" else "training"
                hint = " (a text file's documents are its paragraphs: blank lines separate them)" \
                    if item.source.kind in ("text", "folder") else ""
                require(last > first, f"{self.split_flag} {self.split} leaves no document of {self.flag} "
                                      f"'{item.source.label}' for {what}: it holds {count} document"
                                      f"{'s' if count != 1 else ''}{hint}; give a larger {what} share or more "
                                      f"documents" + (f", or {eval_flag}" if part == "valid" and eval_flag else ""))

    # ------------------------------------------------------------------ helpers
    def _prefixes(self, tokenizer, progress: bool) -> list[str]:
        """Every source as a Megatron prefix; text sources are tokenised into the cache by
        rank 0 (collective: every rank waits for it)."""
        key = tokenizer_fingerprint(tokenizer) if any(i.source.is_text for i in self.blend.items) else ""
        prefixes = [self.cache.text_prefix(i.source, key) if i.source.is_text else i.source.path
                    for i in self.blend.items]
        ok, error = True, None
        if is_rank0():
            try:
                for item, prefix in zip(self.blend.items, prefixes):
                    if item.source.is_text and not self.cache.is_complete(prefix):
                        log.info("tokenising %s into the data cache %s", item.source.label, Path(prefix).parent)
                        self.cache.tokenize(item.source, tokenizer, prefix, progress=progress)
            except BaseException as e:  # every rank must learn of it, or the others wait forever
                ok, error = False, e
        if not all_ranks_ok(ok):
            if error is not None:
                raise error
            raise RuntimeError("rank 0 failed to tokenise the data (see its log)")
        return prefixes

    def _split_matrix(self) -> list:
        """megatron-core's bounds of each part (fractions of the documents), from its own parser."""
        return convert_split_vector_to_split_matrix(parse_and_normalize_split(self._split_string()))

    def _part_sequences(self, header: IndexHeader, index: int) -> tuple[int, int]:
        """The sequences ``[first, last)`` of part ``index``, split as megatron-core splits them."""
        bounds = self._split_matrix()[index]
        if bounds is None:
            return 0, 0
        return int(round(bounds[0] * float(header.sequences))), int(round(bounds[1] * float(header.sequences)))

    def _part_tokens(self, header: IndexHeader, index: int) -> int:
        """Tokens of the sequences in part ``index``."""
        return header.tokens(*self._part_sequences(header, index))

    def _log_shares(self, built, headers: list[IndexHeader], part_tokens: list[int], weights, index: int,
                    count: int, where: str) -> None:
        """Once per data set of a blend: each source's weight, documents and tokens in the part
        read, and the samples megatron-core drew from it."""
        drawn = np.bincount(np.asarray(built.dataset_index[:count]), minlength=len(headers))
        shares = weights or [float(t) for t in part_tokens]  # one pass: each source whole
        total = sum(shares)
        for item, header, tokens, share, n in zip(self.blend.items, headers, part_tokens, shares, drawn):
            first, last = self._part_sequences(header, index)
            if weights is None:
                weight = f"{share / total:.1%} (one pass over every source)"
            elif item.weight is not None:
                weight = f"weight {item.weight:g} ({share / total:.1%})"
            else:
                weight = f"{share / total:.1%} by size"
            log.info("data: %s%s: %s, %s documents, %s tokens -> %s of %s samples", item.source.label, where,
                     weight, f"{last - first:,}", f"{tokens:,}", f"{int(n):,}", f"{count:,}")

    def _split_string(self) -> str:
        # fixed-point: megatron-core parses the string with the regex [.0-9]+ (no exponents)
        return "1,0,0" if self.fractions is None else ",".join(f"{f:.12f}" for f in self.fractions)

    # ------------------------------------------------------------------ the data set
    def dataset(self, tokenizer, *, seq_len: int, seed: int, part: str = "train", num_samples: int | None = None,
                exact: bool = False, samples_flag: str = "--samples", progress: bool = False,
                shown: str | None = None) -> TokenDataset:
        """Collective. ``num_samples`` given: that many samples, sources drawn by weight
        (Megatron repeats a source that runs out, unless ``exact``: then asking for more than
        one pass holds is an error). None: one pass over the part, sources in proportion to size.
        A sample holds ``seq_len`` + 1 tokens (the last one is only a target); messages count
        ``seq_len`` tokens per sample, as the user set them, or say ``shown``."""
        require(part in PARTS, f"unknown data part '{part}' (allowed: {', '.join(PARTS)})")
        require(seq_len >= 1, f"--seq-len must be >= 1 (got {seq_len})")
        self.require_part(part)
        index = PARTS.index(part) if self.fractions is not None else 0  # no split: all of it is "train"
        prefixes = self._prefixes(tokenizer, progress)
        headers = [IndexHeader(p, self.flag) for p in prefixes]
        part_tokens = [self._part_tokens(h, index) for h in headers]
        one_pass = [max(0, (t - 1) // seq_len) for t in part_tokens]  # Megatron drops the last partial sample
        where = "" if self.fractions is None else \
            f" in the {part} part ({self.split_flag} {self.split}: train/validation/test {self.split_shares})"
        shown = shown or f"{seq_len} tokens (--seq-len {seq_len})"
        for item, tokens, samples in zip(self.blend.items, part_tokens, one_pass):
            require(samples >= 1, f"{self.flag} '{item.source.label}': {tokens} tokens{where} is shorter than one "
                                  f"sample (--seq-len {seq_len} needs {seq_len + 1} tokens)")
        if num_samples is not None:
            require(num_samples >= 1, f"{samples_flag} must be >= 1 (got {num_samples})")
            require(not exact or num_samples <= sum(one_pass),
                    f"{samples_flag} {num_samples} is more than the data holds: {self.blend.label}{where} has "
                    f"{sum(one_pass)} samples of {shown}")

        weights = None
        if num_samples is not None and len(prefixes) > 1:
            # Megatron needs weights to draw a given number of samples; without the user's,
            # sources are mixed in proportion to their tokens.
            weights = [i.weight for i in self.blend.items] if self.blend.weighted else [float(t) for t in part_tokens]
        sizes = [None] * 3
        if weights is not None:
            sizes = [0] * 3
        sizes[index] = num_samples
        eod = tokenizer.eos_token_id if tokenizer is not None and tokenizer.eos_token_id is not None else 0
        started = time.time()
        built, complete = self._build(prefixes, headers, weights, sizes, index, seed, seq_len, eod,
                                      num_samples or sum(one_pass), shown)
        mask = None
        if self.masked:  # same document lengths, seed and sizes: megatron-core cuts the same samples
            mask, _ = self._build([str(Path(p).with_name("mask")) for p in prefixes], None, weights, sizes, index,
                                  seed, seq_len, 0, num_samples or sum(one_pass))
        dataset = TokenDataset(built, seq_len, num_samples, mask)
        if len(prefixes) > 1:
            self._log_shares(built, headers, part_tokens, weights, index, len(dataset), where)
        log.info("data: %d samples of %s from %s%s (sample index %s in %.2f s)%s", len(dataset), shown,
                 self.blend.label, where, "loaded" if complete else "built", time.time() - started,
                 "; trained on the completions' tokens only" if mask is not None else "")
        return dataset

    def _build(self, prefixes: list[str], headers: list[IndexHeader] | None, weights, sizes, index: int, seed: int,
               seq_len: int, eod: int, count: int, shown: str = ""):
        """megatron-core's data set of part ``index`` over ``prefixes``, its sample index
        cached (collective); returns (data set, whether the index was cached)."""
        config = GPTDatasetConfig(
            random_seed=seed, sequence_length=seq_len, blend=(prefixes, weights), split=self._split_string(),
            tokenizer=_TokenizerView(eod), reset_position_ids=False, reset_attention_mask=False,
            eod_mask_loss=False, create_attention_mask=False, mmap_bin_files=True)
        # Build only the part that is read (megatron-core builds every part with a share).
        config.split_matrix = [m if i == index else None for i, m in enumerate(config.split_matrix)]
        headers = headers or [IndexHeader(p, self.flag) for p in prefixes]
        key = hashlib.sha256(json.dumps({
            "prefixes": [[str(Path(p).resolve()), h.bin_size, Path(p + ".idx").stat().st_mtime_ns]
                         for p, h in zip(prefixes, headers)],
            "weights": weights, "sizes": sizes, "seed": seed, "seq_len": seq_len, "split": config.split_matrix,
            "megatron_core": _megatron_version()}).encode()).hexdigest()[:24]
        directory, complete = self.cache.index_dir(key) if is_rank0() else (None, None)
        directory, complete = broadcast_object((str(directory) if directory else None, complete))
        config.path_to_cache = directory
        if not complete:
            log.info("building the sample index of %s (%d samples of %s) in %s", self.blend.label,
                     count, shown, directory)
        built = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()[index]
        if not complete:
            barrier()
            if is_rank0():
                self.cache.mark_complete(Path(directory))
            barrier()
        return built, complete


def _megatron_version() -> str:
    try:
        return importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def check_corpus(values: Any, *, flag: str = "--data", vocab_size: int | None = None, split: str | None = None,
                 split_flag: str = "--split", cache_dir: str | None = None, cache_flag: str = "--data-cache",
                 tokenizer=None, parts: Sequence[str] = ("train",)) -> Corpus:
    """Everything about the data that can be wrong, checked before any work: the blend,
    every source, token ids of a sample of each indexed source against ``vocab_size``,
    the split (``parts``: those the caller reads; each has a share, and every source has
    documents in it) and the cache
    directory. With ``tokenizer``, JSONL sources not yet in the cache are read once for
    malformed records."""
    blend = parse_blend(values, flag)
    completions = [i.source.kind == "completions" for i in blend.items]
    require(all(completions) or not any(completions),
            f"{flag}: completions ({', '.join(i.source.label for i in blend.items if i.source.kind == 'completions')}) "
            "cannot be blended with other sources: a blend trains either on every token or on completions only")
    fractions = split_fractions(split, split_flag)
    cache = DataCache(check_cache_dir(cache_dir, cache_flag))
    for item in blend.items:
        if not item.source.is_text and vocab_size is not None:
            check_vocabulary(IndexHeader(item.source.path, flag), vocab_size, flag)
    if tokenizer is not None and any(i.source.is_text for i in blend.items):
        key = tokenizer_fingerprint(tokenizer)
        for item in blend.items:
            if item.source.is_text and not cache.is_complete(cache.text_prefix(item.source, key)):
                check_documents(item.source, flag, tokenizer)
    corpus = Corpus(blend, split, fractions, cache, vocab_size, split_flag)
    for part in parts:
        corpus.require_part(part)
    corpus.check_parts(*parts)
    return corpus


def eval_corpus(train: Corpus, eval_values: Sequence[str] | None, *, flag: str = "--eval-data",
                default: Sequence[str] = ("builtin:heldout",), **kwargs) -> Corpus:
    """Held-out data for a training run, read as its ``valid`` part: ``eval_values`` (whole)
    when given; else the validation part of the training data when its split has one;
    else ``default``, for built-in training data only: the loss of a model trained on the
    user's own text is not measured on other text without being asked (a UsageError
    says what to give). ``kwargs`` as for ``check_corpus``, without a split."""
    if eval_values:
        return check_corpus(list(eval_values), flag=flag, **kwargs)
    if train.fractions is not None and train.has_part("valid"):
        train.check_parts("valid", eval_flag=flag)
        return train
    own = [i.source.label for i in train.blend.items if i.source.kind != "builtin"]
    require(not own, f"{train.flag} {' '.join(own)} is not built-in data, and the default held-out data "
                     f"({' '.join(default)}) is other text: give {flag} (your held-out text, or "
                     f"{' '.join(default)}) or {train.split_flag} (e.g. 98,2,0: the validation part of {train.flag})")
    return check_corpus(list(default), flag=flag, **kwargs)
