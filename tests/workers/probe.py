"""Worker for test_run_workers.py (no process group): rank 1 fails the way MODE says, on
every run or on the first only, so that conftest.run_workers's rerun rule can be watched.
It counts the runs in RUNS (a file outside OUT) and writes OUT/run-N listing what OUT held
when run N began; rank 0 does nothing.

    probe.py MODE OUT RUNS MESSAGE    MODE: abort-once | abort-always | traceback-then-abort
    MESSAGE: the line std::terminate prints (conftest.NATIVE_ABORT)
"""

import atexit
import os
import sys
from pathlib import Path


def main() -> None:
    mode, out, runs, message = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
    if int(os.environ["RANK"]) == 0:
        return

    def native_abort() -> None:  # what a crash in the C++ runtime looks like: the line, then SIGABRT
        print(message, file=sys.stderr, flush=True)
        os.abort()

    found = " ".join(sorted(p.name for p in out.iterdir()))
    with open(runs, "a") as f:
        f.write("run\n")
    run = len(runs.read_text().splitlines())
    (out / f"run-{run}").write_text(found)
    if mode == "abort-always" or (mode == "abort-once" and run == 1):
        native_abort()
    if mode == "traceback-then-abort":  # a failed check, then the runtime aborts at exit
        atexit.register(native_abort)
        raise RuntimeError("a check on rank 1 failed")


if __name__ == "__main__":
    main()
