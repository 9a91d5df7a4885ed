"""Shared fixtures: tiny random models, the real SmolLM2-135M, and a 2-process launcher.

In-process tests share one world-of-one megatron runtime (TP=1, PP=1). Multi-rank
behaviour runs as ``torch.distributed.run`` subprocesses over gloo (``run_workers``),
grouped so the suite stays fast.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))

from tiny_models import make_tiny_hf_model  # noqa: E402

ROOT = TESTS.parent

# The data cache (tokenised text, sample indices) of this test session, shared by its
# subprocesses, never the user's.
if "NEMO_MINITRON_DATA_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["NEMO_MINITRON_DATA_CACHE"] = tempfile.mkdtemp(prefix="nemo-minitron-test-data-")
    atexit.register(shutil.rmtree, os.environ["NEMO_MINITRON_DATA_CACHE"], True)

# Commands compute in `--dtype auto` unless told otherwise: bfloat16 on CPUs with native bf16
# products. The tests' tolerances are float32's, and a test about bf16 says so: auto means
# float32 here on every machine (this process and the commands it starts).
os.environ["NEMO_MINITRON_AUTO_DTYPE"] = "float32"


def fast_dtype() -> str:
    """The dtype a test computes in only for speed (a real model's forward passes): what
    `auto` would choose on this machine without the pin, bfloat16 only where it is native."""
    from nemo_minitron.runtime.precision import probe

    return probe().dtype


# `make test THREADS=1`: the in-process tests (and single-process commands they start) run
# with that many torch threads, so reduction-order differences between machines show up here.
if os.environ.get("TEST_THREADS"):
    torch.set_num_threads(int(os.environ["TEST_THREADS"]))
    os.environ["OMP_NUM_THREADS"] = os.environ["TEST_THREADS"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: A rank aborted from C++ with no Python error (seen once in about 80 two-rank runs of
#: distill_layouts.py, not reproduced in 12 more): a crash in the runtime, not a failed check
NATIVE_ABORT = "terminate called without an active exception"


def run_workers(script: str, *args: str, nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``tests/workers/<script>`` under torch.distributed.run with ``nproc`` CPU ranks.

    A run in which a rank aborted natively (``NATIVE_ABORT``, SIGABRT, no Python traceback
    of its own) is run once more, with a warning: the workers are deterministic, so a
    second run checks the same thing. Any other failure fails the test. Each rank dumps
    its Python stack on a fatal signal (faulthandler), to find the abort's place."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{TESTS}", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore", PYTHONFAULTHANDLER="1")
    for attempt in (1, 2):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={_free_port()}", str(TESTS / "workers" / script), *map(str, args)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode == 0:
            return proc
        text = proc.stdout + proc.stderr
        if attempt == 1 and NATIVE_ABORT in text and "(SIGABRT)" in text and "[rank" not in text:
            import warnings

            warnings.warn(f"{script}: a rank aborted natively ({NATIVE_ABORT}); running it again. Its stacks:\n"
                          + "\n".join(text.splitlines()[-80:]))
            continue
        tail = "\n".join(text.splitlines()[-60:])
        raise AssertionError(f"{script} failed with exit {proc.returncode}:\n{tail}")
    return proc


def run_cli(*args: str, nproc: int = 1, timeout: int = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``nemo-minitron ARGS`` as a user would (under torchrun when nproc > 1)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", ""),
               TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    env = {k: v for k, v in env.items() if v != ""}
    if nproc == 1:
        cmd = [sys.executable, "-m", "nemo_minitron", *map(str, args)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={_free_port()}", "-m", "nemo_minitron", *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)


@pytest.fixture(scope="session")
def runtime():
    """The in-process megatron runtime: a world of one, TP=1, PP=1."""
    from nemo_minitron.runtime.distributed import init_distributed

    return init_distributed(1, 1, seed=1234)


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """Factory: kind -> directory of a tiny random HF model (cached for the session)."""
    root = tmp_path_factory.mktemp("tiny_hf")
    made: dict[str, Path] = {}

    def get(kind: str = "llama") -> Path:
        if kind not in made:
            made[kind] = make_tiny_hf_model(kind, root / kind)
        return made[kind]

    return get


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_hf, tmp_path_factory, runtime):
    """Factory: kind -> project checkpoint converted from the tiny HF model (cached)."""
    from nemo_minitron.checkpoint.api import convert

    root = tmp_path_factory.mktemp("tiny_ckpt")
    made: dict[str, Path] = {}

    def get(kind: str = "llama") -> Path:
        if kind not in made:
            made[kind] = convert(str(tiny_hf(kind)), str(root / kind))
        return made[kind]

    return get


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory, runtime):
    """The real SmolLM2-135M: HF reference logits on a fixed 128-token input and the
    converted project checkpoint (the GGUF is read once for both)."""
    from nemo_minitron.checkpoint.api import convert
    from nemo_minitron.checkpoint.hf_import import resolve_source

    source = resolve_source("smollm2-135m")
    tokens = torch.randint(0, source.description.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = source.hf_model()(tokens).logits.float()
    root = tmp_path_factory.mktemp("smollm2")
    checkpoint = convert(source, str(root / "ckpt"))
    torch.save({"tokens": tokens, "logits": reference}, root / "reference.pt")
    return {"checkpoint": checkpoint, "tokens": tokens, "logits": reference, "source": source,
            "reference_file": root / "reference.pt"}


def cli_in_process(capsys, *args: str) -> tuple[int, str]:
    """``nemo-minitron ARGS`` in this process (fast, for input errors): (exit status, stderr)."""
    from nemo_minitron.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


@pytest.fixture(scope="session")
def smollm2_importance(smollm2, tmp_path_factory):
    """Importance of the real SmolLM2-135M on the built-in calibration split (computed once;
    the importance and pruning tests both read it)."""
    from nemo_minitron.importance.api import compute_importance

    out = tmp_path_factory.mktemp("smollm2_importance") / "imp"
    scores = compute_importance(str(smollm2["checkpoint"]), ["builtin:calib"], str(out), samples=16, seq_len=128,
                                micro_batch=8, layer_samples=4, dtype=fast_dtype(), progress=False)
    return out, scores


@pytest.fixture(scope="session")
def smollm2_hf(smollm2, tmp_path_factory):
    """SmolLM2-135M exported to a Hugging Face directory (float32) and loaded with transformers:
    the reference for generation and scoring."""
    from nemo_minitron.checkpoint.api import export
    from nemo_minitron.checkpoint.verify import load_hf_model

    out = export(str(smollm2["checkpoint"]), str(tmp_path_factory.mktemp("smollm2_hf") / "hf"))
    return {"dir": out, "model": load_hf_model(out).eval()}


@pytest.fixture
def one_thread():
    """Tiny models run hundreds of very small matrix products: one thread, so that none of
    them waits at a thread barrier on a busy machine (seconds instead of minutes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
