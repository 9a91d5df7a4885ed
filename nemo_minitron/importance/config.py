"""Importance settings: one dataclass, the source of the ``importance`` flags, the
``compute_importance`` keywords and the recipes' ``rounds.N.importance`` keys."""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

from nemo_minitron.config import DEFAULT_SEQ_LEN, option
from nemo_minitron.errors import UsageError, require

Aggregation = Literal["mean", "l2", "var"]


def int_list(text: str) -> list[int]:
    try:
        return [int(k) for k in str(text).split(",") if k.strip()]
    except ValueError:
        raise UsageError(f"expected comma-separated whole numbers (got '{text}')") from None


#: --second-moments auto collects the Gram matrices when they take at most this on a rank (float64)
SECOND_MOMENTS_AUTO_BYTES = 4 << 30


def second_moments_bytes(desc, pp: int = 1) -> int:
    """Bytes of the float64 Gram matrices a rank of pipeline stage size ``layers / pp`` collects
    (every TP rank holds its stage's whole matrices: they couple units of different ranks)."""
    per_layer = desc.ffn_hidden_size ** 2 + (desc.num_attention_heads * desc.head_dim) ** 2
    return 8 * per_layer * -(-desc.num_layers // pp)


@dataclasses.dataclass
class ImportanceConfig:
    samples: int = option(1024, "calibration samples (the paper's 1024)", ge=1)
    seq_len: int = option(DEFAULT_SEQ_LEN, "tokens per calibration sample", ge=1)
    micro_batch: int = option(1, "samples per forward pass", ge=1, resume_safe=True)
    batch_agg: Aggregation = option("l2", "aggregation over samples")
    seq_agg: Aggregation = option("mean", "aggregation over the sequence")
    neuron_activation: Literal["post", "pre"] = option(
        "post", "MLP neuron activation scored: post (input of the second MLP linear) or pre (the paper's "
                "X.W1 gate pre-activation)")
    head_score: Literal["token", "channel"] = option(
        "channel", "attention heads: channel (each channel aggregated, then the L2 norm over the head's channels, "
                   "ModelOpt's order) or token (each token's head norm, then aggregated, as the paper writes it); "
                   "chosen by benchmarks/pruning_quality.py")
    mamba_activation: Literal["output", "x"] = option(
        "output", "hybrid models' Mamba heads and head channels: output (the mixer's gated-norm output per head, "
                  "the input of its out_proj, scored as attention heads) or x (in_proj's x section before the conv "
                  "and the scan, ModelOpt's and the Minitron-SSM paper's)")
    channel_norms: Literal["layers", "layers+final"] = option(
        "layers", "norm outputs summed into embedding-channel scores: layers (every layer's two norms) or "
                  "layers+final (also the final norm); chosen by benchmarks/pruning_quality.py")
    second_moments: Optional[bool] = option(
        None, "also store the Gram matrices of each layer's output-projection and second-MLP-linear inputs, for "
              "prune's refit (float64 while collected, 8 * (ffn^2 + (heads * head_dim)^2) bytes per layer on each "
              "rank; stored float32); with --block-variants, each MLP width is also scored refit, for prune "
              "--per-layer's choice. auto: on for a dense model whose matrices take at most 4 GiB on a rank",
        default_text="auto")
    layer_samples: Optional[int] = option(
        64, "calibration samples used for the loss-drop layer scores (one pass per layer over them; capped "
            "at --samples; 0 or none: all)", ge=0, parse=lambda s: None if s.lower() in ("none", "all") else int(s),
        metavar="N")
    drop_blocks: list[int] = option([], "layer counts k to prepare depth pruning for: the best contiguous k-layer "
                                        "block to drop, and the layer sets prune --layer-metric compares, e.g. 4,8",
                                    parse=int_list, metavar="K,...")
    greedy_layers: bool = option(
        True, "also remove layers one at a time by LM loss, each step the one whose removal costs least with the "
              "earlier ones gone, down to the largest --drop-blocks size (prune --layer-metric greedy); costs "
              "sum over steps of the layers left in passes over the --layer-samples")

    block_variants: bool = option(
        False, "also score per-layer block variants for prune --per-layer (Puzzle-style): for every layer, the loss "
               "change and KL from the parent when its attention has fewer K/V groups or is removed, or its MLP is "
               "narrower or removed (about half a forward pass per variant, layer and --block-samples sample; "
               "--tp 1 --pp 1)")
    ffn_variants: int = option(5, "MLP widths scored per layer with --block-variants, evenly spaced below the "
                                  "parent's (plus removal)", ge=1)
    ffn_multiple: int = option(256, "the MLP widths of --block-variants are multiples of this (the Llama-Nemotron "
                                    "export rounds ffn_mult to 256)", ge=1)
    block_samples: int = option(8, "calibration samples the --block-variants scores use (capped at --samples)", ge=1)
    block_distill_steps: int = option(
        0, "blockwise local distillation before the --block-variants scores: train each variant's attention or MLP "
           "this many AdamW steps to reproduce the parent block's output (normalised MSE, float32); prune "
           "--per-layer then uses the trained weights (0: score the variants as initialised from the parent)", ge=0)
    block_distill_lr: float = option(1e-4, "learning rate of --block-distill-steps (AdamW, constant, no weight "
                                           "decay)", gt=0)
    block_distill_samples: int = option(
        16, "calibration samples --block-distill-steps trains on: the ones after the --block-samples the scores use "
            "(--samples must hold both)", ge=1)
    block_distill_batch: int = option(1, "samples per --block-distill-steps step (steps cycle over the "
                                         "--block-distill-samples)", ge=1)

    def check(self, names) -> None:
        for k in self.drop_blocks:
            require(isinstance(k, int) and k >= 1, f"{names('drop_blocks')}: block sizes must be >= 1 (got {k})")
        if self.block_distill_steps:
            require(self.block_variants, f"{names('block_distill_steps')} trains the block variants of "
                                         f"{names('block_variants')}; give both")
            scored = min(self.block_samples, self.samples)
            require(self.samples >= scored + self.block_distill_samples,
                    f"{names('block_distill_samples')} {self.block_distill_samples} needs {names('samples')} >= "
                    f"{scored + self.block_distill_samples} (the first {scored}, {names('block_samples')}, score the "
                    f"variants; local distillation trains on the next ones); got {names('samples')} {self.samples}")
            require(self.block_distill_batch <= self.block_distill_samples,
                    f"{names('block_distill_batch')} {self.block_distill_batch} exceeds "
                    f"{names('block_distill_samples')} {self.block_distill_samples}")

    def block_distill_range(self) -> tuple[int, int]:
        """The calibration samples local distillation trains on: [start, stop)."""
        start = min(self.block_samples, self.samples)
        return start, start + self.block_distill_samples

    def layer_passes(self, num_layers: int) -> int:
        """Forward passes over the layer samples: one per layer, one per contiguous block of
        every size, the greedy elimination's steps."""
        passes = num_layers + sum(num_layers - k + 1 for k in self.drop_blocks)
        if self.greedy_layers and self.drop_blocks:
            passes += sum(num_layers - i for i in range(max(self.drop_blocks)))
        return passes + 4 * len(self.drop_blocks)  # the sets compared by drop_set_losses

    def layer_sample_count(self) -> int:
        """How many calibration samples score layers by loss drop."""
        if not self.layer_samples:
            return self.samples
        return min(self.layer_samples, self.samples)
