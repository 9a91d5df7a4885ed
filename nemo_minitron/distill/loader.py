"""Training batches: a torch DataLoader over the training data set, in Megatron's order.

Step ``s`` of a run that resumed with ``consumed`` samples reads global samples
``[consumed + s' * global_batch, ...)`` for each later step ``s'``: data-parallel rank
``r`` takes the ``r``-th contiguous share of each global batch, cut into micro-batches.
The order depends on the number of consumed samples alone (kept in every checkpoint),
so a resumed run reads exactly the samples an uninterrupted one would, at any layout.
Worker processes read and collate ahead of the schedule; with CUDA, into pinned memory.

A batch holds ``tokens`` and ``labels`` [b, s]; from completions also ``loss_mask`` [b, s]
(1.0 where the label is a completion token, the only ones trained on); in a run that mixes
real and synthetic data (``MixedSamples``) also ``synthetic`` [b] (which samples are the
teacher's generations); with a teacher-logit cache ``index`` [b].
"""

from __future__ import annotations

import math
import signal
from typing import Iterator

import torch

from nemo_minitron.runtime.signals import SIGNALS


class StepSampler(torch.utils.data.Sampler):
    """Micro-batches of sample indices for one data-parallel rank, from ``consumed`` on,
    endlessly (indices wrap around the data set's length)."""

    def __init__(self, num_samples: int, consumed: int, global_batch: int, micro_batch: int, dp_rank: int,
                 dp_size: int):
        assert global_batch % (micro_batch * dp_size) == 0, "global batch must split into micro-batches per rank"
        self.num_samples, self.consumed = num_samples, consumed
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.dp_rank, self.per_rank = dp_rank, global_batch // dp_size

    def __iter__(self) -> Iterator[list[int]]:
        start = self.consumed
        while True:
            first = start + self.dp_rank * self.per_rank
            for offset in range(0, self.per_rank, self.micro_batch):
                yield [(first + offset + j) % self.num_samples for j in range(self.micro_batch)]
            start += self.global_batch


class MixedSamples(torch.utils.data.Dataset):
    """Real and synthetic samples interleaved by a fixed rule: sample ``i`` is synthetic when
    ``floor((i + 1) f) > floor(i f)``, so every run of samples holds a share ``f`` of them, in
    an order that depends on ``i`` alone (resumes and layouts read the same samples)."""

    def __init__(self, real, synthetic, fraction: float, length: int):
        assert 0 < fraction < 1
        self.real, self.synthetic, self.fraction, self.length = real, synthetic, fraction, length

    def __len__(self) -> int:
        return self.length

    def _synthetic_before(self, i: int) -> int:
        return math.floor(i * self.fraction + 1e-9)

    def item(self, i: int) -> dict[str, torch.Tensor]:
        before = self._synthetic_before(i)
        if self._synthetic_before(i + 1) > before:
            j = before % len(self.synthetic)
            window, mask = self.synthetic[j], self.synthetic.loss_mask(j)
            return {"window": window, "synthetic": torch.tensor(True),
                    "loss_mask": torch.ones(window.shape[0]) if mask is None else mask}
        j = (i - before) % len(self.real)
        window = self.real[j]
        return {"window": window, "synthetic": torch.tensor(False), "loss_mask": torch.ones(window.shape[0])}

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.item(i)["window"]


def _item(dataset, index: int) -> dict[str, torch.Tensor]:
    if isinstance(dataset, MixedSamples):
        return dataset.item(index)
    item = {"window": dataset[index]}
    mask = dataset.loss_mask(index) if getattr(dataset, "masked", False) else None
    if mask is not None:
        item["loss_mask"] = mask
    return item


def collate(items: list) -> dict[str, torch.Tensor]:
    """``seq_len + 1`` windows (or items of ``_TrainingItems``) -> inputs, next-token labels and
    the masks of the labels."""
    if isinstance(items[0], torch.Tensor):
        items = [{"window": w} for w in items]
    windows = torch.stack([i["window"] for i in items])
    batch = {"tokens": windows[:, :-1].contiguous(), "labels": windows[:, 1:].contiguous()}
    for key in ("loss_mask", "synthetic", "index"):
        if key in items[0]:
            value = torch.stack([torch.as_tensor(i[key]) for i in items])
            batch[key] = value[:, 1:].contiguous() if key == "loss_mask" else value
    return batch


class _TrainingItems(torch.utils.data.Dataset):
    """Each sample with its masks and, ``with_index``, its index in the data set (what a
    teacher-logit cache is read by)."""

    def __init__(self, dataset, with_index: bool):
        self.dataset, self.with_index = dataset, with_index

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = _item(self.dataset, index)
        if self.with_index:
            item["index"] = torch.tensor(index, dtype=torch.long)
        return item


def _ignore_stop_signals(worker_id: int) -> None:
    """A worker leaves SIGTERM/SIGUSR1 to the training process, which saves and then ends
    its workers (Slurm signals every process of a job step; by default a worker would die
    and take the step with it)."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def training_batches(dataset, *, consumed: int, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int,
                     workers: int, with_index: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """An endless iterator of this rank's micro-batches, to hand to the pipeline schedule;
    ``workers``: DataLoader processes (TrainingConfig.data_workers; 0: none);
    ``with_index``: each carries its samples' indices (``index``) too."""
    sampler = StepSampler(len(dataset), consumed, global_batch, micro_batch, dp_rank, dp_size)
    loader = torch.utils.data.DataLoader(
        _TrainingItems(dataset, with_index), batch_sampler=sampler, collate_fn=collate, num_workers=workers,
        pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
        worker_init_fn=_ignore_stop_signals if workers > 0 else None,
        prefetch_factor=4 if workers > 0 else None)
    return iter(loader)
