"""The one converter between Hugging Face models and this project, for every family.

It reads a family table (``nemo_minitron.families``) in both directions:
- configs: ``description_from_hf_config(config) -> ModelDescription`` and
  ``hf_config_dict(desc) -> dict`` (``config.json``);
- weights: ``hf_to_canonical(desc, name, get)`` builds one canonical megatron-core
  tensor (TP=1 layout, see ``model/params.py``) from the HF tensors it needs, fetched
  lazily with ``get`` so a rank reads only the layers it holds; ``canonical_to_hf``
  yields the HF tensors of one canonical tensor; ``canonical_names`` / ``hf_names`` list
  what a description's model holds on either side.
Pure code: no files, no processes.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Iterator, Mapping

import torch

from nemo_minitron.errors import UsageError, require
from nemo_minitron.families import Family, family, family_of_hf_config, unsupported_keys
from nemo_minitron.families import nemotron_nas
from nemo_minitron.families.spec import DEFAULT_ROPE_THETA, Check, Const, Field
from nemo_minitron.model.description import ModelDescription
from nemo_minitron.model.hybrid import layer_holds

Getter = Callable[[str], torch.Tensor]
_TIED = ("output_layer.weight", "embedding.word_embeddings.weight")


# ---------------------------------------------------------------------- transforms
def pad_vocab(t: torch.Tensor, padded: int) -> torch.Tensor:
    if t.shape[0] == padded:
        return t
    return torch.cat([t, t.new_zeros(padded - t.shape[0], *t.shape[1:])], dim=0)


def interleave_qkv(desc: ModelDescription, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """HF's separate q/k/v (rows: heads x head_dim) -> megatron's per-group [q.., k, v] rows
    (the groups are k's rows / head_dim: a heterogeneous model's layers differ)."""
    d = desc.head_dim
    g = k.shape[0] // d
    rest = q.shape[1:]
    q = q.reshape(g, desc.num_attention_heads // g * d, *rest)
    k = k.reshape(g, d, *rest)
    v = v.reshape(g, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(desc: ModelDescription, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d = desc.head_dim
    g = (qkv.shape[0] // d - desc.num_attention_heads) // 2  # this layer's groups
    hpg = desc.num_attention_heads // g
    rest = qkv.shape[1:]
    grouped = qkv.reshape(g, (hpg + 2) * d, *rest)
    q, k, v = grouped.split([hpg * d, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


# name -> (HF tensors -> canonical tensor, canonical tensor -> HF tensors in the table's order)
TRANSFORMS: dict[str, tuple[Callable[..., torch.Tensor], Callable[..., tuple[torch.Tensor, ...]]]] = {
    "same": (lambda desc, t: t, lambda desc, t: (t,)),
    "vocab": (lambda desc, t: pad_vocab(t, desc.padded_vocab_size), lambda desc, t: (t[:desc.vocab_size],)),
    "qkv": (interleave_qkv, split_qkv),
    "gate_up": (lambda desc, gate, up: torch.cat([gate, up], dim=0), lambda desc, t: tuple(t.chunk(2, dim=0))),
}


# ---------------------------------------------------------------------- weight rules
def _rule(rule) -> tuple[str, tuple[str, ...]]:
    if isinstance(rule, str):
        return "same", (rule,)
    assert rule[0] in TRANSFORMS, rule
    return rule[0], tuple(rule[1:])


@functools.cache
def _compiled(model_type: str) -> list[tuple[re.Pattern, str, tuple[str, ...]]]:
    out = []
    for pattern, rule in family(model_type).weights.items():
        # placeholders ({i}: layer; an MoE table adds {e}: expert) match indices
        regex = re.compile("^" + re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>\\d+)", re.escape(pattern)) + "$")
        out.append((regex, *_rule(rule)))
    return out


def _lookup(desc: ModelDescription, name: str) -> tuple[str, list[str]]:
    """(transform, HF names) for the canonical tensor ``name``."""
    if desc.tie_embeddings and name == _TIED[0]:
        name = _TIED[1]  # the output layer is the embedding
    for regex, transform, hf in _compiled(desc.architecture):
        m = regex.match(name)
        if m:
            return transform, [h.format(**m.groupdict()) for h in hf]
    raise KeyError(f"{name} is not a weight of a {desc.architecture} model")


def hf_to_canonical(desc: ModelDescription, name: str, get: Getter) -> torch.Tensor:
    """The canonical megatron tensor ``name`` built from HF tensors fetched with ``get``."""
    transform, hf = _lookup(desc, name)
    return TRANSFORMS[transform][0](desc, *(get(h) for h in hf))


def canonical_to_hf(desc: ModelDescription, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """HF tensors (vocabulary padding removed) for one canonical megatron tensor."""
    if desc.tie_embeddings and name == _TIED[0]:
        return  # written once, as the embedding
    transform, hf = _lookup(desc, name)
    yield from zip(hf, TRANSFORMS[transform][1](desc, tensor), strict=True)


def canonical_names(desc: ModelDescription) -> list[str]:
    """Every canonical weight of the model (TP=1, all layers and experts): embedding,
    layers, the rest."""
    patterns = list(family(desc.architecture).weights)
    per_layer = [p for p in patterns if "{i}" in p]
    rest = [p for p in patterns if "{i}" not in p and not (desc.tie_embeddings and p == _TIED[0])]
    first = [p for p in rest if p.startswith("embedding.")]
    layers = [name for i in range(desc.num_layers) for p in per_layer if layer_holds(desc, i, p)
              for name in ([p.format(i=i, e=e) for e in range(desc.num_experts)] if "{e}" in p else [p.format(i=i)])]
    return first + layers + [p for p in rest if p not in first]


def hf_names(desc: ModelDescription) -> list[str]:
    """Every HF weight name of the model, in canonical order."""
    out: list[str] = []
    for name in canonical_names(desc):
        out += _lookup(desc, name)[1]
    return out


# ---------------------------------------------------------------------- configs
def _unsupported(fam: Family, key: str, value: Any, feature: str, supported: Any = None) -> UsageError:
    hint = "" if supported is None else f"; supported: {key}={supported!r}"
    return UsageError(f"{fam.model_type} config: {key}={value!r} is not supported ({feature}){hint}")


def _rope_from_hf(config: Mapping[str, Any], fam: Family) -> dict[str, Any]:
    """HF keeps RoPE settings in ``rope_theta``/``rope_scaling``/``partial_rotary_factor``
    (4.x) or ``rope_parameters`` (5.x). A family without RoPE reads none of them."""
    if not fam.rope:
        return {}
    params = dict(config.get("rope_parameters") or {})
    scaling = dict(config.get("rope_scaling") or {})
    theta = float(config.get("rope_theta", params.get("rope_theta", DEFAULT_ROPE_THETA)))
    partial = config.get("partial_rotary_factor", params.get("partial_rotary_factor"))
    merged = {**params, **scaling}
    merged.pop("rope_theta", None)
    merged.pop("partial_rotary_factor", None)
    kind = merged.get("rope_type", merged.get("type", "default"))
    rotary = 1.0 if fam.partial_rotary is None else float(partial if partial is not None else fam.partial_rotary)
    if kind in (None, "default"):
        return {"rope_theta": theta, "rope_scaling": None, "rotary_percent": rotary}
    if kind not in fam.rope_scaling:
        raise _unsupported(fam, "rope_scaling.rope_type", kind, f"supported: {', '.join(fam.rope_scaling)}")
    merged["rope_type"] = kind
    merged.pop("type", None)
    return {"rope_theta": theta, "rope_scaling": merged, "rotary_percent": rotary}


def description_from_hf_config(config: Mapping[str, Any], name: str = "") -> ModelDescription:
    """Read a Hugging Face ``config.json`` (as a dict) into a ModelDescription."""
    fam = family_of_hf_config(config)
    for key, feature in unsupported_keys(fam).items():
        if config.get(key):
            raise _unsupported(fam, key, config[key], feature)
    values: dict[str, Any] = dict(fam.feature_values())
    if fam.moe:
        values["ffn_hidden_size"] = 0  # no dense MLP: every layer's MLP is experts
    for entry in fam.config:
        present = entry.hf in config and config[entry.hf] is not None
        if isinstance(entry, Field) and entry.when is not None and not entry.when(config):
            continue  # the description's default (e.g. no experts in a dense hybrid)
        if isinstance(entry, Field):
            if present:
                value = config[entry.hf]
            elif entry.required:
                raise UsageError(f"{fam.model_type} config: '{entry.hf}' is missing")
            else:
                value = entry.default(config) if callable(entry.default) else entry.default
            values[entry.field] = entry.cast(value) if entry.cast and value is not None else value
        elif isinstance(entry, Const):
            if entry.feature is not None and present and config[entry.hf] != entry.value:
                raise _unsupported(fam, entry.hf, config[entry.hf], entry.feature, entry.value)
        elif isinstance(entry, Check) and present and not entry.ok(config[entry.hf]):
            raise _unsupported(fam, entry.hf, config[entry.hf], entry.feature)
    values.update(_rope_from_hf(config, fam))
    if fam.heterogeneous:
        shapes = nemotron_nas.layer_shapes_from_config(config)
        values.update(layer_shapes=tuple(shapes), num_query_groups=max(g for g, _ in shapes),
                      ffn_hidden_size=max(f for _, f in shapes))
    return ModelDescription(architecture=fam.model_type, name=name or str(config.get("_name_or_path", "")),
                            **values)


def hf_config_dict(desc: ModelDescription, architecture: str | None = None) -> dict[str, Any]:
    """``config.json`` contents (without the dtype) for the description, written as
    ``architecture``'s family (default: its own; a fallback must compute the same function)."""
    fam = family(architecture or desc.architecture)
    mismatched = {k: v for k, v in fam.feature_values().items() if getattr(desc, k) != v}
    require(not mismatched, f"a {desc.architecture} model cannot be written as {fam.model_type} "
                            f"(it needs {', '.join(f'{k}={v!r}' for k, v in mismatched.items())})")
    cfg: dict[str, Any] = {"architectures": [fam.hf_class], "model_type": fam.model_type}
    for entry in fam.config:
        if isinstance(entry, Field) and entry.when is not None and not entry.when(cfg):
            continue
        if isinstance(entry, Field):
            cfg[entry.hf] = getattr(desc, entry.field)
        elif isinstance(entry, Const):
            cfg[entry.hf] = entry.value
    tie = next((e for e in fam.config if isinstance(e, Const) and e.hf == "tie_word_embeddings"), None)
    require(not (desc.tie_embeddings and tie is not None and tie.value is False),
            f"a model with tied embeddings cannot be written as {fam.model_type}: {tie.feature if tie else ''}; "
            "export it with --megatron-out")
    if fam.heterogeneous:
        cfg["block_configs"] = nemotron_nas.block_configs(desc.num_attention_heads, desc.hidden_size,
                                                          desc.all_layer_shapes())
    else:
        require(not desc.is_heterogeneous, f"a model with per-layer shapes cannot be written as {fam.model_type} "
                                           f"(write it as {nemotron_nas.NEMOTRON_NAS.model_type})")
    if not fam.rope:
        return cfg
    cfg["rope_theta"] = desc.rope_theta
    cfg["rope_scaling"] = dict(desc.rope_scaling) if desc.rope_scaling else None
    if fam.partial_rotary is not None:
        cfg["partial_rotary_factor"] = desc.rotary_percent
    else:
        require(desc.rotary_percent == 1.0, f"{fam.model_type} rotates whole heads; this model rotates "
                                            f"{desc.rotary_percent:.0%} of each")
    return cfg
