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
_active = False  # handle_stop_signals() holds the signals


def _handle(signum, frame) -> None:
    global _received
    if _received is None:
        _received = signal.Signals(signum).name


def received() -> str | None:
    """The name of the first stop signal this process got (None: none)."""
    return _received


def shield_checkpoint_writer() -> None:
    """megatron-core's checkpoint writer keeps a helper process (a multiprocessing manager)
    from its first save on. Slurm signals every process of a job step, and SIGTERM would
    kill that helper, and with it the save the signal asks for. Start it now with the stop
    signals ignored: an ignored signal stays ignored in a new process. A command that
    handles the stop signals calls this once its input is checked, before its first save."""
    if not _active:
        return
    try:
        # deferred: the CLI sets the handlers up, and checks the input, before megatron-core is imported
        from megatron.core.dist_checkpointing.strategies import filesystem_async

        start = filesystem_async._get_write_results_queue  # megatron-core 0.16: created on first use
    except (ImportError, AttributeError):
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in SIGNALS}
    try:
        start()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def handle_stop_signals(signals=SIGNALS) -> Iterator[None]:
    """Catch the stop signals (main thread only) for the duration of the block."""
    global _received, _active
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in signals:
            previous[sig] = signal.signal(sig, _handle)
        _active = True
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _received, _active = None, False


def stop_requested() -> bool:
    """Collective: whether any rank received a stop signal."""
    from nemo_minitron.runtime.distributed import all_ranks_ok  # deferred: torch (see above)

    return not all_ranks_ok(_received is None)
