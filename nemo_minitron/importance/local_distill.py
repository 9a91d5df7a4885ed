"""Blockwise local distillation of the per-layer block variants (Puzzle's BLD, arXiv
2411.19146): before they are scored, each variant of a layer's attention or MLP
(prune/variants.py), initialised from the parent by the importance ranking, is trained for
a few steps to reproduce the parent block's output on calibration activations.

What is trained: the variant's linear weights (and biases) in its own resized layout, the
one ``prune --per-layer`` writes (``transforms.per_layer_tensor``), as float32 tensors with
AdamW, without weight decay (a few steps from the parent's weights: decay would pull them
towards 0, not towards the parent). The block's norm stays the parent's: before a bias-free
linear its gain only rescales the linear's input columns, which training reaches anyway.
Removed blocks (nothing to train) and the parent's own block are left as they are.

Data: the block's input (the attention's or the MLP's, after its norm) and the parent
block's output, recorded once per layer on ``samples`` calibration samples that the scores
do not use. Layer i's pass starts from layer i-1's recorded output (earlier layers do no
work) and stops after layer i, so recording every layer costs one forward pass in all.

Forward: the parent's own megatron-core module with the variant's weights expanded into the
parent's shape (``VariantLayout.expand``): a narrower MLP's dropped neurons get zero rows
and columns; a merged K/V group's K and V are repeated for each parent group of its run,
its query heads and their output-projection columns put back in the parent's order. The
parent's attention then computes exactly the resized one (each query head attends to its
run's K/V), so no resized module is built, any layer spec works, and the scores run the
trained variant the same way. Gradients flow through the expansion (a merged K/V row gets
the sum over its run).

Loss: normalised MSE, sum ||y_variant - y_parent||^2 / sum ||y_parent||^2 over a step's
tokens. Adam's steps do not depend on the loss's scale, so it trains as plain MSE would;
normalising makes the recorded errors (before and after training, on all the training
samples) comparable across layers, whose output norms grow with depth.

Precision: the variant's weights, AdamW's state and the loss are float32; the block's
forward runs in the model's dtype (the weights cast for it), as megatron's mixed precision.

Data parallel: layer i is recorded and trained on data-parallel rank i mod DP (with every
training sample), then broadcast from there, so the weights are the same at any DP size.

The trained tensors go to the importance directory (``scores.TRAINED_VARIANTS_FILE``) with
their provenance and a digest of each parent layer's weights in ``summary.json``
(``block_variants.distill``); prune checks the digests before it uses them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from safetensors import safe_open
from safetensors.torch import save_file

from nemo_minitron.errors import require
from nemo_minitron.importance.layers import starting_at
from nemo_minitron.importance.scores import TRAINED_VARIANTS_FILE
from nemo_minitron.model.description import ModelDescription
from nemo_minitron.model.forward import position_ids, split_microbatches
from nemo_minitron.model.params import layer_of, named_weights, unwrap
from nemo_minitron.prune.transforms import merged_proj_columns, per_layer_tensor
from nemo_minitron.prune.variants import BlockVariants, kept_neurons, merged_groups
from nemo_minitron.runtime.distributed import layout

#: the tensors a variant trains, by block (canonical suffixes after ``decoder.layers.{i}.``)
BLOCK_TENSORS = {"attention": ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias",
                               "self_attention.linear_proj.weight", "self_attention.linear_proj.bias"),
                 "ffn": ("mlp.linear_fc1.weight", "mlp.linear_fc1.bias", "mlp.linear_fc2.weight",
                         "mlp.linear_fc2.bias")}
_MODULE = {"attention": "self_attention", "ffn": "mlp"}


def trained_options(variants: BlockVariants) -> dict[str, list[int]]:
    """The sizes that are trained: every option but the parent's (first) and removal (0)."""
    return {"attention": [g for g in variants.query_groups[1:] if g], "ffn": [f for f in variants.ffn[1:] if f]}


def tensor_key(layer: int, kind: str, size: int, suffix: str) -> str:
    return f"layers.{layer}.{kind}.{size}.{suffix}"


# ---------------------------------------------------------------------- the variant's layout
@dataclasses.dataclass(frozen=True)
class VariantLayout:
    """How one variant's tensors sit in the parent's: ``init`` cuts the parent's tensors as
    prune does, ``expand`` puts a variant's tensors back into the parent's shape."""

    desc: ModelDescription
    kind: str
    neurons: torch.Tensor | None = None       # an MLP's kept neurons, ascending
    runs: list[list[int]] | None = None       # an attention's merged groups

    @classmethod
    def of(cls, desc: ModelDescription, kind: str, size: int, ffn_scores: torch.Tensor,
           group_scores: torch.Tensor) -> "VariantLayout":
        if kind == "ffn":
            return cls(desc, kind, neurons=kept_neurons(ffn_scores, size))
        return cls(desc, kind, runs=merged_groups(group_scores, size))

    def init(self, parent: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The variant's tensors from the parent layer's (suffix -> canonical tensor)."""
        return {suffix: per_layer_tensor(suffix, t, self.desc, self.neurons, self.runs) for suffix, t in parent.items()}

    def expand(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Parent-shaped tensors whose parent block computes what the variant computes
        (differentiable: an index of the variant's rows and columns, zeros for dropped neurons)."""
        out = {}
        for suffix, t in tensors.items():
            if suffix == "mlp.linear_fc1.weight":
                out[suffix] = torch.cat([t, t.new_zeros(1, t.shape[1])])[self._fc1_rows()]
            elif suffix == "mlp.linear_fc2.weight":
                out[suffix] = torch.cat([t, t.new_zeros(t.shape[0], 1)], dim=1)[:, self._neuron_positions()]
            elif suffix in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
                out[suffix] = t[self._qkv_rows()]
            elif suffix == "self_attention.linear_proj.weight":
                out[suffix] = t[:, self._proj_columns()]
            else:  # over hidden only (an output bias): the same in both shapes
                out[suffix] = t
        return out

    def _neuron_positions(self) -> torch.Tensor:
        """Each parent neuron's row in the variant, or the width (a zero row) when dropped."""
        width = len(self.neurons)
        position = torch.full((self.desc.ffn_hidden_size,), width, dtype=torch.long)
        position[self.neurons] = torch.arange(width)
        return position

    def _fc1_rows(self) -> torch.Tensor:
        position, width = self._neuron_positions(), len(self.neurons)
        if not self.desc.gated:
            return position
        dropped = position == width
        zero = torch.full_like(position, 2 * width)  # [gate; up]: the zero row follows both halves
        return torch.cat([torch.where(dropped, zero, position), torch.where(dropped, zero, position + width)])

    def _qkv_rows(self) -> torch.Tensor:
        """Each parent qkv row's row in the variant (``transforms.merged_qkv``'s layout:
        per new group, the query heads of its run's groups in order, then k and v)."""
        d, hpg, G = self.desc.head_dim, self.desc.heads_per_group, self.desc.num_query_groups
        size = G // len(self.runs)
        rows = torch.empty(G, hpg + 2, d, dtype=torch.long)
        dims = torch.arange(d)
        for k, run in enumerate(self.runs):
            base = k * (size * hpg + 2) * d
            for p, g in enumerate(run):
                rows[g, :hpg] = base + (p * hpg + torch.arange(hpg))[:, None] * d + dims
                rows[g, hpg] = base + size * hpg * d + dims
                rows[g, hpg + 1] = base + (size * hpg + 1) * d + dims
        return rows.flatten()

    def _proj_columns(self) -> torch.Tensor:
        """Each parent projection column's column in the variant (the inverse of
        ``transforms.merged_proj_columns``, a permutation)."""
        columns = merged_proj_columns(self.desc, self.runs)
        inverse = torch.empty_like(columns)
        inverse[columns] = torch.arange(len(columns))
        return inverse


def block_parameters(layer_module, kind: str) -> dict[str, torch.nn.Parameter]:
    """The parameters a variant of ``kind`` trains (suffix -> the layer's parameter)."""
    held = dict(layer_module.named_parameters())
    return {suffix: held[suffix] for suffix in BLOCK_TENSORS[kind] if suffix in held}


@contextlib.contextmanager
def trained_variant(layer_module, kind: str, expanded: dict[str, torch.Tensor]) -> Iterator[None]:
    """Within the block, ``layer_module``'s attention or MLP holds a trained variant's
    expanded tensors (``VariantLayout.expand``); its own weights are restored after."""
    params = block_parameters(layer_module, kind)
    saved = {suffix: p.detach().clone() for suffix, p in params.items()}
    try:
        with torch.no_grad():
            for suffix, p in params.items():
                p.copy_(expanded[suffix])
        yield
    finally:
        with torch.no_grad():
            for suffix, p in params.items():
                p.copy_(saved[suffix])


# ---------------------------------------------------------------------- recording
class _Stop(Exception):
    """Ends a forward pass once the layer of interest has run."""


@dataclasses.dataclass
class _Call:
    args: tuple
    kwargs: dict
    target: torch.Tensor | None = None


def _output(result) -> torch.Tensor:
    """A megatron block's (output, bias) as one tensor."""
    out, bias = result if isinstance(result, tuple) else (result, None)
    return out if bias is None else out + bias


def _record_layer(model, layer: int, batches: list[dict], inputs: list | None,
                  keep: bool) -> tuple[dict[str, list[_Call]], list[torch.Tensor]]:
    """One pass of ``layer`` over the micro-batches (from ``inputs``, its recorded input per
    micro-batch; None for layer 0): the block calls (``keep``) and the layer's outputs."""
    module = unwrap(model).decoder.layers[layer]
    calls: dict[str, list[_Call]] = {"attention": [], "ffn": []}
    outputs: list[torch.Tensor] = []
    handles = []

    def record(kind):
        def before(mod, args, kwargs):
            calls[kind].append(_Call(tuple(a.detach().clone() if torch.is_tensor(a) else a for a in args), dict(kwargs)))

        def after(mod, args, kwargs, result):  # a copy: without grad, megatron adds the residual in place
            calls[kind][-1].target = _output(result).detach().clone()
        return before, after

    if keep:
        for kind in ("attention", "ffn"):
            before, after = record(kind)
            block = getattr(module, _MODULE[kind])
            handles += [block.register_forward_pre_hook(before, with_kwargs=True),
                        block.register_forward_hook(after, with_kwargs=True)]

    def stop(mod, args, result):
        outputs.append((result[0] if isinstance(result, tuple) else result).detach())
        raise _Stop
    handles.append(module.register_forward_hook(stop))
    device = layout().device
    try:
        for b, batch in enumerate(batches):
            tokens = batch["tokens"].to(device)
            with starting_at(model, layer, inputs[b] if inputs else None), contextlib.suppress(_Stop):
                model(tokens, position_ids(tokens), None)
    finally:
        for h in handles:
            h.remove()
    return calls, outputs


# ---------------------------------------------------------------------- training
def _nmse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    target = target.float()
    return (out.float() - target).square().sum() / target.square().sum().clamp(min=1e-30)


def _run(block, layout_: VariantLayout, tensors: dict[str, torch.Tensor], call: _Call, dtype) -> torch.Tensor:
    prefix = _MODULE[layout_.kind] + "."
    expanded = {suffix[len(prefix):]: t.to(dtype) for suffix, t in layout_.expand(tensors).items()}
    return _output(torch.func.functional_call(block, expanded, call.args, call.kwargs))


def _error(block, layout_, tensors, calls, dtype) -> float:
    """Normalised MSE over all recorded calls (sums over every token)."""
    num = den = 0.0
    with torch.no_grad():
        for call in calls:
            out = _run(block, layout_, tensors, call, dtype).float()
            num += (out - call.target.float()).square().sum().item()
            den += call.target.float().square().sum().item()
    return num / max(den, 1e-30)


@contextlib.contextmanager
def _frozen(module) -> Iterator[None]:
    """The module's own parameters need no gradients while variants train through it."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def train_variant(block, layout_: VariantLayout, init: dict[str, torch.Tensor], calls: list[_Call], steps: int,
                  lr: float) -> tuple[dict[str, torch.Tensor], float, float]:
    """The variant's tensors after ``steps`` AdamW steps (step s on call s mod len(calls)),
    and its normalised error on all the calls before and after."""
    dtype = next(iter(init.values())).dtype
    params = {suffix: t.detach().float().clone().requires_grad_(True) for suffix, t in init.items()}
    optimizer = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=0.0)
    with _frozen(block):
        before = _error(block, layout_, params, calls, dtype)
        for step in range(steps):
            call = calls[step % len(calls)]
            loss = _nmse(_run(block, layout_, params, call, dtype), call.target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        after = _error(block, layout_, params, calls, dtype)
    return {suffix: p.detach() for suffix, p in params.items()}, before, after


# ---------------------------------------------------------------------- the stage
@dataclasses.dataclass
class TrainedVariants:
    """Trained variants: tensor_key -> float32 tensor in the variant's own layout, and their
    record for ``summary.json`` (settings, errors, parent digests)."""

    tensors: dict[str, torch.Tensor]
    record: dict

    def block(self, layer: int, kind: str, size: int) -> dict[str, torch.Tensor] | None:
        prefix = tensor_key(layer, kind, size, "")
        found = {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}
        return found or None

    def save(self, directory: Path) -> None:
        save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(directory / TRAINED_VARIANTS_FILE))

    @classmethod
    def load(cls, directory: str | Path, record: dict, wanted: list[tuple[int, str, int]],
             flag: str = "--importance") -> "TrainedVariants":
        """The trained tensors of the ``wanted`` (layer, kind, size) variants (the others are not read)."""
        path = Path(directory) / TRAINED_VARIANTS_FILE
        require(path.is_file(), f"{flag} '{directory}': its summary records trained block variants but "
                                f"{TRAINED_VARIANTS_FILE} is missing; rerun importance")
        tensors = {}
        with safe_open(str(path), framework="pt") as f:
            held = set(f.keys())
            for layer, kind, size in wanted:
                keys = [k for k in held if k.startswith(tensor_key(layer, kind, size, ""))]
                require(keys, f"{flag} '{directory}': {TRAINED_VARIANTS_FILE} lacks layer {layer}'s {kind} variant "
                              f"of size {size}; rerun importance")
                tensors.update({k: f.get_tensor(k) for k in keys})
        return cls(tensors, record)


def layer_digests(weights, layers: set[int] | None = None, dtypes: list[torch.dtype] | None = None) -> dict[str, dict]:
    """{dtype name: {layer: sha256 of the layer's canonical tensors cast to that dtype}} from
    (canonical name, full tensor) pairs (``layers``: only these)."""
    per_layer: dict[int, list] = {}
    for name, tensor in weights:
        layer = layer_of(name)
        if layer is not None and (layers is None or layer in layers):
            per_layer.setdefault(layer, []).append((name, tensor.detach().cpu()))
    out = {}
    for dtype in dtypes:
        digests = {}
        for layer, named in sorted(per_layer.items()):
            h = hashlib.sha256()
            for name, tensor in sorted(named, key=lambda item: item[0]):
                h.update(name.encode())
                h.update(tensor.to(dtype).contiguous().view(torch.uint8).numpy().tobytes())
            digests[str(layer)] = h.hexdigest()
        out[str(dtype).removeprefix("torch.")] = digests
    return out


def digest_dtypes(dtype: torch.dtype) -> list[torch.dtype]:
    """The dtypes a parent loaded in ``dtype`` is digested in: its own and, from float32, the
    16-bit ones (a prune that loads the same checkpoint in bf16 must still match)."""
    return [dtype] + ([torch.bfloat16, torch.float16] if dtype == torch.float32 else [])


def distill_block_variants(model, desc: ModelDescription, samples: torch.Tensor, variants: BlockVariants,
                           ffn_scores: torch.Tensor, group_scores: torch.Tensor, *, steps: int, lr: float,
                           batch: int, progress=None,
                           finished: Callable[[int], dict[str, torch.Tensor] | None] | None = None,
                           on_layer: Callable[[int, dict[str, torch.Tensor]], None] | None = None) -> TrainedVariants:
    """Train every variant of ``trained_options(variants)`` (collective over data-parallel
    ranks: each trains its layers on all of ``samples``, ``[N, s+1]``, then all hold all).
    ``progress``: ticked once per trained variant. ``on_layer(i, tensors)`` gets each layer's
    trained tensors and errors when it is done (on the rank that trained it); ``finished(i)``
    gives them back for a layer a killed run trained already (None for one it did not)."""
    assert ps.get_tensor_model_parallel_world_size() == 1 and ps.get_pipeline_model_parallel_world_size() == 1
    t0 = time.time()
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    L = desc.num_layers
    options = trained_options(variants)
    layers = unwrap(model).decoder.layers
    batches = split_microbatches(samples, batch)
    weights = dict(named_weights(model))
    dtype = next(model.parameters()).dtype
    all_sizes = {"attention": variants.query_groups, "ffn": variants.ffn}
    errors = {kind: torch.zeros(L, len(sizes), 2, dtype=torch.float64) for kind, sizes in all_sizes.items()}
    tensors: dict[str, torch.Tensor] = {}
    was_training = model.training
    model.eval()
    inputs = None
    for i in range(L):
        mine = i % dp == rank
        with torch.no_grad():
            calls, inputs = _record_layer(model, i, batches, inputs, keep=mine)
        if not mine:
            continue
        kept = finished(i) if finished is not None else None
        if kept is not None:
            for kind in errors:
                errors[kind][i] = kept.pop(f"errors.{kind}")
            tensors.update(kept)
            if progress is not None:
                progress.update(sum(map(len, options.values())))
            continue
        for kind, sizes in options.items():
            block = getattr(layers[i], _MODULE[kind])
            parent = {s: weights[f"decoder.layers.{i}.{s}"].detach() for s in block_parameters(layers[i], kind)}
            for size in sizes:
                shape = VariantLayout.of(desc, kind, size, ffn_scores[i], group_scores[i])
                trained, before, after = train_variant(block, shape, shape.init(parent), calls[kind], steps, lr)
                tensors.update({tensor_key(i, kind, size, s): t for s, t in trained.items()})
                errors[kind][i, all_sizes[kind].index(size)] = torch.tensor([before, after], dtype=torch.float64)
                if progress is not None:
                    progress.update(1)
        del calls
        if on_layer is not None:
            prefix = f"layers.{i}."  # tensor_key's
            on_layer(i, {**{k: t for k, t in tensors.items() if k.startswith(prefix)},
                         **{f"errors.{kind}": e[i] for kind, e in errors.items()}})
    model.train(was_training)
    if dist.is_initialized() and dp > 1:
        tensors = _share(tensors, model, desc, variants, ffn_scores, group_scores, weights)
        for kind in errors:  # each row is set on its owner only, zeros elsewhere
            moved = errors[kind].to(layout().device)
            dist.all_reduce(moved, group=ps.get_data_parallel_group())
            errors[kind] = moved.cpu()
    for kind, sizes in all_sizes.items():  # nothing trained there: no error to record
        untrained = [j for j, size in enumerate(sizes) if size not in options[kind]]
        errors[kind][:, untrained] = float("nan")
    record = {"steps": steps, "lr": lr, "samples": len(samples), "batch": batch,
              "tokens": len(samples) * (samples.shape[1] - 1), "seconds": round(time.time() - t0, 1),
              "file": TRAINED_VARIANTS_FILE,
              "nmse": {kind: {"before": _listed(e[..., 0]), "after": _listed(e[..., 1])} for kind, e in errors.items()},
              "parent_digests": layer_digests(weights.items(), dtypes=digest_dtypes(dtype))}
    return TrainedVariants(tensors, record)


def _listed(values: torch.Tensor) -> list[list[float | None]]:
    """Rows of floats, None where nothing was trained (JSON has no NaN)."""
    return [[None if v != v else float(v) for v in row.tolist()] for row in values]


def _share(tensors: dict[str, torch.Tensor], model, desc, variants, ffn_scores, group_scores,
           weights) -> dict[str, torch.Tensor]:
    """Every rank's trained tensors on every data-parallel rank (broadcast from each layer's owner)."""
    group, dp = ps.get_data_parallel_group(), ps.get_data_parallel_world_size()
    device = layout().device
    layers = unwrap(model).decoder.layers
    out = {}
    for i in range(desc.num_layers):
        owner = dist.get_global_rank(group, i % dp)
        for kind, sizes in trained_options(variants).items():
            parent = {s: weights[f"decoder.layers.{i}.{s}"].detach() for s in block_parameters(layers[i], kind)}
            for size in sizes:
                shapes = VariantLayout.of(desc, kind, size, ffn_scores[i], group_scores[i]).init(parent)
                for suffix, like in shapes.items():
                    key = tensor_key(i, kind, size, suffix)
                    held = tensors.get(key)
                    buffer = (held if held is not None else torch.empty(like.shape, dtype=torch.float32)).to(device)
                    dist.broadcast(buffer, src=owner, group=group)
                    out[key] = buffer.cpu()
    return out
