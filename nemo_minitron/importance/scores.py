"""The importance directory: what the importance stage writes and pruning reads.

    DIR/
      scores.safetensors   one float32 tensor per axis (below)
      summary.json         model fingerprint, settings, token counts, ranked layers
      *.png                plots for people

Tensors (global indices, whatever the parallel layout that computed them):
    heads                   [layers, heads]         head h of group g is index g * heads_per_group + j
    query_groups            [layers, query_groups]  sum of the group's head scores
    ffn                     [layers, ffn]           MLP neurons
    hidden                  [hidden]                embedding channels, summed over every norm
    hidden_per_layer        [layers, hidden]        the per-layer part of ``hidden`` (both norms of the layer)
    final_norm              [hidden]                the final norm's term (in ``hidden`` with channel_norms layers+final)
    layer_block_importance  [layers]                1 - mean cos(layer input, layer output)
    layer_loss_drop         [layers]                LM loss with the layer skipped minus the full loss
Hybrid Mamba-Transformer models (every axis [layers, ...], zeros in the layers of other
kinds: attention heads in ``*`` layers, ``ffn`` in ``-`` layers) add:
    mamba_heads             [layers, mamba heads]     head h of B/C group g is index g * heads_per_group + j
    mamba_head_dim          [layers, mamba head dim]  each channel over all heads of the layer
Mixtures of experts (``ffn`` is then [layers, 0]: no dense MLP) add:
    experts                 [layers, experts]          router probability x norm of the expert's output
    moe_ffn                 [layers, experts, moe_ffn] each expert's neurons
    shared_ffn              [layers, shared_ffn]       the shared expert's neurons (when it has one)
Higher is more important on every axis.
With ``importance --block-variants`` (importance/blocks.py; summary.json's ``block_variants``
lists the options {"query_groups": [...], "ffn": [...]}, the parent's first, 0 = removed):
    block_attention_loss    [layers, attention options]  LM-loss change with that attention variant
    block_attention_kl      [layers, attention options]  KL(parent || variant) per token
    block_ffn_loss          [layers, MLP options]
    block_ffn_kl            [layers, MLP options]
These are costs: lower is better, 0 for the parent's own block.
With ``--second-moments`` as well (and untrained variants), the MLP widths once more with the
kept columns of ``linear_fc2`` refit by least squares, as ``prune --refit`` makes them:
    block_ffn_refit_loss    [layers, MLP options]   (removal: block_ffn_loss's column)
    block_ffn_refit_kl      [layers, MLP options]
With ``--block-distill-steps`` the variants (other than the parent's and removal) were first
trained by blockwise local distillation (importance/local_distill.py) and scored with those
weights: ``block_variants.safetensors`` holds them, ``summary.json``'s ``block_variants.distill``
their settings (steps, lr, samples, batch), each variant's normalised error against the parent
block before and after training, and digests of the parent's layers that prune checks.

summary.json's ``layers`` (depth choices for prune --layer-metric): ``loss_drop``,
``block_importance``, their rankings, ``contiguous_blocks`` {k: best block},
``greedy`` {"order": layers in the order greedy elimination removed them, "loss": the loss
after each removal, "candidates": per step, the loss without each remaining layer (null
for removed ones)} and ``drop_sets`` {k: {metric: {"layers", "loss"}, "best"}}. Keys are
only ever added: a directory written before ``greedy`` existed lacks it (and its
``drop_sets`` lack "greedy"), and prune asks for a new importance run only when the
metric chosen needs it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from nemo_minitron.errors import UsageError, require
from nemo_minitron.model.description import ModelDescription

SCORES_FILE = "scores.safetensors"
#: optional (importance --second-moments): Gram matrices for prune --refit
#:   proj_gram [layers, heads * head_dim, heads * head_dim], fc2_gram [layers, ffn, ffn]
SECOND_MOMENTS_FILE = "second_moments.safetensors"
SUMMARY_FILE = "summary.json"
#: optional (importance --block-distill-steps): the block variants trained by local distillation,
#:   "layers.{i}.{attention|ffn}.{size}.{canonical suffix}" -> float32 tensor in the variant's own
#:   (pruned) layout; summary.json's ``block_variants.distill`` holds their provenance
TRAINED_VARIANTS_FILE = "block_variants.safetensors"
AXES = ("heads", "query_groups", "ffn", "hidden", "hidden_per_layer", "layer_block_importance", "layer_loss_drop")
MOE_AXES = ("experts", "moe_ffn")  # and shared_ffn where the model has a shared expert
HYBRID_AXES = ("mamba_heads", "mamba_head_dim")
BLOCK_AXES = ("block_attention_loss", "block_attention_kl", "block_ffn_loss", "block_ffn_kl")
REFIT_BLOCK_AXES = ("block_ffn_refit_loss", "block_ffn_refit_kl")


@dataclasses.dataclass
class ImportanceScores:
    tensors: dict[str, torch.Tensor]
    summary: dict[str, Any]

    def __getitem__(self, axis: str) -> torch.Tensor:
        return self.tensors[axis]

    @property
    def fingerprint(self) -> dict[str, Any]:
        return self.summary["model"]

    def check_matches(self, desc: ModelDescription, directory: str = "--importance") -> None:
        """Refuse scores computed on a model of another shape."""
        mine, theirs = desc.fingerprint(), self.fingerprint
        diffs = [f"{k} {theirs.get(k)} vs {v}" for k, v in mine.items() if theirs.get(k) != v]
        require(not diffs, f"{directory} scores were computed on another model ({', '.join(diffs)})")

    def save(self, directory: Path) -> None:
        missing = [a for a in AXES if a not in self.tensors]
        assert not missing, f"importance scores miss axes {missing}"
        save_file({k: v.contiguous().float().cpu() for k, v in self.tensors.items()}, str(directory / SCORES_FILE))
        (directory / SUMMARY_FILE).write_text(json.dumps(self.summary, indent=2))

    @staticmethod
    def require_second_moments(directory: str | Path, flag: str = "--refit") -> Path:
        path = Path(directory) / SECOND_MOMENTS_FILE
        require(path.is_file(), f"{flag}: '{directory}' has no {SECOND_MOMENTS_FILE}; rerun importance with "
                                "--second-moments")
        return path

    @staticmethod
    def load_second_moments(directory: str | Path, flag: str = "--refit") -> dict[str, torch.Tensor]:
        return load_file(str(ImportanceScores.require_second_moments(directory, flag)))

    @classmethod
    def load(cls, directory: str | Path, flag: str = "--importance") -> "ImportanceScores":
        directory = Path(directory)
        require(directory.is_dir(), f"{flag} '{directory}' does not exist")
        require((directory / SCORES_FILE).is_file() and (directory / SUMMARY_FILE).is_file(),
                f"{flag} '{directory}' is not an importance directory (needs {SCORES_FILE} and {SUMMARY_FILE}; "
                "create it with: nemo-minitron importance CKPT --data ... --out DIR)")
        try:
            tensors = load_file(str(directory / SCORES_FILE))
            summary = json.loads((directory / SUMMARY_FILE).read_text())
        except Exception as e:  # corrupt file: report it as bad input
            raise UsageError(f"{flag} '{directory}': unreadable scores: {e}") from None
        moe = bool((summary.get("model") or {}).get("num_experts"))
        hybrid = bool((summary.get("model") or {}).get("hybrid_pattern"))
        missing = [a for a in AXES + (MOE_AXES if moe else ()) + (HYBRID_AXES if hybrid else ()) if a not in tensors]
        require(not missing, f"{flag} '{directory}': scores miss axes {', '.join(missing)}")
        return cls(tensors, summary)
