"""The teacher-logit cache: a teacher's top-K log-probabilities of every training sample,
computed once and read by memory mapping, so that many students (the candidates of an
architecture search) are distilled without running the teacher again.

    DIR/index.json               what it was made from (teacher, tokenizer, data and split,
                                 sequence length, seed, temperature), K, dtypes, the shards
    DIR/dpNNNNN.ids.npy          int32 [n, seq_len, K]   top-K token ids, most probable first
    DIR/dpNNNNN.log_probs.npy    bf16 (stored as uint16) or float32 [n, seq_len, K]
    DIR/dpNNNNN.log_rest.npy     float32 [n, seq_len]    log of the mass outside the top-K
    DIR/dpNNNNN.hashes.npy       int64 [n]               each sample's token hash

Samples are identified by their index in the training data set: the ``train`` part of
``--data`` as megatron-core's GPTDataset orders it for the seed and sequence length,
built for ``dataset_samples`` samples (``--samples``; None: one pass), which is what a
live-teacher run of ``steps x global_batch`` equal samples reads. Each data-parallel rank of the writing run writes
one shard, a contiguous range of indices, from its last pipeline stage (the top-K is
found across the tensor-parallel vocabulary shards first); readers map any index to
its shard, so a cache written at one TP/PP/DP layout is read at any other. Everything
is written into a temporary directory renamed into place when every rank has finished.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from megatron.core import parallel_state as ps
from tqdm import tqdm

from nemo_minitron.checkpoint.store import (
    atomic_directory,
    load_checkpoint,
    load_tokenizer,
    read_info,
)
from nemo_minitron.config import Names
from nemo_minitron.data.dataset import check_corpus, data_parallel_bounds
from nemo_minitron.distill.checks import tokenizer_fingerprint
from nemo_minitron.distill.config import TeacherLogitsConfig
from nemo_minitron.distill.data import sample_hashes
from nemo_minitron.distill.losses import SparseTeacher, sparse_teacher
from nemo_minitron.errors import UsageError, require
from nemo_minitron.files import check_new_output
from nemo_minitron.model.forward import position_ids, run_forward_only, to_device
from nemo_minitron.runtime.config import stage_configs
from nemo_minitron.runtime.distributed import check_world_size, init_distributed, is_rank0, layout
from nemo_minitron.runtime.precision import log_compute_dtype, resolve_dtype

log = logging.getLogger("nemo_minitron")

FORMAT = "nemo-minitron-teacher-logits"
VERSION = 1
INDEX = "index.json"
PARTS = ("ids", "log_probs", "log_rest", "hashes")


def bytes_per_token(top_k: int, value_dtype: str) -> int:
    """Disk bytes of one token: K ids (int32) and K log-probabilities, plus the bucket (float32)."""
    return top_k * (4 + (2 if value_dtype == "bfloat16" else 4)) + 4


# ---------------------------------------------------------------------- reading
class TeacherLogits:
    """A cache opened for reading (``TeacherLogits.open``); ``read(indices)`` gives the
    teacher's sparse distributions of those samples."""

    def __init__(self, path: Path, index: dict[str, Any]):
        self.path, self.index = Path(path), index
        self.starts = [s["start"] for s in index["shards"]]
        self._arrays: dict[str, dict[str, np.ndarray]] = {}

    @classmethod
    def open(cls, path: str | Path, flag: str = "--teacher-logits") -> "TeacherLogits":
        path = Path(path)
        require(path.is_dir(), f"{flag} '{path}' does not exist (write one with nemo-minitron teacher-logits)")
        try:
            index = json.loads((path / INDEX).read_text())
        except (OSError, json.JSONDecodeError):
            raise UsageError(f"{flag} '{path}' is not a teacher-logit cache (no readable {INDEX})") from None
        require(index.get("format") == FORMAT, f"{flag} '{path}/{INDEX}' is not a {FORMAT} index")
        require(index.get("version") == VERSION, f"{flag} '{path}' has format version {index.get('version')}, this "
                                                 f"nemo-minitron reads version {VERSION}")
        for shard in index["shards"]:
            for part in PARTS:
                require((path / f"{shard['name']}.{part}.npy").is_file(),
                        f"{flag} '{path}' is incomplete: {shard['name']}.{part}.npy is missing")
        return cls(path, index)

    # what the cache holds
    @property
    def num_samples(self) -> int:
        return int(self.index["num_samples"])

    @property
    def top_k(self) -> int:
        return int(self.index["top_k"])

    @property
    def seq_len(self) -> int:
        return int(self.index["seq_len"])

    @property
    def temperature(self) -> float:
        return float(self.index["temperature"])

    @property
    def identity(self) -> str:
        """A short hash of the index: which cache a run was trained from (checked on resume)."""
        return hashlib.sha256(json.dumps(self.index, sort_keys=True).encode()).hexdigest()[:16]

    def hashes(self) -> np.ndarray:
        return np.concatenate([self._shard(i)["hashes"] for i in range(len(self.starts))]) if self.starts else \
            np.zeros(0, dtype=np.int64)

    @property
    def dataset_samples(self) -> int | None:
        """The sample count the training data set was built for (None: one pass)."""
        return self.index["dataset_samples"]

    def check_settings(self, *, tokenizer: str, seq_len: int, seed: int, vocab_size: int, temperature: float,
                       data: str, split: str | None, names: Names, data_names: Names,
                       flag: str = "--teacher-logits") -> None:
        """Refuse a cache made for another tokenizer, sequence length, seed, vocabulary,
        temperature, data or split (one line, naming what differs); before any work."""
        made = self.index
        where = f"{flag} '{self.path}'"
        require(made["tokenizer"] == tokenizer, f"{where} was written with another tokenizer (teacher "
                                                f"{made['teacher']})")
        require(made["vocab_size"] == vocab_size, f"{where} was written for a vocabulary of {made['vocab_size']}, "
                                                  f"not {vocab_size}")
        require(made["seq_len"] == seq_len, f"{where} was written for --seq-len {made['seq_len']}, not "
                                            f"{names('seq_len')} {seq_len}")
        require(made["seed"] == seed, f"{where} was written with --seed {made['seed']}, not --seed {seed}")
        require(abs(made["temperature"] - temperature) <= 1e-12 * max(1.0, temperature),
                f"{where} holds log-probabilities at temperature {made['temperature']:g}, not "
                f"{names('kd_temperature')} {temperature:g}")
        require(made["data"] == data, f"{where} was written for other data ({made['data']}), not --data {data}")
        require(made["split"] == split, f"{where} was written for --split {made['split']}, not "
                                        f"{data_names('split')} {split}")

    def check_samples(self, samples, flag: str = "--teacher-logits") -> None:
        """The training data set must hold the cached samples token for token (checked on up
        to 64 samples spread over the cache: the same data files, rewritten, are other data)."""
        where = f"{flag} '{self.path}'"
        require(len(samples) >= self.num_samples, f"{where} was written for other data ({self.index['data']}): it "
                                                  f"covers {self.num_samples} samples, --data holds {len(samples)}")
        checked = sorted({int(i) for i in np.linspace(0, self.num_samples - 1, min(64, self.num_samples))})
        stored = self.hashes()[checked]
        differ = [i for i, a, b in zip(checked, sample_hashes(samples, checked), stored) if a != b]
        require(not differ, f"{where} was written for other data ({self.index['data']}): sample {differ[0] if differ else 0}"
                            f" and {max(len(differ) - 1, 0)} more of those checked differ from --data's")

    # reading samples
    def _shard(self, i: int) -> dict[str, np.ndarray]:
        if i not in self._arrays:
            name = self.index["shards"][i]["name"]
            self._arrays[i] = {part: np.load(self.path / f"{name}.{part}.npy", mmap_mode="r") for part in PARTS}
        return self._arrays[i]

    def read(self, indices: torch.Tensor | Sequence[int]) -> SparseTeacher:
        """The cached distributions of samples ``indices`` [b]: ids [b, s, K] (int64),
        log-probabilities [b, s, K] and log_rest [b, s] (float32), on the CPU."""
        ids, values, rest = [], [], []
        for g in (int(i) for i in indices):
            require(0 <= g < self.num_samples, f"sample {g} is not in the teacher-logit cache '{self.path}' "
                                               f"(it covers samples 0..{self.num_samples - 1})")
            s = bisect.bisect_right(self.starts, g) - 1
            row = g - self.starts[s]
            arrays = self._shard(s)
            ids.append(torch.from_numpy(np.array(arrays["ids"][row])).long())
            raw = np.array(arrays["log_probs"][row])
            if self.index["value_dtype"] == "bfloat16":
                values.append(torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16).float())
            else:
                values.append(torch.from_numpy(raw))
            rest.append(torch.from_numpy(np.array(arrays["log_rest"][row])))
        return SparseTeacher(torch.stack(ids), torch.stack(values), torch.stack(rest))


# ---------------------------------------------------------------------- writing
class _ShardWriter:
    """One data-parallel rank's shard: memory-mapped arrays filled row by row."""

    def __init__(self, directory: Path, name: str, count: int, seq_len: int, top_k: int, value_dtype: str,
                 hashes: np.ndarray):
        def array(part, dtype, shape):
            return np.lib.format.open_memmap(directory / f"{name}.{part}.npy", mode="w+", dtype=dtype, shape=shape)

        self.value_dtype = value_dtype
        self.ids = array("ids", np.int32, (count, seq_len, top_k))
        self.values = array("log_probs", np.uint16 if value_dtype == "bfloat16" else np.float32,
                            (count, seq_len, top_k))
        self.rest = array("log_rest", np.float32, (count, seq_len))
        stored = array("hashes", np.int64, (count,))
        stored[:] = hashes
        stored.flush()
        self.filled = np.zeros(count, dtype=bool)

    def put(self, rows: torch.Tensor, teacher: SparseTeacher) -> None:
        r = rows.cpu().numpy()
        self.ids[r] = teacher.ids.to(torch.int32).cpu().numpy()
        if self.value_dtype == "bfloat16":
            self.values[r] = teacher.log_probs.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)
        else:
            self.values[r] = teacher.log_probs.float().cpu().numpy()
        self.rest[r] = teacher.log_rest.float().cpu().numpy()
        self.filled[r] = True

    def close(self) -> None:
        assert self.filled.all(), "every sample of the shard is written"
        for a in (self.ids, self.values, self.rest):
            a.flush()


def write_teacher_logits(teacher: str, data: Sequence[str], out: str, config: TeacherLogitsConfig | None = None, *,
                         progress: bool = True, names: Names | None = None, data_names: Names | None = None,
                         **options: Any) -> Path:
    """Run ``teacher`` over the first ``samples`` training samples of ``data`` and store its
    top-K log-probabilities in the new directory ``out`` (collective over all ranks).

    ``config``: a TeacherLogitsConfig; ``options``: any of its fields, or ``tp``, ``pp``,
    ``seed``, ``dtype`` (the teacher's compute dtype; default: as stored), ``split``,
    ``cache_dir``. The samples are those of the training data set a distillation of
    ``steps x global_batch = samples`` reads (one pass over the train part without ``samples``)."""
    configs = stage_configs(TeacherLogitsConfig, config, options, names, data_names)
    cfg, run, data_opts, names, data_names = configs.stage, configs.run, configs.data, configs.names, configs.data_names
    tp, pp = configs.parallel.tp, configs.parallel.pp

    # ---- everything is checked before the teacher is loaded
    info = read_info(teacher)
    desc = info.description
    require(cfg.top_k <= desc.vocab_size, f"{names('top_k')} {cfg.top_k} is larger than the vocabulary "
                                          f"({desc.vocab_size})")
    require(cfg.seq_len <= desc.max_position_embeddings, f"{names('seq_len')} {cfg.seq_len} is longer than the "
                                                         f"teacher allows ({desc.max_position_embeddings})")
    dtype = resolve_dtype(run.dtype, names("dtype"))
    out_path = check_new_output(out)
    desc.check_layout(tp, pp)
    dp = check_world_size(tp, pp)
    tokenizer = load_tokenizer(teacher)
    corpus = check_corpus(data, vocab_size=desc.vocab_size, split=data_opts.split, split_flag=data_names("split"),
                          cache_dir=data_opts.cache_dir, cache_flag=data_names("cache_dir"), tokenizer=tokenizer,
                          parts=("train",))

    # ---- work
    init_distributed(tp, pp, run.seed)
    samples = corpus.dataset(tokenizer, seq_len=cfg.seq_len, seed=run.seed, part="train", num_samples=cfg.samples,
                             samples_flag=names("samples"), progress=progress)
    log_compute_dtype(dtype)
    model, _ = load_checkpoint(teacher, dtype=dtype.torch)
    dp_rank = ps.get_data_parallel_rank()
    lo, hi = data_parallel_bounds(len(samples), dp_rank, dp)
    mine = samples.take(hi - lo, lo)
    is_writer = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
    device = layout().device
    log.info("teacher logits of %s: %d samples x %d tokens, top %d at T=%g (%s), %d bytes per token", teacher,
             len(samples), cfg.seq_len, cfg.top_k, cfg.kd_temperature, cfg.value_dtype,
             bytes_per_token(cfg.top_k, cfg.value_dtype))

    bar = tqdm(total=len(mine), desc="teacher logits", unit="sample", disable=not (progress and is_rank0()),
               dynamic_ncols=True)
    with atomic_directory(out_path) as tmp:
        name = f"dp{dp_rank:05d}"
        writer = _ShardWriter(tmp, name, len(mine), cfg.seq_len, cfg.top_k, cfg.value_dtype,
                              sample_hashes(mine)) if is_writer else None
        batches = [{"tokens": mine[i:i + cfg.micro_batch, :-1].contiguous(),
                    "row": torch.arange(i, min(i + cfg.micro_batch, len(mine)))}
                   for i in range(0, len(mine), cfg.micro_batch)]

        def forward_step(data_iterator, model):
            batch = to_device(next(data_iterator), device)
            output = model(batch["tokens"], position_ids(batch["tokens"]), None)
            bar.update(len(batch["row"]))

            def loss_func(logits: torch.Tensor):
                top = sparse_teacher(logits, cfg.top_k, cfg.kd_temperature, desc.vocab_size)
                if writer is not None:
                    writer.put(batch["row"], top)
                return torch.zeros((), device=logits.device), {}

            return output, loss_func

        run_forward_only(model, batches, forward_step)
        bar.close()
        if writer is not None:
            writer.close()
        if is_rank0():
            index = {"format": FORMAT, "version": VERSION, "teacher": str(teacher), "teacher_model": desc.to_dict(),
                     "tokenizer": tokenizer_fingerprint(teacher), "data": corpus.blend.label,
                     "split": data_opts.split, "seed": run.seed, "seq_len": cfg.seq_len,
                     "dataset_samples": cfg.samples, "num_samples": len(samples), "vocab_size": desc.vocab_size,
                     "top_k": cfg.top_k, "temperature": cfg.kd_temperature, "value_dtype": cfg.value_dtype,
                     "compute_dtype": dtype.name,
                     "bytes_per_token": bytes_per_token(cfg.top_k, cfg.value_dtype),
                     "written_at": {"tp": tp, "pp": pp, "dp": dp},
                     "shards": [{"name": f"dp{r:05d}", "start": start, "count": stop - start}
                                for r in range(dp) for start, stop in [data_parallel_bounds(len(samples), r, dp)]]}
            (tmp / INDEX).write_text(json.dumps(index, indent=2))
    log.info("wrote %s (%.1f MB)", out_path, sum(f.stat().st_size for f in out_path.iterdir()) / 1e6
             if is_rank0() else 0.0)
    return out_path
