"""Shared fixtures: tiny random models, the real SmolLM2-135M, and a 2-process launcher.

In-process tests share one world-of-one megatron runtime (TP=1, PP=1). Multi-rank
behaviour runs as 2-process worker runs over gloo (``run_workers``, rank_launcher.py),
grouped so the suite stays fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))

from rank_launcher import launch  # noqa: E402
from tiny_models import make_tiny_hf_model  # noqa: E402

ROOT = TESTS.parent


def _memory_temp_root(need: int = 6 << 30) -> str | None:
    """/dev/shm when it is there with ``need`` bytes free and as much memory available: the
    suite writes checkpoints (megatron-core fsyncs every file) and data caches and reads
    them back, gigabytes in all, which on a slow disk is minutes of I/O wait."""
    try:
        shm = os.statvfs("/dev/shm")
        meminfo = Path("/proc/meminfo").read_text().split()
        available = int(meminfo[meminfo.index("MemAvailable:") + 1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return "/dev/shm" if min(shm.f_bavail * shm.f_frsize, available) >= need else None


# Temporary directories (pytest's tmp_path, unless --basetemp or PYTEST_DEBUG_TEMPROOT says
# otherwise) in memory where there is room; pyproject's tmp_path_retention_policy frees a
# passed test's directory at once.
if "PYTEST_DEBUG_TEMPROOT" not in os.environ and (temp_root := _memory_temp_root()):
    os.environ["PYTEST_DEBUG_TEMPROOT"] = temp_root

# The data cache (tokenised text, sample indices) of this test session, shared by its
# subprocesses, never the user's.
if "NEMO_MINITRON_DATA_CACHE" not in os.environ:
    import atexit
    import shutil

    os.environ["NEMO_MINITRON_DATA_CACHE"] = tempfile.mkdtemp(prefix="nemo-minitron-test-data-",
                                                              dir=os.environ.get("PYTEST_DEBUG_TEMPROOT"))
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
# Under pytest-xdist (`make test`'s WORKERS) the workers share the cores: each gets its part
# (two workers with two threads each on two cores wait on each other's threads).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT") and not os.environ.get("TEST_THREADS"):
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ["TEST_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // workers))
if os.environ.get("TEST_THREADS"):
    torch.set_num_threads(int(os.environ["TEST_THREADS"]))
    os.environ["OMP_NUM_THREADS"] = os.environ["TEST_THREADS"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: A rank aborted from C++ with no Python error (seen once in about 80 two-rank runs of
#: distill_layouts.py, before the workers tore their process groups down): a crash in the
#: runtime, not a failed check
NATIVE_ABORT = "terminate called without an active exception"
#: A line of a rank (rank_launcher prefixes them with ``[defaultN]:``, as torchrun --tee
#: does) that starts a Python traceback: a check failed there, whatever the runtime did
#: after it.
RANK_TRACEBACK = re.compile(r"^\[[^\]]+\]:.*Traceback \(most recent call last\)", re.MULTILINE)


class WorkerRerun(Warning):
    """A worker run was repeated after a native abort. Its own category, not a UserWarning
    (pyproject's filterwarnings hides those), so that every rerun shows in the summary."""


def is_native_abort(text: str) -> bool:
    """A rank died of SIGABRT after std::terminate's line, and no rank printed a Python
    traceback (then the abort followed a failed check: the check is what failed)."""
    return NATIVE_ABORT in text and "SIGABRT" in text and not RANK_TRACEBACK.search(text)


def run_workers(script: str, *args: str, out: Path, nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``tests/workers/<script>`` on ``nproc`` CPU ranks over gloo, each a process with
    torchrun's environment, forked from one pre-imported process (rank_launcher.py: saves
    the interpreter start-ups); the workers write into ``out``, a directory made here (it
    must not exist yet).

    A run in which a rank aborted natively (``is_native_abort``) is run once more, into a
    fresh ``out`` (the aborted run's is kept beside it as ``OUT.aborted``), with a
    ``WorkerRerun`` warning: the workers are deterministic, so a second run checks the same
    thing. Any other failure, and a second abort, fails the test. Each rank dumps its
    Python stack on a fatal signal (faulthandler), to find the abort's place."""
    out = Path(out)
    assert not out.exists(), f"{out}: run_workers makes the workers' output directory"
    for attempt in (1, 2):
        out.mkdir(parents=True)
        with tempfile.TemporaryDirectory(prefix="ranks-", dir=os.environ.get("PYTEST_DEBUG_TEMPROOT")) as logs:
            status, text = launch(TESTS / "workers" / script, list(map(str, args)), nproc=nproc, port=_free_port(),
                                  logs=Path(logs), timeout=timeout)
        if status == 0:
            return subprocess.CompletedProcess([script, *args], 0, text, "")
        if attempt == 2 or not is_native_abort(text):
            tail = "\n".join(text.splitlines()[-60:])
            raise AssertionError(f"{script} failed with exit {status} (run {attempt}):\n{tail}")
        out.rename(out.with_name(out.name + ".aborted"))
        warnings.warn(WorkerRerun(f"{script}: a rank aborted natively ({NATIVE_ABORT}); running it again. "
                                  "Its stacks:\n" + "\n".join(text.splitlines()[-80:])), stacklevel=2)


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


def train_records(metrics: Path) -> list[dict]:
    """The training records in a metrics.jsonl that a run may be writing (whole lines only)."""
    if not metrics.exists():
        return []
    lines = metrics.read_text().split("\n")[:-1]  # the last piece is empty or a line being written
    return [r for r in map(json.loads, filter(None, lines)) if r["kind"] == "train"]


@contextlib.contextmanager
def frozen_when(proc: subprocess.Popen, ready: Callable[[], bool], what: str, timeout: float = 300) -> Iterator[None]:
    """Wait until ``ready()`` holds for the run ``proc`` (started with start_new_session),
    then hold its whole process group stopped (SIGSTOP) for the block, and continue it
    (SIGCONT) after: inside, the test reads where the run stands and signals it while
    nothing moves, so that a signal lands where the test saw the run, not wherever it got
    to in the meantime. ``what``: the awaited event, for the message if the run ends first."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.time() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):  # a group the block killed
            os.killpg(proc.pid, signal.SIGCONT)


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` torch threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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
def hybrid_megatron(tiny_hf, tmp_path_factory, runtime):
    """Megatron-LM / Bridge checkpoints of hybrids and mixtures of experts written, read and
    exported at TP=2 and PP=2 by one 2-rank run (tests/workers/megatron_hybrid.py), for
    tests/test_megatron_hybrid.py (``out``) and tests/test_megatron_moe.py (``out/moe``)."""
    from tiny_models import TINY_VOCAB, tiny_tokenizer

    root = tmp_path_factory.mktemp("hybrid_megatron")
    tiny_tokenizer().save_pretrained(str(root / "tokenizer"))
    tokens = torch.randint(0, TINY_VOCAB, (2, 24), generator=torch.Generator().manual_seed(4))
    torch.save(tokens, root / "tokens.pt")
    spec = {"hf": str(tiny_hf("nemotron_h")), "moe_hf": str(tiny_hf("nemotron_h_moe")),
            "gpt_moe_hf": str(tiny_hf("qwen2_moe")), "tokenizer": str(root / "tokenizer"),
            "tokens": str(root / "tokens.pt"), "out": str(root / "out")}
    (root / "spec.json").write_text(json.dumps(spec))
    run_workers("megatron_hybrid.py", root / "spec.json", out=root / "out")
    return {"out": root / "out", "tokens": tokens, "ranks": torch.load(root / "out" / "results-rank0.pt"),
            "hf": {kind: tiny_hf(kind) for kind in ("nemotron_h", "nemotron_h_moe", "qwen2_moe")}}


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
    the importance and pruning tests both read it), in float32 as everything else here."""
    from nemo_minitron.importance.api import compute_importance

    out = tmp_path_factory.mktemp("smollm2_importance") / "imp"
    scores = compute_importance(str(smollm2["checkpoint"]), ["builtin:calib"], str(out), samples=16, seq_len=128,
                                micro_batch=8, layer_samples=4, dtype=fast_dtype(), progress=False)
    return out, scores


@pytest.fixture(scope="session")
def smollm2_hf(smollm2, tmp_path_factory):
    """SmolLM2-135M exported to a Hugging Face directory (float32, checked by export's own
    verification) and loaded with transformers: the reference for generation and scoring."""
    from nemo_minitron.checkpoint.api import export
    from nemo_minitron.checkpoint.verify import load_hf_model

    out = export(str(smollm2["checkpoint"]), str(tmp_path_factory.mktemp("smollm2_hf") / "hf"), verify=True)
    return {"dir": out, "model": load_hf_model(out).eval()}


@pytest.fixture
def one_thread():
    """Tiny models run hundreds of very small matrix products: one thread, so that none of
    them waits at a thread barrier on a busy machine (seconds instead of minutes)."""
    with torch_threads(1):
        yield


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nothing can be written in (mode 0o555), for the current thread even as
    root: root writes anywhere by its CAP_DAC_OVERRIDE capability, dropped here from the
    thread's effective set for the test's duration (and raised again after). Skips where
    neither works (another OS, or root without capset)."""
    directory = tmp_path / "read_only"
    directory.mkdir()
    directory.chmod(0o555)
    restore = _drop_dac_override() if os.geteuid() == 0 else None
    try:
        try:
            (directory / "probe").touch()
        except OSError:
            yield directory
        else:
            pytest.skip("cannot make a directory read-only here")
    finally:
        if restore is not None:
            restore()
        directory.chmod(0o755)


def _drop_dac_override():
    """Clear CAP_DAC_OVERRIDE from this thread's effective capabilities (Linux capget/capset);
    returns the function that raises it again, or None where that is not possible."""
    import ctypes

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3
        if libc.capget(ctypes.byref(header), data) != 0:
            return None
        saved = data[0].effective
        data[0].effective &= ~(1 << 1)  # CAP_DAC_OVERRIDE
        if libc.capset(ctypes.byref(header), data) != 0:
            return None
    except (AttributeError, OSError):
        return None

    def restore() -> None:
        data[0].effective = saved
        libc.capset(ctypes.byref(header), data)

    return restore
