"""Run megatron-core on a machine without a GPU.

megatron-core assumes CUDA in a handful of places: it passes
``torch.cuda.current_device()`` as a device, creates a few tensors with a literal
``device="cuda"``, calls ``Tensor.cuda()``, synchronises and waits on streams and keeps its
tensor-parallel RNG states in the CUDA generator. On a CPU-only machine each of those
is redirected to the CPU here, and nowhere else in the project.

The inference engine (``megatron.core.inference``) also times its decode steps with
``torch.cuda.Event`` and asserts that the logits it broadcasts between pipeline stages
are CUDA tensors: events become wall-clock stand-ins, and the assertion accepts CPU
tensors.

Hybrid (Mamba) models: megatron-core's ``MambaMixer`` calls the ``mamba_ssm`` /
``causal_conv1d`` CUDA kernels, whose imports it guards (without them it refuses to build).
Where they do not import, ``enable()`` puts the PyTorch implementations of
``model/ssm_kernels.py`` in their place (the chunked SSD scan, the fused conv + scan of the
training path and the gated grouped RMSNorm; on megatron-core 0.19 also its own Triton
decode-step kernels). megatron-core 0.16 also imports Triton
helpers of its dynamic-batching inference unconditionally from the mixer's module; without
Triton a stand-in module lets the mixer import, and refuses those helpers if called.

``enable()`` switches the redirection on (idempotent), ``disable()`` restores every
original. The runtime calls ``enable()`` only when ``torch.cuda.is_available()`` is
false, so on GPUs megatron-core runs untouched.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import sys
import time
import types
from typing import Any, Callable

import megatron.core.inference.communication_utils as mc_inference_comm
import megatron.core.tensor_parallel.random as mc_random
import torch
from torch.overrides import TorchFunctionMode

from nemo_minitron.model import ssm_kernels

_CPU = torch.device("cpu")
_saved: dict[tuple[Any, str], Any] = {}
_mode: "_CudaToCpuMode | None" = None
_ABSENT = object()  # an attribute a patch added (removed again by disable)


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites ``device="cuda"`` arguments of tensor factories and ``.to()`` calls."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and (_is_cuda(kwargs["device"]) or isinstance(kwargs["device"], int)):
            kwargs = dict(kwargs, device=_CPU)
        if func in (torch.Tensor.to,) and args:
            args = tuple(_CPU if _is_cuda(a) else a for a in args)
        return func(*args, **kwargs)


def _patch(owner: Any, name: str, value: Any) -> None:
    key = (owner, name)
    if key not in _saved:
        _saved[key] = getattr(owner, name, _ABSENT)
    setattr(owner, name, value)


def _cpu_rng_state(*_args: Any, **_kwargs: Any) -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, *_args: Any, **_kwargs: Any) -> None:
    torch.set_rng_state(new_state)


def _noop(*_args: Any, **_kwargs: Any) -> None:
    return None


def _cuda_type_name(original_type: Callable[..., Any]) -> Callable[..., Any]:
    # megatron-core's optimizers sort parameters by ``param.type()`` strings such as
    # 'torch.cuda.FloatTensor'; answer that for CPU tensors when asked with no argument.
    def type_(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        name = original_type(self, *args, **kwargs)
        if args or kwargs or self.device.type != "cpu" or name.startswith("torch.cuda."):
            return name
        return name.replace("torch.", "torch.cuda.", 1)

    return type_


class _WallClockEvent:
    """``torch.cuda.Event`` stand-in: ``record()`` notes the time, ``elapsed_time`` in ms."""

    def __init__(self, *_args: Any, **_kwargs: Any) -> None:
        self._t: float | None = None

    def record(self, *_args: Any, **_kwargs: Any) -> None:
        self._t = time.perf_counter()

    def elapsed_time(self, end: "_WallClockEvent") -> float:
        return 1000.0 * ((end._t or 0.0) - (self._t or 0.0))

    def synchronize(self) -> None:
        return None

    def wait(self, *_args: Any, **_kwargs: Any) -> None:
        return None

    def query(self) -> bool:
        return True


class _CpuStream:
    """``torch.cuda.current_stream()`` stand-in: CPU work is already in order, nothing to wait for."""

    def wait_event(self, *_args: Any, **_kwargs: Any) -> None:
        return None

    def wait_stream(self, *_args: Any, **_kwargs: Any) -> None:
        return None

    def synchronize(self) -> None:
        return None


_CPU_STREAM = _CpuStream()


class _SameGeneratorFilter(logging.Filter):
    """megatron's RNG tracker warns when the CPU generator moves inside a fork of the CUDA
    one (MambaMixer initialises its parameters in such a fork); here the CUDA generator *is*
    the CPU one, so the warning is a false alarm."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "CPU RNG state changed within GPU RNG context"


_RNG_LOGGER = logging.getLogger("megatron.core.tensor_parallel.random")
_rng_filter = _SameGeneratorFilter()


def _tensor_present(tensor: Any) -> None:
    # megatron.core.inference.communication_utils._is_cuda without the device check
    assert tensor is not None


_TRITON_TENSOR_OPS = "megatron.core.inference.contexts.attention_context.triton.tensor_ops"


def _needs_triton(*_args: Any, **_kwargs: Any) -> None:
    raise NotImplementedError("dynamic-batching inference of a hybrid (Mamba) model needs Triton and a GPU")


def import_mamba_mixer():
    """megatron-core's ``mamba_mixer`` module; where Triton is missing, its inference helpers'
    module is first replaced by a stand-in whose functions refuse to run."""
    if importlib.util.find_spec("triton") is None and _TRITON_TENSOR_OPS not in sys.modules:
        stand_in = types.ModuleType(_TRITON_TENSOR_OPS)
        for name in ("tensor_get_slice_after", "tensor_masked_update", "tensor_merge"):
            setattr(stand_in, name, _needs_triton)
        sys.modules[_TRITON_TENSOR_OPS] = stand_in
    import megatron.core.ssm.mamba_mixer as mamba_mixer  # deferred: after the stand-in is in sys.modules

    return mamba_mixer


def _mamba_without_cuda_kernels() -> None:
    """The PyTorch Mamba-2 kernels in place of the ``mamba_ssm`` ones that did not import."""
    mamba_mixer = import_mamba_mixer()
    if mamba_mixer.HAVE_MAMBA_SSM:
        return
    _patch(mamba_mixer, "HAVE_MAMBA_SSM", True)
    _patch(mamba_mixer, "ExtendedRMSNorm", ssm_kernels.GatedGroupRMSNorm)
    _patch(mamba_mixer, "mamba_chunk_scan_combined", ssm_kernels.mamba_chunk_scan_combined)
    _patch(mamba_mixer, "mamba_split_conv1d_scan_combined", ssm_kernels.mamba_split_conv1d_scan_combined)
    # megatron-core 0.19 decodes with Triton kernels of its own; 0.16 with mamba_ssm's (None
    # here: its mixer then takes its own PyTorch decode step)
    for triton_kernel in ("causal_conv1d_update", "selective_state_update"):
        if getattr(mamba_mixer, triton_kernel, None) is not None:
            _patch(mamba_mixer, triton_kernel, getattr(ssm_kernels, triton_kernel))


def is_enabled() -> bool:
    return _mode is not None


def enable() -> None:
    """Redirect megatron-core's CUDA assumptions to the CPU (no-op if already on)."""
    global _mode
    if _mode is not None:
        return

    # torch.manual_seed itself calls torch.cuda.manual_seed_all, so seed the CPU
    # generator directly and leave manual_seed_all alone.
    cuda_rng_seed: Callable[[int], Any] = torch.default_generator.manual_seed
    _patch(torch.cuda, "current_device", lambda: _CPU)
    _patch(torch.cuda, "synchronize", _noop)
    _patch(torch.cuda, "Event", _WallClockEvent)
    _patch(torch.cuda, "current_stream", lambda *_a, **_k: _CPU_STREAM)  # 0.19's DDP waits on it
    _patch(mc_inference_comm, "_is_cuda", _tensor_present)
    _patch(torch.cuda, "manual_seed", cuda_rng_seed)
    _patch(torch.cuda, "get_rng_state", _cpu_rng_state)
    _patch(torch.cuda, "set_rng_state", _set_cpu_rng_state)
    _patch(torch.cuda.random, "get_rng_state", _cpu_rng_state)
    _patch(torch.cuda.random, "set_rng_state", _set_cpu_rng_state)
    _patch(mc_random, "_get_cuda_rng_state", _cpu_rng_state)
    _patch(mc_random, "_set_cuda_rng_state", _set_cpu_rng_state)
    _patch(torch.Tensor, "cuda", lambda self, *a, **k: self)
    _patch(torch.Tensor, "type", _cuda_type_name(torch.Tensor.type))
    _mamba_without_cuda_kernels()
    _RNG_LOGGER.addFilter(_rng_filter)
    _mode = _CudaToCpuMode()
    _mode.__enter__()


def disable() -> None:
    """Undo ``enable()``: every patched attribute gets its original back."""
    global _mode
    if _mode is None:
        return
    _mode.__exit__(None, None, None)
    _mode = None
    _RNG_LOGGER.removeFilter(_rng_filter)
    for (owner, name), original in reversed(list(_saved.items())):
        if original is _ABSENT:
            delattr(owner, name)
        else:
            setattr(owner, name, original)
    _saved.clear()


@contextlib.contextmanager
def enabled():
    """Context manager form, for tests."""
    was_on = is_enabled()
    enable()
    try:
        yield
    finally:
        if not was_on:
            disable()
