"""The model families this project converts, builds, prunes and exports, as data.

Each family is one table (``spec.Family``); ``checkpoint/hf_format.py`` is the one
converter that reads every table in both directions.
"""

from __future__ import annotations

from typing import Any, Mapping

from nemo_minitron.errors import UsageError
from nemo_minitron.families.llama import LLAMA, MISTRAL
from nemo_minitron.families.moe import MIXTRAL, QWEN2_MOE, QWEN3_MOE
from nemo_minitron.families.nemotron import NEMOTRON
from nemo_minitron.families.nemotron_h import NEMOTRON_H
from nemo_minitron.families.nemotron_nas import NEMOTRON_NAS
from nemo_minitron.families.qwen import QWEN2, QWEN3
from nemo_minitron.families.spec import DEFAULT_FEATURES, Family, Field

FAMILIES: dict[str, Family] = {f.model_type: f for f in (LLAMA, MISTRAL, QWEN2, QWEN3, NEMOTRON, MIXTRAL, QWEN3_MOE,
                                                         QWEN2_MOE, NEMOTRON_H, NEMOTRON_NAS)}

#: HF config keys of features a family may lack (checked unless the family's table reads
#: the key), so that the error names the feature, not only the architecture.
UNSUPPORTED_KEYS: Mapping[str, str] = {
    "num_local_experts": "mixture of experts",
    "num_experts": "mixture of experts",
    "n_routed_experts": "mixture of experts (DeepSeek-style)",
    "n_shared_experts": "shared experts (DeepSeek-style)",
    "kv_lora_rank": "multi-head latent attention (MLA)",
    "q_lora_rank": "multi-head latent attention (MLA)",
    "attn_logit_softcapping": "attention logit soft-capping",
    "final_logit_softcapping": "final logit soft-capping",
}


def unsupported_keys(fam: Family) -> dict[str, str]:
    """UNSUPPORTED_KEYS less those the family's own table reads (Mixtral's num_local_experts)
    or ignores (Nemotron-H's MoE sizes)."""
    read = {entry.hf for entry in fam.config if isinstance(entry, Field)} | set(fam.ignored_keys)
    return {k: v for k, v in UNSUPPORTED_KEYS.items() if k not in read and not (fam.moe and k == "num_local_experts")}


def family(architecture: str) -> Family:
    """The family table of a ModelDescription's ``architecture`` (its HF model_type)."""
    if architecture not in FAMILIES:
        raise UsageError(f"unsupported architecture '{architecture}' (supported: {', '.join(FAMILIES)})")
    return FAMILIES[architecture]


def family_of_hf_config(config: Mapping[str, Any]) -> Family:
    """The family of an HF config (by ``model_type``, else by ``architectures``), or a
    one-line error naming the architecture and, where it has one, the unsupported feature."""
    model_type = config.get("model_type")
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    by_class = {f.hf_class: f for f in FAMILIES.values()}
    for cls in config.get("architectures") or []:
        if cls in by_class:
            return by_class[cls]
    used = [f"{key} ({what})" for key, what in UNSUPPORTED_KEYS.items() if config.get(key)]
    raise UsageError(f"unsupported architecture '{model_type or config.get('architectures')}' "
                     f"(supported: {', '.join(FAMILIES)})" + (f"; it uses {used[0]}" if used else ""))


def family_with(features: Mapping[str, Any]) -> Family:
    """The first family whose table fixes exactly these features (any not given take the
    defaults), for sources that state features rather than a family, such as Megatron-LM
    arguments: RMSNorm + SwiGLU is Llama, + QKV bias Qwen2, + QK-norm Qwen3, LayerNorm
    (zero-centred) + squared ReLU Nemotron; with ``moe=True`` (experts) Mixtral, Qwen3-MoE
    (QK-norm) and Qwen2-MoE (QKV bias and a gated shared expert); with ``hybrid=True`` (a
    Mamba layer pattern) Nemotron-H."""
    features = dict(features)
    moe = bool(features.pop("moe", False))
    hybrid = bool(features.pop("hybrid", False))
    wanted = {**DEFAULT_FEATURES, **features}
    unknown = sorted(set(wanted) - set(DEFAULT_FEATURES))
    if unknown:
        raise UsageError(f"unknown model features: {', '.join(unknown)} (known: moe, hybrid, {', '.join(DEFAULT_FEATURES)})")
    for fam in FAMILIES.values():
        if fam.feature_values() == wanted and fam.moe == moe and fam.hybrid == hybrid and not fam.heterogeneous:
            return fam
    described = ", ".join(f"{k}={v!r}" for k, v in {**wanted, **({"moe": True} if moe else {})}.items())
    raise UsageError(f"no supported model family has {described} (supported: {', '.join(FAMILIES)})")


__all__ = ["DEFAULT_FEATURES", "FAMILIES", "UNSUPPORTED_KEYS", "Family", "family", "family_of_hf_config", "family_with",
           "unsupported_keys"]
