"""Pruning targets: what the smaller model's shape should be, checked against the original.

A target names any subset of the prunable axes; the rest keep their size:
    hidden        embedding channels (the residual stream width)
    ffn           MLP neurons per layer (dense models)
    heads         query heads per layer (the same number kept in every query group)
    query_groups  K/V groups per layer, each with its query heads
    layers        transformer layers
Mixtures of experts:
    experts       routed experts per layer (each with its router row)
    moe_ffn       neurons of each expert (the same number kept in every expert)
    shared_ffn    neurons of the shared expert
    top_k         experts each token is routed to (not a pruning axis: the router's setting,
                  at most the experts kept)
Hybrid Mamba-Transformer models (Nemotron-H; ``heads``, ``query_groups`` and ``ffn`` shape
their attention and MLP layers, the MoE axes their MoE layers, Nemotron 3):
    mamba_heads       Mamba-2 heads per mixer, a multiple of the B/C groups (every group keeps
                      the same number of heads, so the groups and their B and C stay whole)
    mamba_head_dim    channels per Mamba head (one choice shared by all heads)
    mamba_layers, attention_layers, mlp_layers, moe_layers
                      layers of each kind kept (``layers`` is their sum): a depth cut whose
                      parameter count is known before importance picks the layers; with
                      ``layers`` alone, importance picks layers of any kind

ModelOpt's names for the same axes (``mcore_minitron`` in nvidia-modelopt 0.47:
``SUPPORTED_HPARAMS``; Megatron-LM's ``--prune-export-config``) are accepted too:
hidden_size, ffn_hidden_size, num_attention_heads (all heads, as ours), num_query_groups,
num_layers, mamba_num_heads (all heads of a mixer, as ours), mamba_head_dim.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from nemo_minitron.errors import UsageError, require
from nemo_minitron.model.hybrid import kept_pattern, kind_counts, provisional_pattern

if TYPE_CHECKING:  # annotations only: the flag parsers here are read by --help, which stays light
    from nemo_minitron.model.description import ModelDescription

AXES = ("hidden", "ffn", "heads", "query_groups", "layers", "experts", "moe_ffn", "shared_ffn", "top_k",
        "mamba_heads", "mamba_head_dim", "mamba_layers", "attention_layers", "mlp_layers", "moe_layers")
MOE_AXES = ("experts", "moe_ffn", "shared_ffn", "top_k")
#: a hybrid model's layers of each kind, by the target axis that keeps them
LAYER_KIND_AXES = {"mamba_layers": "M", "attention_layers": "*", "mlp_layers": "-", "moe_layers": "E"}
HYBRID_AXES = ("mamba_heads", "mamba_head_dim", *LAYER_KIND_AXES)
MODELOPT_AXES = {"hidden_size": "hidden", "ffn_hidden_size": "ffn", "num_attention_heads": "heads",
                 "num_query_groups": "query_groups", "num_layers": "layers", "mamba_num_heads": "mamba_heads"}
_ALLOWED = ", ".join(AXES) + " (or ModelOpt's " + ", ".join(MODELOPT_AXES) + ")"


def canonical_axis(name: str, flag: str = "--target") -> str:
    """Our axis name for ``name`` (ours or ModelOpt's)."""
    axis = MODELOPT_AXES.get(name, name)
    require(axis in AXES, f"{flag}: unknown axis '{name}' (allowed: {_ALLOWED})")
    return axis


def canonical_target(target: dict, flag: str = "--target") -> dict[str, int]:
    out: dict[str, int] = {}
    for name, value in target.items():
        axis = canonical_axis(str(name), flag)
        require(axis not in out, f"{flag}: axis '{axis}' given twice")
        out[axis] = value
    return out


def parse_drop_layers(items, num_layers: int, flag: str = "--drop-layers") -> list[int]:
    """1-indexed layer numbers (ModelOpt's ``drop_mcore_language_model_layers``, NeMo's
    ``prune.drop_layers``), as a string '17,18' or a list -> sorted 0-indexed layers."""
    parts = [p.strip() for p in items.split(",")] if isinstance(items, str) else list(items)
    try:
        numbers = [int(p) for p in parts if str(p).strip()]
    except (TypeError, ValueError):
        raise UsageError(f"{flag} must be 1-indexed layer numbers such as 17,18,19 (got '{items}')") from None
    require(numbers, f"{flag} names no layers")
    require(len(set(numbers)) == len(numbers), f"{flag} names a layer twice")
    require(all(1 <= n <= num_layers for n in numbers),
            f"{flag} {','.join(map(str, numbers))}: layers are numbered 1..{num_layers} (1-indexed, as ModelOpt "
            f"and NeMo count them; --layer-metric takes 0-indexed ones)")
    require(len(numbers) < num_layers, f"{flag} would drop every layer")
    return sorted(n - 1 for n in numbers)


_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


def parse_target(text: str, flag: str = "--target") -> dict[str, int]:
    """'hidden=480,ffn=1024' -> {'hidden': 480, 'ffn': 1024}."""
    target: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        key = canonical_axis(name, flag)
        require(key not in target, f"{flag}: axis '{key}' given twice")
        try:
            target[key] = int(value)
        except ValueError:
            raise UsageError(f"{flag}: {key} must be a whole number (got '{value}')") from None
    require(target, f"{flag} is empty; give e.g. {flag} hidden=480,ffn=1024")
    return target


def parse_param_count(text: str, flag: str = "--target-params") -> int:
    """'90M', '4.5B', '135000000' -> a parameter count."""
    return _parse_count(text, flag, "K/M/B", "90M or 4.5B")


def parse_flops(text: str, flag: str = "--target-flops") -> int:
    """'1.2G', '350M', '900000000' -> FLOPs (per token)."""
    return _parse_count(text, flag, "K/M/G/T", "350M or 1.2G")


def _parse_count(text: str, flag: str, suffixes: str, example: str) -> int:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMBGT]?)\s*", str(text).upper())
    require(m is not None, f"{flag} must be a number with an optional {suffixes} suffix, e.g. {example} (got '{text}')")
    value = int(round(float(m.group(1)) * _SUFFIX[m.group(2)]))
    require(value > 0, f"{flag} must be positive (got '{text}')")
    return value


_BYTE_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
          "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}


def parse_bytes(text: str, flag: str = "--target-memory") -> int:
    """'1.5GB', '300M', '2GiB', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]I?)?B?\s*", str(text).upper())
    require(m is not None, f"{flag} must be a size in bytes with an optional K/M/G/T (or KiB/MiB/GiB) suffix, e.g. "
                           f"300MB or 1.5GiB (got '{text}')")
    value = int(round(float(m.group(1)) * _BYTE_SUFFIX[m.group(2) or ""]))
    require(value > 0, f"{flag} must be positive (got '{text}')")
    return value


def format_count(n: int) -> str:
    """8030261248 -> '8.03B', 90000000 -> '90M', 10000 -> '10K'."""
    for suffix, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            return f"{n / scale:.4g}{suffix}"
    return str(n)


def apply_target(desc: ModelDescription, target: dict[str, int], *, tp: int = 1, pp: int = 1,
                 flag: str = "--target", kept_layers: list[int] | None = None) -> ModelDescription:
    """The pruned description, or a one-line error naming the axis that cannot be met.
    A hybrid model's depth cut takes its pattern from ``kept_layers`` (original indices)
    when the layers are chosen, else a provisional one (``hybrid.provisional_pattern``)."""
    target = canonical_target(target, flag)
    original = sizes(desc)
    for key in target:
        if desc.is_moe:
            require(key != "ffn" or desc.has_dense_mlp, f"{flag}: ffn: this {desc.architecture} model has no dense "
                                                        "MLP; prune moe_ffn (each expert's neurons), experts or shared_ffn")
            require(key != "shared_ffn" or desc.moe_shared_ffn_hidden_size,
                    f"{flag}: shared_ffn: this {desc.architecture} model has no shared expert")
        else:
            require(key not in MOE_AXES, f"{flag}: {key} applies to mixtures of experts; this {desc.architecture} "
                                         "model has a dense MLP (prune ffn)")
        require(key not in HYBRID_AXES or desc.is_hybrid, f"{flag}: {key} applies to hybrid Mamba-Transformer "
                                                          f"models; this {desc.architecture} model has no Mamba layers")
    for key, value in target.items():
        lowest = 0 if key in LAYER_KIND_AXES else 1  # a hybrid may lose every layer of one kind
        require(value >= lowest, f"{flag}: {key}={value} must be at least {lowest}")
        require(value <= original[key], f"{flag}: {key}={value} is larger than the original model's "
                                        f"{original[key]} (pruning only removes)")
    groups = target.get("query_groups", desc.num_query_groups)
    heads = target.get("heads", groups * desc.heads_per_group)
    require(heads % groups == 0, f"{flag}: heads={heads} is not a multiple of query_groups={groups}")
    require(heads // groups <= desc.heads_per_group,
            f"{flag}: heads={heads} over {groups} query groups needs {heads // groups} heads per group, "
            f"but the original groups hold {desc.heads_per_group}")
    experts = {}
    if desc.is_moe:
        kept = target.get("experts", desc.num_experts)
        top_k = target.get("top_k", desc.moe_top_k)
        require(top_k <= kept, f"{flag}: top_k={top_k} is larger than the {kept} experts kept; lower top_k too "
                               f"(top_k=1..{kept})")
        require(top_k >= 2 or not desc.moe_normalize_top_k,
                f"{flag}: top_k=1: this {desc.architecture} model renormalises its top-k probabilities (a single "
                "expert's weight would always be 1), which megatron-core refuses; keep top_k >= 2")
        experts = dict(num_experts=kept, moe_top_k=top_k,
                       moe_ffn_hidden_size=target.get("moe_ffn", desc.moe_ffn_hidden_size),
                       moe_shared_ffn_hidden_size=target.get("shared_ffn", desc.moe_shared_ffn_hidden_size))
    mixers = _hybrid_changes(desc, target, tp=tp, pp=pp, flag=flag, kept_layers=kept_layers) if desc.is_hybrid else {}
    if desc.is_moe and desc.is_hybrid and "E" not in mixers["hybrid_pattern"]:  # every MoE layer cut: no experts
        experts = dict.fromkeys(("num_experts", "moe_top_k", "moe_ffn_hidden_size", "moe_shared_ffn_hidden_size"), 0)
    new = desc.replace(hidden_size=target.get("hidden", desc.hidden_size),
                       ffn_hidden_size=target.get("ffn", desc.ffn_hidden_size),
                       num_attention_heads=heads, num_query_groups=groups,
                       num_layers=mixers.pop("num_layers", target.get("layers", desc.num_layers)), **experts, **mixers)
    widths = ((("ffn", new.ffn_hidden_size),) if new.has_dense_mlp else ()) + (
        (("moe_ffn", new.moe_ffn_hidden_size), ("shared_ffn", new.moe_shared_ffn_hidden_size)) if new.is_moe else ())
    for key, value in (("query_groups", groups), ("heads", heads), *widths):
        require(value % tp == 0, f"{flag}: {key}={value} is not divisible by --tp {tp}")
    require(new.num_layers >= pp, f"{flag}: layers={new.num_layers} is fewer than the --pp {pp} pipeline stages")
    return new


def _hybrid_changes(desc: ModelDescription, target: dict[str, int], *, tp: int, pp: int, flag: str,
                    kept_layers: list[int] | None) -> dict:
    """A hybrid model's mixer shape and layer pattern under ``target`` (checked)."""
    G = desc.mamba_num_groups
    mamba_heads = target.get("mamba_heads", desc.mamba_num_heads)
    require(mamba_heads % G == 0,
            f"{flag}: mamba_heads={mamba_heads} splits a Mamba head group: each of the {G} groups (whose heads share "
            f"B and C) keeps the same number of heads; allowed: "
            + ", ".join(str(G * k) for k in range(1, desc.mamba_num_heads // G + 1)))
    # megatron-core gives each TP rank mamba_heads / tp heads in groups / tp whole groups
    require(mamba_heads % tp == 0, f"{flag}: mamba_heads={mamba_heads} is not divisible by --tp {tp}")
    counts = kind_counts(desc.hybrid_pattern)
    kinds = {symbol: target.get(axis, counts[symbol]) for axis, symbol in LAYER_KIND_AXES.items()}
    by_kind = any(axis in target for axis in LAYER_KIND_AXES)
    layers = sum(kinds.values()) if by_kind else target.get("layers", desc.num_layers)
    require(target.get("layers", layers) == layers,
            f"{flag}: layers={target.get('layers')} disagrees with the sum of the layers of each kind "
            f"(mamba_layers, attention_layers, mlp_layers, moe_layers) = {layers}")
    require(layers % pp == 0, f"{flag}: layers={layers} does not split evenly over --pp {pp} pipeline stages "
                              "(megatron-core's MambaStack puts the same number of layers on every stage)")
    if kept_layers is not None:
        pattern = kept_pattern(desc.hybrid_pattern, kept_layers)
        assert len(pattern) == layers and (not by_kind or kind_counts(pattern) == kinds), (pattern, target)
    elif by_kind:
        pattern = provisional_pattern(desc.hybrid_pattern, kinds)
    else:
        pattern = desc.hybrid_pattern[:layers]  # provisional: importance chooses the layers
    return dict(num_layers=layers, hybrid_pattern=pattern, mamba_num_heads=mamba_heads,
                mamba_head_dim=target.get("mamba_head_dim", desc.mamba_head_dim))


def sizes(desc: ModelDescription) -> dict[str, int]:
    """The size of every axis a target may name (a dense model's MoE axes are 0, as are the
    Mamba axes and layer kinds of a model that is not hybrid)."""
    kinds = kind_counts(desc.hybrid_pattern)
    return {"hidden": desc.hidden_size, "ffn": desc.ffn_hidden_size, "heads": desc.num_attention_heads,
            "query_groups": desc.num_query_groups, "layers": desc.num_layers, "experts": desc.num_experts,
            "moe_ffn": desc.moe_ffn_hidden_size, "shared_ffn": desc.moe_shared_ffn_hidden_size,
            "top_k": desc.moe_top_k, "mamba_heads": desc.mamba_num_heads, "mamba_head_dim": desc.mamba_head_dim,
            **{axis: kinds[symbol] for axis, symbol in LAYER_KIND_AXES.items()}}


def describe_change(old: ModelDescription, new: ModelDescription) -> str:
    parts = []
    before, after = sizes(old), sizes(new)
    for axis in AXES:
        a, b = before[axis], after[axis]
        if a != b and a:
            parts.append(f"{axis} {a}->{b} (-{1 - b / a:.0%})")
    return ", ".join(parts) or "no change"
