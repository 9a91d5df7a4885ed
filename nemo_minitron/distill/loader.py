"""Training batches: a torch DataLoader over the training data set, in Megatron's order.

Step ``s`` of a run that resumed with ``consumed`` samples reads global samples
``[consumed + s' * global_batch, ...)`` for each later step ``s'``: data-parallel rank
``r`` takes the ``r``-th contiguous share of each global batch, cut into micro-batches.
The order depends on the number of consumed samples alone (kept in every checkpoint),
so a resumed run reads exactly the samples an uninterrupted one would, at any layout.
Worker processes read and collate ahead of the schedule; with CUDA, into pinned memory.
"""

from __future__ import annotations

from typing import Iterator

import torch


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


def collate(samples: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``seq_len + 1`` windows -> inputs and next-token labels."""
    windows = torch.stack(samples)
    return {"tokens": windows[:, :-1].contiguous(), "labels": windows[:, 1:].contiguous()}


class _WithIndex(torch.utils.data.Dataset):
    """Each sample with its index in the data set (what a teacher-logit cache is read by)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return index, self.dataset[index]


def collate_with_index(items: list[tuple[int, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """As ``collate``, plus ``index``: the samples' indices in the training data set."""
    batch = collate([window for _, window in items])
    batch["index"] = torch.tensor([i for i, _ in items], dtype=torch.long)
    return batch


def _ignore_stop_signals(worker_id: int) -> None:
    """A worker leaves SIGTERM/SIGUSR1 to the training process, which saves and then ends
    its workers (Slurm signals every process of a job step; by default a worker would die
    and take the step with it)."""
    import signal

    from nemo_minitron.runtime.signals import SIGNALS

    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def training_batches(dataset, *, consumed: int, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int,
                     workers: int = 2, with_index: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """An endless iterator of this rank's micro-batches, to hand to the pipeline schedule;
    ``with_index``: each carries its samples' indices (``index``) too."""
    sampler = StepSampler(len(dataset), consumed, global_batch, micro_batch, dp_rank, dp_size)
    loader = torch.utils.data.DataLoader(
        _WithIndex(dataset) if with_index else dataset, batch_sampler=sampler,
        collate_fn=collate_with_index if with_index else collate, num_workers=workers,
        pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
        worker_init_fn=_ignore_stop_signals if workers > 0 else None,
        prefetch_factor=4 if workers > 0 else None)
    return iter(loader)
