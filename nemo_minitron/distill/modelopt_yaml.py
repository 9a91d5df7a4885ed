"""ModelOpt's distillation YAML (as NeMo 2, Megatron-LM and Megatron-Bridge pass it) ->
the project's distillation settings, with the same meaning.

Names and meanings verified against nvidia-modelopt 0.47,
``modelopt/torch/distill/plugins/megatron.py``:

``logit_layers: [output_layer, output_layer]``
    the logit loss ``LogitsKLLoss``: KL(teacher || student) of softmax(logits / T) per
    token. The only pair of logit layers a GPT has; anything else is refused.
``logit_kl_temperature: T``  ->  ``kd_temperature``
    ModelOpt does not multiply the KL by T^2, the project does (gradients keep their size
    whatever T); at T = 1, and whenever ``skip_lm_loss`` is false (the KD term is rescaled
    anyway), the two are identical.
``skip_lm_loss: true`` (ModelOpt's default)  ->  KD only (``kd_weight`` 1, ``ce_weight`` 0)
``skip_lm_loss: false``, ``kd_loss_scale: s``  ->  CE + s x KD rescaled to the CE's magnitude
    in every micro-batch (ModelOpt's ``LogitsAndIntermediatesLossBalancer``); the project's
    ``LogitLossConfig(balance=True)``. ``kd_loss_scale`` is unused when ``skip_lm_loss`` is true.
``intermediate_layer_pairs: [[student_module, teacher_module(, cosine|mse)], ...]``
    losses between module outputs, the student's projected to the teacher's width, their
    mean weighted to the logit loss's magnitude (``kd_pair_weight auto``, as ModelOpt's
    balancer does; the project's weights come from the previous step's losses, ModelOpt's
    from the current micro-batch's). Modules: ``decoder.layers.N`` (layer N's output,
    0-indexed), ``embedding`` or ``embedding.word_embeddings`` (the embedding output),
    ``decoder.final_layernorm``. Differences, by design: ModelOpt shares one projection
    (with a bias) among all pairs, the project gives each pair its own; its ``mse``
    compares the two states each divided by its RMS.
``logit_kl_topk``
    refused: ModelOpt renormalises both distributions over the teacher's top k, the
    project's ``--kd-top-k`` only the teacher's, so the meaning would change.

The YAML may hold these keys at the top, under ``kd_config:``, or under ``model: kd_config:``
(a Megatron-Bridge override file).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml

from nemo_minitron.distill.config import EMBEDDING, FINAL_NORM
from nemo_minitron.errors import UsageError, require

KEYS = ("intermediate_layer_pairs", "logit_layers", "skip_lm_loss", "kd_loss_scale", "logit_kl_temperature",
        "logit_kl_topk")
_MODULES = {"embedding": EMBEDDING, "embedding.word_embeddings": EMBEDDING, "decoder.final_layernorm": FINAL_NORM}
_LAYER = re.compile(r"^decoder\.layers\.(\d+)$")


@dataclasses.dataclass(frozen=True)
class KDSettings:
    """The distill() keyword arguments a ModelOpt YAML sets."""

    kd_temperature: float = 1.0
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    kd_balance: bool = False
    kd_pairs: tuple[str, ...] = ()
    kd_pair_loss: str = "cosine"
    kd_pair_weight: str = "auto"

    def as_kwargs(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["kd_pairs"] = list(self.kd_pairs)
        return out


def _point(name: Any, flag: str) -> str:
    name = str(name)
    if name in _MODULES:
        return _MODULES[name]
    m = _LAYER.match(name)
    require(m is not None, f"{flag}: module '{name}' is not supported; use decoder.layers.N (0-indexed), embedding "
                           "or decoder.final_layernorm")
    return m.group(1)


def read_kd_yaml(path: str | Path, flag: str = "--config") -> KDSettings:
    """Parse and validate a ModelOpt distillation YAML (one-line errors naming the key)."""
    path = Path(path)
    require(path.is_file(), f"{flag} '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UsageError(f"{flag} '{path}': {str(e).splitlines()[0]}") from None
    if isinstance(data, dict) and isinstance(data.get("model"), dict) and "kd_config" in data["model"]:
        data = data["model"]["kd_config"]
    elif isinstance(data, dict) and "kd_config" in data:
        data = data["kd_config"]
    require(isinstance(data, dict), f"{flag} '{path}' is not a mapping of distillation settings")
    unknown = sorted(set(data) - set(KEYS))
    require(not unknown, f"{flag}: unknown key '{unknown[0] if unknown else ''}' (ModelOpt 0.47's keys: "
                         f"{', '.join(KEYS)})")
    require(data.get("logit_kl_topk") is None, f"{flag}: logit_kl_topk is not supported (ModelOpt renormalises the "
                                               "student over the teacher's top k too; --kd-top-k does not)")
    logit_layers = list(data.get("logit_layers") or ["output_layer", "output_layer"])
    require(logit_layers == ["output_layer", "output_layer"],
            f"{flag}: logit_layers {logit_layers}: only [output_layer, output_layer] is supported")
    try:
        temperature = float(data.get("logit_kl_temperature", 1.0))
        scale = float(data.get("kd_loss_scale", 1.0))
    except (TypeError, ValueError):
        raise UsageError(f"{flag}: logit_kl_temperature and kd_loss_scale must be numbers") from None
    require(temperature > 0, f"{flag}: logit_kl_temperature must be > 0 (got {temperature})")
    require(scale > 0, f"{flag}: kd_loss_scale must be > 0 (got {scale})")
    skip_lm = data.get("skip_lm_loss", True)
    require(isinstance(skip_lm, bool), f"{flag}: skip_lm_loss must be true or false (got {skip_lm!r})")

    pairs, kinds = [], set()
    for entry in data.get("intermediate_layer_pairs") or []:
        require(isinstance(entry, (list, tuple)) and len(entry) in (2, 3),
                f"{flag}: intermediate_layer_pairs entry {entry!r} is not [student, teacher] or "
                "[student, teacher, cosine|mse]")
        kind = str(entry[2]) if len(entry) == 3 else "cosine"  # ModelOpt's default
        require(kind in ("cosine", "mse"), f"{flag}: intermediate loss '{kind}' (allowed: cosine, mse)")
        kinds.add(kind)
        pairs.append(f"{_point(entry[0], flag + ' intermediate_layer_pairs')}:"
                     f"{_point(entry[1], flag + ' intermediate_layer_pairs')}")
    require(len(kinds) <= 1, f"{flag}: intermediate_layer_pairs mix cosine and mse; nemo-minitron uses one "
                             "loss for all pairs")
    if skip_lm:
        return KDSettings(kd_temperature=temperature, kd_weight=1.0, ce_weight=0.0, kd_pairs=tuple(pairs),
                          kd_pair_loss=kinds.pop() if kinds else "cosine")
    return KDSettings(kd_temperature=temperature, kd_weight=scale, ce_weight=1.0, kd_balance=True,
                      kd_pairs=tuple(pairs), kd_pair_loss=kinds.pop() if kinds else "cosine")
