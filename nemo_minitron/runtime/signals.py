"""Stop requests: SIGTERM or SIGUSR1 -> save at the next step boundary and exit cleanly.

Slurm sends SIGUSR1 ahead of a time limit (``sbatch --signal=USR1@SECONDS``) and SIGTERM
before preemption or cancellation (followed by SIGKILL after its KillWait). The handler
only sets a flag; the training loop asks ``StopRequest.requested()`` after each step,
which is true on every rank as soon as one rank got a signal (one all-reduce), so all
ranks save the same step together and return.
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger("nemo_minitron")

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self, signals=SIGNALS):
        self.signals, self.received = tuple(signals), None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def requested(self) -> bool:
        """Collective: whether any rank received a stop signal."""
        from nemo_minitron.runtime.distributed import all_ranks_ok

        return not all_ranks_ok(self.received is None)
