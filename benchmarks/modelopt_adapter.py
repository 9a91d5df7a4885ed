"""NVIDIA ModelOpt 0.47 ``mcore_minitron`` pruning as a live peer, on megatron-core's local
layer spec on a CPU: GPT models on megatron-core 0.16.1 (the project's environment), hybrid
(Mamba) models on 0.19 (benchmarks/py312_env.sh, through benchmarks/modelopt_hybrid_prune.py).
Benchmark-only: ModelOpt is installed into benchmarks/.cache/modelopt-site on first use,
never into the project's environment (the 3.12 environment has it installed).

As shipped, 0.47's ``mcore_minitron`` mode does not register on megatron-core 0.16.1
(it imports ``megatron.core.models.hybrid`` and Transformer Engine; both failures are
swallowed, so the mode is simply missing), and its head and hidden-channel importance
assume the TE layer spec. What this adapter changes, and nothing else:

1. On 0.16.1, ``megatron.core.models.hybrid`` is aliased to its ``megatron.core.models.mamba``
   (``HybridModel`` = ``MambaModel``); on every version the TE hybrid stack spec (built at
   import, needing TE on 0.19) is left out: ModelOpt's pruning never uses it.
2. Import stubs for Transformer Engine: megatron-core replaces TE by a MagicMock when TE
   is missing, so its ``TE*`` classes are mocks, which ModelOpt cannot register; they are
   replaced by empty ``nn.Module`` subclasses no local-spec module is an instance of, and
   ``transformer_engine.pytorch.{LayerNorm,RMSNorm}`` likewise.
3. Local-spec dynamic modules, built from ModelOpt's own pieces: ``torch.nn.RMSNorm``
   (ModelOpt's ``_DynamicLayerNorm`` with the shared hidden-size hparam); the local
   ``SelfAttention`` (ModelOpt's ``NumAttentionHeadsHp`` and its QKV / projection index
   maps on ``ColumnParallelLinear`` / ``RowParallelLinear`` and the local core attention).
4. Hidden-size importance on the local spec: ModelOpt hooks the TE-fused norms; here its
   own ``_layernorm_forward_hook`` (its own aggregation: mean |x| over the sequence, L2
   over samples, summed over norms) is put on the separate ``input_layernorm`` and
   ``pre_mlp_layernorm`` modules instead.
5. A 0-d tensor handed to ``all_gather_into_tensor`` (layer dropping) is reshaped to 1-d,
   which gloo requires.
6. The search-space divisors (hidden 256, ffn 512 by default) are relaxed to 1 so that
   the targets of a 135M model (hidden 480, ffn 1024) are valid choices.
7. Hybrids: ModelOpt registers its Mamba dynamic modules only where ``mamba_ssm`` imports;
   an empty stand-in module lets it, the mixer running nemo-minitron's CPU kernels
   (runtime.cpu_fallback, enabled first, so the gated norm ModelOpt registers is the one
   in the mixer). A Mamba layer's norm, fused into ``in_proj`` in the TE spec, is its own
   module in the local spec: it joins the hidden-size hparam and gets the norm hook of 4.

The benchmark checks the adapter two ways: an identity prune reproduces the teacher's
loss, and ModelOpt's kept units rebuilt by nemo-minitron's own pruning code reproduce
ModelOpt's pruned loss.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import torch

MODELOPT_VERSION = "0.47.0"
SITE = Path(__file__).parent / ".cache" / "modelopt-site"
# ModelOpt's pure-Python dependencies that the project's environment lacks
EXTRA_PACKAGES = [f"nvidia-modelopt=={MODELOPT_VERSION}", "pulp<4", "nvidia-ml-py>=12"]

_READY = False


def install() -> None:
    """pip-install ModelOpt (no dependencies) into the benchmark's own folder, once; nothing
    where the environment has it already (benchmarks/py312_env.sh installs it)."""
    try:
        if importlib.metadata.version("nvidia-modelopt") == MODELOPT_VERSION:
            return
    except importlib.metadata.PackageNotFoundError:
        pass
    if not (SITE / f"nvidia_modelopt-{MODELOPT_VERSION}.dist-info").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(SITE), "--no-deps",
                        *EXTRA_PACKAGES], check=True)
    if str(SITE) not in sys.path:
        sys.path.insert(0, str(SITE))


def _stub_transformer_engine() -> None:
    from unittest.mock import MagicMock

    import megatron.core.extensions.transformer_engine as mte

    for name in dir(mte):
        value = getattr(mte, name)
        if name.startswith("TE") and (isinstance(value, MagicMock) or value is None):
            setattr(mte, name, type(name, (torch.nn.Module,), {"__module__": mte.__name__}))
    te = types.ModuleType("transformer_engine")
    te.__path__ = []
    te_pytorch = types.ModuleType("transformer_engine.pytorch")
    for name in ("LayerNorm", "RMSNorm"):
        setattr(te_pytorch, name, type(name, (torch.nn.Module,), {}))
    te.pytorch = te_pytorch
    sys.modules.setdefault("transformer_engine", te)
    sys.modules.setdefault("transformer_engine.pytorch", te_pytorch)


def _alias_hybrid_module() -> None:
    """megatron-core 0.16: ``models.hybrid`` is 0.16's ``models.mamba`` (``HybridModel`` =
    ``MambaModel``). Every version: the TE hybrid stack spec, which megatron builds when its
    module is imported (0.19: it needs TE), is left out; ModelOpt's pruning never uses it."""
    specs = types.ModuleType("megatron.core.models.hybrid.hybrid_layer_specs")
    specs.hybrid_stack_spec = None
    sys.modules.setdefault(specs.__name__, specs)
    if importlib.util.find_spec("megatron.core.models.hybrid") is not None:
        return
    import megatron.core.models.mamba.mamba_model as mamba_model

    hybrid = types.ModuleType("megatron.core.models.hybrid")
    hybrid.__path__ = []
    model = types.ModuleType("megatron.core.models.hybrid.hybrid_model")
    model.HybridModel = hybrid.HybridModel = mamba_model.MambaModel
    sys.modules.setdefault("megatron.core.models.hybrid", hybrid)
    sys.modules.setdefault("megatron.core.models.hybrid.hybrid_model", model)


def _stub_mamba_ssm() -> None:
    """ModelOpt registers its Mamba dynamic modules only where ``mamba_ssm`` imports; on a CPU
    the mixer runs nemo-minitron's kernels instead (runtime.cpu_fallback, enabled before
    this: ModelOpt then registers the gated norm it put in place of ``ExtendedRMSNorm``)."""
    if importlib.util.find_spec("mamba_ssm") is None:
        sys.modules.setdefault("mamba_ssm", types.ModuleType("mamba_ssm"))


def _gloo_safe_all_gather() -> None:
    original = torch.distributed.all_gather_into_tensor
    if getattr(original, "_adapted", False):
        return

    @functools.wraps(original)
    def all_gather_into_tensor(output, input, *args, **kwargs):
        return original(output, input.reshape(1) if input.dim() == 0 else input, *args, **kwargs)

    all_gather_into_tensor._adapted = True
    torch.distributed.all_gather_into_tensor = all_gather_into_tensor


def _register_local_spec() -> None:
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from modelopt.torch.nas.modules.norm import _DynamicLayerNorm
    from modelopt.torch.nas.modules.utils import get_sliced_tensor, get_sliced_tensor_by_slices
    from modelopt.torch.nas.plugins import megatron as mo
    from modelopt.torch.nas.registry import DMRegistry
    from modelopt.torch.opt.dynamic import DynamicModule
    from modelopt.torch.prune.plugins import mcore_minitron as mm

    @DMRegistry.register({torch.nn.RMSNorm: "torch.nn.RMSNorm"})
    class _DynamicRMSNorm(_DynamicLayerNorm):
        """torch.nn.RMSNorm (the local spec's norm) on the shared hidden-size hparam."""

        def _setup(self, *, num_features):
            self._register_hparam("num_features", num_features)
            self._register_dynamic_attribute("weight", self._cut_to_active_features)
            self._register_dynamic_attribute("normalized_shape", self._get_normalized_shape)

    te_qkv, te_proj = mo._DynamicTEQKVLayerNormColumnParallelLinear, mo._DynamicTEProjRowParallelLinear

    class _LocalQKV(DynamicModule, ColumnParallelLinear):
        """ModelOpt's QKV index map (group-aware heads, K/V kept) on the local ColumnParallelLinear."""

        def _setup(self, *, num_attention_heads, hidden_size):
            self._register_hparam("input_size", hidden_size)
            self._register_hparam("num_attention_heads", num_attention_heads)
            self._register_dynamic_attribute("output_size_per_partition", lambda mod, val: (
                (num_attention_heads.active + 2 * mod.config.num_query_groups) * mod.config.kv_channels))
            self._register_dynamic_attribute("weight", te_qkv._get_weight)
            if getattr(self, "bias", None) is not None:
                self._register_dynamic_attribute("bias", te_qkv._get_bias)

        _get_output_size_indices = te_qkv._get_output_size_indices

    class _LocalProj(DynamicModule, RowParallelLinear):
        """ModelOpt's output-projection index map on the local RowParallelLinear."""

        def _setup(self, *, num_attention_heads, hidden_size):
            self._register_hparam("output_size", hidden_size)
            self._register_hparam("num_attention_heads", num_attention_heads)
            heads_width = lambda mod, val: num_attention_heads.active * mod.config.kv_channels  # noqa: E731
            self._register_dynamic_attribute("input_size", heads_width)
            self._register_dynamic_attribute("input_size_per_partition", heads_width)
            self._register_dynamic_attribute("weight", te_proj._get_weight)
            if getattr(self, "bias", None) is not None:
                self._register_dynamic_attribute("bias", lambda mod, b: get_sliced_tensor(mod, b, "output_size"))

        _get_input_size_indices = te_proj._get_input_size_indices

    class _LocalCoreAttention(DynamicModule, DotProductAttention):
        def _setup(self, *, attention):
            self._register_dynamic_attribute("num_attention_heads_per_partition",
                                             lambda mod, val: attention.num_attention_heads)
            self._register_dynamic_attribute("hidden_size_per_partition", lambda mod, val: (
                attention.num_attention_heads * attention.config.kv_channels))

    original_setup = mo._DynamicSelfAttention._setup

    def _setup(self, *, hidden_size):
        if not isinstance(self.linear_qkv, ColumnParallelLinear):  # TE spec: ModelOpt's own code
            return original_setup(self, hidden_size=hidden_size)
        heads = mo.NumAttentionHeadsHp(self.num_attention_heads_per_partition, self.num_query_groups_per_partition)
        self._register_hparam("num_attention_heads", heads)
        self._register_dynamic_attribute("num_attention_heads_per_partition", lambda mod, val: mod.num_attention_heads)
        _LocalCoreAttention.convert(self.core_attention, attention=self)
        _LocalQKV.convert(self.linear_qkv, num_attention_heads=heads, hidden_size=hidden_size)
        _LocalProj.convert(self.linear_proj, num_attention_heads=heads, hidden_size=hidden_size)
        self._has_fused_input_layernorm = False  # the local spec's input norm is its own module

    mo._DynamicSelfAttention._setup = _setup

    original_register = mm._register_hidden_size_importance

    def _register_hidden_size_importance(module, registry):
        """ModelOpt's registration, then its norm hook moved from the fused-norm linears to
        the local spec's separate norms (the input norms are already hooked that way)."""
        original_register(module, registry)
        norm_hook = None
        for owner, handle in registry._hooks:
            fn = owner._forward_hooks.get(handle.id)
            if getattr(getattr(fn, "func", None), "__name__", "") == "_layernorm_forward_hook":
                norm_hook = fn
                break
        kept = []
        for owner, handle in registry._hooks:
            fn = owner._forward_hooks.get(handle.id)
            if getattr(getattr(fn, "func", None), "__name__", "") == "_fused_ln_linear_forward_hook":
                assert isinstance(owner, ColumnParallelLinear), "only local-spec fused hooks are moved"
                handle.remove()
            else:
                kept.append((owner, handle))
        registry._hooks[:] = kept
        assert norm_hook is not None, "ModelOpt registered no separate-norm hook"
        for layer in module.decoder.layers:
            # a GPT or MLP layer's pre-MLP norm, a Mamba layer's norm (an attention-only
            # layer of a hybrid has an identity in the pre-MLP place, no norm)
            for norm in (getattr(layer, "pre_mlp_layernorm", None), getattr(layer, "norm", None)):
                if isinstance(norm, DynamicModule):
                    registry.register_hook(norm, norm_hook, hook_type="forward")

    mm._register_hidden_size_importance = _register_hidden_size_importance

    original_mamba_setup, original_mamba_export = mo._DynamicMambaLayer._setup, mo._DynamicMambaLayer.export

    def _mamba_setup(self, *, hidden_size):
        """ModelOpt's (the mixer), and the local spec's separate norm on the hidden-size hparam."""
        original_mamba_setup(self, hidden_size=hidden_size)
        if isinstance(self.norm, torch.nn.RMSNorm):
            DMRegistry.convert(self.norm, num_features=hidden_size)

    def _mamba_export(self):
        if isinstance(self.norm, DynamicModule):
            self.norm.export()
        return original_mamba_export(self)

    mo._DynamicMambaLayer._setup, mo._DynamicMambaLayer.export = _mamba_setup, _mamba_export


_STUBBED = False


def _stub_imports() -> None:
    """Install (once) and the import-time adaptations 1, 2, 5 and 7 (shared by pruning and sparsity)."""
    global _STUBBED
    install()
    if not _STUBBED:
        _stub_transformer_engine()
        _alias_hybrid_module()
        _stub_mamba_ssm()
        _gloo_safe_all_gather()
        _STUBBED = True


def load() -> types.SimpleNamespace:
    """Install (once), adapt, import; returns the ModelOpt entry points used here."""
    global _READY
    _stub_imports()
    if not _READY:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import modelopt.torch.nas  # noqa: F401
            import modelopt.torch.prune  # noqa: F401
            from modelopt.torch.prune.plugins import mcore_minitron  # noqa: F401  (raises if it did not import)
        _register_local_spec()
        _READY = True
    import modelopt.torch.nas as mtn
    import modelopt.torch.prune as mtp
    from modelopt.torch.prune.plugins.mcore_minitron import get_mcore_minitron_config

    return types.SimpleNamespace(mtp=mtp, mtn=mtn, config=get_mcore_minitron_config(
        hidden_size_divisor=1, ffn_hidden_size_divisor=1, mamba_head_dim_divisor=1, num_moe_experts_divisor=1,
        num_layers_divisor=1))


def export_config(old, new) -> dict:
    """ModelOpt's constraint for our target (query groups are not prunable in ModelOpt)."""
    assert new.num_query_groups == old.num_query_groups, "ModelOpt cannot prune query groups"
    out = {}
    for key, a, b in (("hidden_size", old.hidden_size, new.hidden_size),
                      ("ffn_hidden_size", old.ffn_hidden_size, new.ffn_hidden_size),
                      ("num_attention_heads", old.num_attention_heads, new.num_attention_heads),
                      ("num_layers", old.num_layers, new.num_layers)):
        if a != b:
            out[key] = b
    return out


def prune(model, old, new, forward_loop, scores_path: Path):
    """Prune ``model`` in place with ModelOpt to ``new``'s shape; returns the kept units in
    nemo-minitron's terms (original indices, ascending) and the pruned (exported) model.
    ``scores_path``: ModelOpt's own cache of activations and layer scores, so that every
    target of one seed reuses one calibration pass, as ModelOpt itself intends."""
    mo = load()
    from modelopt.torch.prune.plugins.mcore_minitron import MCoreMinitronSearcher

    original_index = {id(layer): layer.layer_number - 1 for layer in model.decoder.layers}
    kept: dict = {}
    original_prune = MCoreMinitronSearcher._prune

    def _prune(searcher, config):
        """ModelOpt's own _prune, then its chosen units read from its hparams (before export)."""
        original_prune(searcher, config)
        m = searcher.model
        kept.update(hidden=_ascending(m.get_hparam("hidden_size").active_slice, old.hidden_size), layers=[],
                    ffn={}, heads={})
        for layer in m.decoder.layers:
            index = original_index[id(layer)]
            kept["layers"].append(index)
            kept["ffn"][index] = _ascending(layer.mlp.get_hparam("ffn_hidden_size").active_slice,
                                            old.ffn_hidden_size)
            kept["heads"][index] = _ascending(layer.self_attention.get_hparam("num_attention_heads").active_slice,
                                              old.num_attention_heads)

    MCoreMinitronSearcher._prune = _prune
    try:
        model, _ = mo.mtp.prune(model, mode=[("mcore_minitron", mo.config)],
                                constraints={"export_config": export_config(old, new)}, dummy_input=None,
                                config={"forward_loop": forward_loop, "scores_path": str(scores_path)})
    finally:
        MCoreMinitronSearcher._prune = original_prune
    assert kept, "ModelOpt did not prune"
    return kept, model


def keep_plan(kept: dict, old):
    """ModelOpt's kept units (``prune``'s record, or modelopt_hybrid_prune.py's JSON) as
    nemo-minitron's KeepPlan; every layer with attention keeps all its query groups."""
    from nemo_minitron.prune.select import KeepPlan

    def per_layer(key: str) -> dict[int, torch.Tensor]:
        return {int(i): torch.tensor(v) for i, v in kept.get(key, {}).items()}

    heads = per_layer("heads")
    return KeepPlan(hidden=torch.tensor(kept["hidden"]), layers=kept["layers"], ffn=per_layer("ffn"),
                    groups={i: torch.arange(old.num_query_groups) for i in heads}, heads=heads,
                    mamba_heads=per_layer("mamba_heads"), mamba_head_dim=per_layer("mamba_head_dim"))


def check_rebuilt(theirs: float, ours: float, old, what: str) -> None:
    """Fail when ModelOpt's own pruned model and ours rebuilt from its kept units (or, for an
    identity prune, ModelOpt's output and the model it was given) give losses further apart
    than float32 rounding allows: the adapter or the kept-unit mapping is then wrong, and
    every ModelOpt figure of the run with it. The bound: the two run the
    same weights through different kernels (other reduction orders, other library versions
    for hybrids), so each logit carries a relative error of at most about
    layers * sqrt(widest reduction) * eps(fp32) of the unpruned model ``old``; logits are below
    about 10 in magnitude, and the loss (a mean of log-softmax terms) inherits at most that
    absolute error."""
    widest = max(old.ffn_hidden_size, old.hidden_size)
    bound = 10 * old.num_layers * widest ** 0.5 * torch.finfo(torch.float32).eps
    if not abs(theirs - ours) <= bound:
        raise AssertionError(f"{what}: ModelOpt's pruned model gives loss {theirs:.6f}, ours rebuilt from its kept "
                             f"units {ours:.6f}; they may differ by float32 rounding only (<= {bound:.2g} nats)")


def forward_loop(samples, micro_batch: int = 4):
    """ModelOpt's ``forward_loop``: one forward of ``model`` over the calibration ``samples``
    ([N, s+1] tokens), the hooks the only product."""
    from nemo_minitron.importance.api import hooks_only_step
    from nemo_minitron.model.forward import run_forward_only, split_microbatches
    from nemo_minitron.runtime.distributed import layout

    def loop(model):
        run_forward_only(model, split_microbatches(samples, micro_batch), hooks_only_step(layout().device))

    return loop


def _ascending(active_slice, size: int) -> list[int]:
    if isinstance(active_slice, slice):
        return list(range(size))[active_slice]
    return sorted(int(i) for i in active_slice)


# ---------------------------------------------------------------------- sparsity
# ModelOpt's weight sparsity (modelopt.torch.sparsity) runs as shipped: its rules cover
# torch.nn.Linear (HF models) and, through its megatron plugin, megatron-core's
# Column/RowParallelLinear (all but ``output_layer``), so the same GPTModel our sparsify
# works on is sparsified here; it needs no adaptation beyond the import stubs above (its
# only CUDA calls, the Hessian's placement and ``torch.cuda.empty_cache``, are guarded or
# no-ops on a CPU; the searcher's ``device: cuda`` setting is read nowhere).
SPARSITY_MODES = {"magnitude": "sparse_magnitude", "sparsegpt": "sparsegpt"}


def load_sparsity():
    """``modelopt.torch.sparsity`` with its megatron plugin registered."""
    _stub_imports()
    import warnings

    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import modelopt.torch.sparsity as mts
    from modelopt.torch.sparsity.weight_sparsity.module import SpDMRegistry

    # its plugin import swallows failures: without it only torch.nn.Linear would be sparsified
    assert ColumnParallelLinear in SpDMRegistry and RowParallelLinear in SpDMRegistry, "megatron plugin missing"
    return mts


def sparsify(model, method: str, forward_loop, modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Make ``model`` 2:4 sparse in place with ModelOpt's ``method`` (its defaults: for
    SparseGPT, damping 0.1, blocks of 128 columns, one calibration pass of the dense model)
    and export it (masked weights zero); returns the keep mask of each of ``modules`` (a
    weight name -> its module, looked up before ModelOpt converts them in place)."""
    mts = load_sparsity()
    config = {"forward_loop": forward_loop} if method == "sparsegpt" else None
    mts.sparsify(model, SPARSITY_MODES[method], config=config)
    masks = {}
    for name, module in modules.items():
        mask = getattr(module, "_weight_mask", None)  # None: ModelOpt left the weight dense
        masks[name] = torch.ones_like(module._parameters["weight"], dtype=torch.bool) if mask is None else mask.clone()
    mts.export(model)
    return masks
