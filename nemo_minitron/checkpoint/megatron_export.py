"""Write a model as a Megatron-LM / Megatron-Bridge checkpoint (``export --megatron-out DIR``).

    DIR/latest_checkpointed_iteration.txt   "0"  (Megatron-LM's tracker; Bridge writes it too)
    DIR/latest_train_state.pt               (Bridge's tracker)
    DIR/iter_0000000/
      metadata.json .metadata *.distcp      megatron-core torch_dist, stacked GPTModel keys (a
                                            hybrid's MambaModel: per-layer keys)
      common.pt                             {"args": Namespace, "checkpoint_version": 3.0, "iteration": 0, ...}
      run_config.yaml                       model: (GPTModelProvider; a hybrid: MambaModelProvider)
                                            checkpoint: tokenizer:
      heterogeneous_layers_config.json      a per-layer model's block_configs (also inline in the args)
      train_state.pt                        Bridge's TrainState
      tokenizer/                            Hugging Face tokenizer files

The layout follows Megatron-LM ``megatron/training/checkpointing.py: save_checkpoint``
(``generate_state_dict``: ``model``, ``args``, ``checkpoint_version``, ``iteration``) and
Megatron-Bridge ``megatron/bridge/training/checkpointing.py: save_checkpoint``
(``run_config.yaml``, ``train_state.pt``, ``latest_train_state.pt``, tokenizer assets).
Weights only: there is no optimizer or RNG state, so load it the way a pretrained
checkpoint is loaded (Megatron-LM ``--finetune`` or ``--no-load-optim --no-load-rng``;
Bridge ``checkpoint.pretrained_checkpoint``, or ``load`` with ``run_config.yaml``'s
``save_optim: false, save_rng: false``). Keys are those of megatron-core's local layer
spec, which names norm weights as Transformer Engine does.

The vocabulary is padded as asked (``padded_vocab``): ``megatron`` (a multiple of
``make_vocab_size_divisible_by`` 128 x the tensor-parallel size, Megatron-LM's rule),
``none`` (Bridge's ``should_pad_vocab: false``) or any multiple N. Rows past the true
vocabulary are zero. The directory appears only when complete.
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from nemo_minitron.checkpoint import megatron_config
from nemo_minitron.checkpoint.megatron_format import te_norm_keys
from nemo_minitron.checkpoint.store import CheckpointInfo, atomic_directory
from nemo_minitron.errors import UsageError, require
from nemo_minitron.model.description import ModelDescription
from nemo_minitron.model.params import unwrap
from nemo_minitron.runtime.distributed import barrier, is_rank0

log = logging.getLogger("nemo_minitron")

ITERATION = 0
MEGATRON_DIVISIBLE_BY = 128  # Megatron-LM's default --make-vocab-size-divisible-by
_VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


def padded_vocab(vocab_size: int, padding: str | int, tp: int) -> tuple[int, int, bool]:
    """(rows stored, make_vocab_size_divisible_by to record, should_pad_vocab) for
    ``--vocab-padding megatron | none | N``."""
    text = str(padding)
    if text == "none":
        require(vocab_size % tp == 0, f"--vocab-padding none: the vocabulary ({vocab_size}) is not divisible by "
                                      f"--tp {tp}; pad it (megatron, or a multiple N)")
        return vocab_size, 1, False
    if text == "megatron":
        multiple, divisible_by = MEGATRON_DIVISIBLE_BY * tp, MEGATRON_DIVISIBLE_BY
    else:
        try:
            multiple = int(text)
        except ValueError:
            raise UsageError(f"--vocab-padding must be megatron, none or a positive whole number (got '{text}')") from None
        require(multiple >= 1 and multiple % tp == 0, f"--vocab-padding {text} must be a positive multiple of "
                                                      f"--tp {tp}")
        divisible_by = multiple // tp
    return int(math.ceil(vocab_size / multiple) * multiple), divisible_by, True


def check_export(desc: ModelDescription, padding: tuple[int, int, bool]) -> None:
    """Everything that would make the export fail, before any work."""
    megatron_config.check_writable(desc)
    require(padding[0] >= desc.vocab_size, "the padded vocabulary must hold the vocabulary")


def _repad(sharded: dict, vocab_size: int, rows: int) -> None:
    """Replace the embedding / output-layer entries by tensors of ``rows`` global rows
    (TP-gathered, cut to the true vocabulary, zero-padded, re-sliced); collective over TP."""
    group = ps.get_tensor_model_parallel_group()
    rank, size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    for name, sh in sharded.items():
        if not isinstance(sh, ShardedTensor) or not sh.key.endswith(_VOCAB_KEYS):
            continue
        local = sh.data.detach()
        parts = [torch.empty_like(local) for _ in range(size)]
        if size > 1:
            dist.all_gather(parts, local.contiguous(), group=group)
        else:
            parts = [local]
        full = torch.cat(parts, dim=0)
        padded = full.new_zeros(rows, *full.shape[1:])
        padded[:vocab_size] = full[:vocab_size]
        mine = padded.chunk(size, dim=0)[rank].contiguous()
        sharded[name] = ShardedTensor.from_rank_offsets(sh.key, mine, (0, rank, size), replica_id=sh.replica_id,
                                                        allow_shape_mismatch=True)


def export_megatron(model, info: CheckpointInfo, out: str | Path, *, tokenizer_dir: Path | None,
                    vocab_padding: str | int, dtype: torch.dtype = torch.float32) -> Path:
    """Collective over all ranks: write ``model`` (at the current layout) as a Megatron-LM /
    Megatron-Bridge checkpoint directory ``out``."""
    desc = info.description
    out = Path(out)
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    rows, divisible_by, should_pad = padded_vocab(desc.vocab_size, vocab_padding, tp)
    check_export(desc, (rows, divisible_by, should_pad))
    name = f"iter_{ITERATION:07d}"
    final_tokenizer = (out.resolve() / name / "tokenizer") if tokenizer_dir is not None else None
    # Megatron-LM builds a heterogeneous model when args name a layers file: written beside the weights
    layers_file = out.resolve() / name / megatron_config.HETEROGENEOUS_CONFIG_FILE if desc.is_heterogeneous else None
    args = megatron_config.megatron_lm_args(desc, tp=tp, pp=pp, dtype=dtype, padded_vocab_size=rows,
                                            make_vocab_size_divisible_by=divisible_by,
                                            tokenizer_model=str(final_tokenizer) if final_tokenizer else None,
                                            iteration=ITERATION,
                                            heterogeneous_config_path=str(layers_file) if layers_file else None)
    content = {"singleton_local_shards": False}
    with atomic_directory(out) as tmp:
        iteration_dir = tmp / name
        if is_rank0():
            iteration_dir.mkdir()
        barrier()
        sharded = unwrap(model).sharded_state_dict(metadata=dict(content))
        _repad(sharded, desc.vocab_size, rows)
        te_norm_keys(sharded, desc)  # the layer norms under the Transformer Engine spec's names, as Megatron-LM saves them
        state = {"model": sharded, "args": args, "checkpoint_version": 3.0, "iteration": ITERATION}
        dist_checkpointing.save(state, str(iteration_dir), content_metadata=content)
        if is_rank0():
            run_config = {
                "model": megatron_config.bridge_model_section(desc, tp=tp, pp=pp, dtype=dtype,
                                                              make_vocab_size_divisible_by=divisible_by,
                                                              should_pad_vocab=should_pad),
                "checkpoint": {"ckpt_format": "torch_dist", "save_optim": False, "save_rng": False,
                               "fully_parallel_save": True, "save": str(out.resolve())},
                "tokenizer": {"tokenizer_type": "HuggingFaceTokenizer",
                              "tokenizer_model": str(final_tokenizer) if final_tokenizer else None},
            }
            (iteration_dir / "run_config.yaml").write_text(yaml.safe_dump(run_config, sort_keys=False))
            if layers_file is not None:
                (iteration_dir / layers_file.name).write_text(args.heterogeneous_layers_config_encoded_json)
            train_state = {"step": torch.tensor(ITERATION, dtype=torch.int64),
                           "consumed_train_samples": torch.tensor(0, dtype=torch.int64),
                           "skipped_train_samples": torch.tensor(0, dtype=torch.int64),
                           "consumed_valid_samples": torch.tensor(0, dtype=torch.int64),
                           "floating_point_operations_so_far": torch.tensor(0.0, dtype=torch.float64),
                           "do_train": torch.tensor(False), "do_valid": torch.tensor(False),
                           "do_test": torch.tensor(False)}
            torch.save(train_state, iteration_dir / "train_state.pt")
            shutil.copy2(iteration_dir / "train_state.pt", tmp / "latest_train_state.pt")
            (tmp / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))
            if tokenizer_dir is not None:
                shutil.copytree(tokenizer_dir, iteration_dir / "tokenizer")
    log.info("exported %s as a Megatron-LM / Megatron-Bridge checkpoint to %s (vocabulary padded to %d)",
             desc.summary(), out, rows)
    return out
