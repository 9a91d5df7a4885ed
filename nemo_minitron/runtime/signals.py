"""Stop requests: SIGTERM or SIGUSR1 -> save at the next step boundary and exit cleanly.

Slurm sends SIGUSR1 ahead of a time limit (``sbatch --signal=USR1@SECONDS``) and SIGTERM
before preemption or cancellation (followed by SIGKILL after its KillWait). While
``handle_stop_signals()`` is active (the CLI holds it for a command's whole run) either
signal only sets a flag: the training loop asks ``stop_requested()`` after each step,
true on every rank as soon as one rank got a signal (one all-reduce), so all ranks save
the same step and return; a recipe stops before its next stage.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received: str | None = None


def _handle(signum, frame) -> None:
    global _received
    if _received is None:
        _received = signal.Signals(signum).name


def received() -> str | None:
    """The name of the first stop signal this process got (None: none)."""
    return _received


@contextlib.contextmanager
def handle_stop_signals(signals=SIGNALS) -> Iterator[None]:
    """Catch the stop signals (main thread only) for the duration of the block."""
    global _received
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in signals:
            previous[sig] = signal.signal(sig, _handle)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _received = None


def stop_requested() -> bool:
    """Collective: whether any rank received a stop signal."""
    from nemo_minitron.runtime.distributed import all_ranks_ok  # deferred: torch (see above)

    return not all_ranks_ok(_received is None)
