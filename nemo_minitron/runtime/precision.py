"""The compute dtype: ``--dtype auto`` (every command's and recipe's default) or an explicit one.

``auto`` is bfloat16 where bf16 matrix products run natively and float32 elsewhere:

- on a GPU: bfloat16 when it supports it (Ampere and later), else float32;
- on a CPU: bfloat16 only when torch's kernels use AVX-512 or AMX (its capability string,
  ``torch.backends.cpu.get_cpu_capability()``) *and* the CPU has bf16 instructions
  (``avx512_bf16`` or ``amx_bf16`` in /proc/cpuinfo) *and* oneDNN is not held below them
  (``ONEDNN_MAX_CPU_ISA``). Elsewhere torch emulates bf16 products: on an AVX2-only CPU a
  2048x576 @ 576x1536 product took 3.8 s in bf16 against 47 ms in float32 (82x slower),
  while on an AVX-512-BF16 CPU bf16 is about 2.4x faster than float32
  (``benchmarks/bf16_matmul.py`` measures both on the machine at hand).

The probe reads facts, it does not time anything: a timed probe on a busy machine could
answer differently from one start to the next, and a resumed run would then change its
dtype. ``NEMO_MINITRON_AUTO_DTYPE`` pins what ``auto`` means on a machine (the test suite
pins float32, so that its float32 tolerances hold on every CPU). A checkpoint's stored
dtype is never changed by ``auto``: it is the dtype of the arithmetic.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from pathlib import Path

import torch

from nemo_minitron.config import DTYPE_NAMES
from nemo_minitron.errors import require

log = logging.getLogger("nemo_minitron")

AUTO = "auto"
PIN_ENV = "NEMO_MINITRON_AUTO_DTYPE"
#: CPU flags (Linux /proc/cpuinfo) of instructions that compute bf16 products natively
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
#: oneDNN ISA limits (ONEDNN_MAX_CPU_ISA) that still include bf16 instructions
_ONEDNN_BF16_ISAS = ("BF16", "AMX", "FP16", "AVX10", "ALL", "DEFAULT")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass(frozen=True)
class MachineFacts:
    """What ``auto`` decides from (read by ``machine_facts``; tests give their own)."""

    gpu: str | None  # the GPU's name, None without CUDA
    gpu_bf16: bool  # the GPU computes bf16
    cpu_capability: str  # torch's CPU kernel level: DEFAULT, AVX2, AVX512, ...
    cpu_flags: frozenset[str]  # /proc/cpuinfo flags (empty where there is no such file)
    onednn_isa: str | None  # ONEDNN_MAX_CPU_ISA, when set


@dataclasses.dataclass(frozen=True)
class AutoChoice:
    dtype: str  # float32 | bfloat16
    reason: str


@dataclasses.dataclass(frozen=True)
class ComputeDtype:
    """A command's compute dtype: what was asked (``auto`` or a name), what it is, and why."""

    requested: str
    name: str
    reason: str

    @property
    def torch(self) -> torch.dtype:
        return _DTYPES[self.name]

    def describe(self) -> str:
        """One line for the log and the report, e.g. ``dtype auto -> float32: this CPU has no
        native bf16 matrix products (AVX2)``."""
        if self.requested == AUTO:
            return f"dtype auto -> {self.name}: {self.reason}"
        return f"dtype {self.name} ({self.reason})"


def _cpu_flags(path: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    try:
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def machine_facts() -> MachineFacts:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return MachineFacts(gpu=gpu, gpu_bf16=bool(gpu) and torch.cuda.is_bf16_supported(),
                        cpu_capability=torch.backends.cpu.get_cpu_capability(), cpu_flags=_cpu_flags(),
                        onednn_isa=os.environ.get("ONEDNN_MAX_CPU_ISA") or None)


def choose_auto_dtype(facts: MachineFacts) -> AutoChoice:
    """What ``auto`` means on a machine with these facts (no pin applied)."""
    if facts.gpu is not None:
        if facts.gpu_bf16:
            return AutoChoice("bfloat16", f"the GPU ({facts.gpu}) computes bf16 natively")
        return AutoChoice("float32", f"the GPU ({facts.gpu}) has no bf16 support")
    capability = facts.cpu_capability.upper()
    native = sorted(f for f in BF16_FLAGS if f in facts.cpu_flags)
    if not capability.startswith(("AVX512", "AMX")):
        return AutoChoice("float32", f"this CPU has no native bf16 matrix products ({facts.cpu_capability})")
    if not native:
        return AutoChoice("float32", f"this CPU has no native bf16 matrix products ({facts.cpu_capability} without "
                                     f"{' or '.join(BF16_FLAGS)})")
    if facts.onednn_isa and not any(isa in facts.onednn_isa.upper() for isa in _ONEDNN_BF16_ISAS):
        return AutoChoice("float32", f"oneDNN is held to {facts.onednn_isa} (ONEDNN_MAX_CPU_ISA), below its bf16 "
                                     "kernels")
    return AutoChoice("bfloat16", f"this CPU computes bf16 matrix products natively ({facts.cpu_capability}, "
                                  f"{', '.join(native)})")


@functools.lru_cache(maxsize=1)
def probe() -> AutoChoice:
    """``auto`` on this machine, before any pin (read once per process)."""
    return choose_auto_dtype(machine_facts())


def auto_dtype() -> AutoChoice:
    """``auto`` on this machine: the pin of ``NEMO_MINITRON_AUTO_DTYPE`` when set, else the probe."""
    pinned = os.environ.get(PIN_ENV)
    if pinned:
        require(pinned in DTYPE_NAMES, f"${PIN_ENV} must be one of {', '.join(DTYPE_NAMES)} (got '{pinned}')")
        return AutoChoice(pinned, f"pinned by ${PIN_ENV}")
    return probe()


def resolve_dtype(requested: str | None, flag: str = "--dtype") -> ComputeDtype:
    """The compute dtype for ``--dtype`` (``auto`` or a name; None means auto)."""
    requested = requested or AUTO
    if requested == AUTO:
        choice = auto_dtype()
        return ComputeDtype(AUTO, choice.dtype, choice.reason)
    require(requested in _DTYPES, f"{flag} must be one of {AUTO}, {', '.join(_DTYPES)} (got '{requested}')")
    return ComputeDtype(requested, requested, f"set by {flag}")


def stored_dtype(requested: str | None, flag: str = "--dtype") -> torch.dtype | None:
    """For commands that store weights without computing (convert, export, prune): ``auto``
    keeps the dtype the checkpoint has (None), a name converts to it."""
    if requested in (None, AUTO):
        return None
    return resolve_dtype(requested, flag).torch


def log_compute_dtype(dtype: ComputeDtype) -> None:
    log.info("%s", dtype.describe())
