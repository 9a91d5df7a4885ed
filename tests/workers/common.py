"""What the workers share: their layout flags, and their end.

Workers import torch and the project inside ``main``: megatron-core's checkpoint writer
starts a helper process with multiprocessing's spawn method, which runs the worker's
module level again there, and that helper needs none of it."""

from __future__ import annotations

from typing import Callable


def layout_flags(flags: list[str]) -> tuple[int, int]:
    """(tp, pp) from ``--tp N`` / ``--pp N`` among ``flags`` (1 when absent)."""
    tp = int(flags[flags.index("--tp") + 1]) if "--tp" in flags else 1
    pp = int(flags[flags.index("--pp") + 1]) if "--pp" in flags else 1
    return tp, pp


def run(main: Callable[[], None]) -> None:
    """Run ``main``, then tear down megatron-core's parallel state and the process group on
    every rank (after a barrier): no gloo thread is left alive at interpreter exit, where
    one would end the rank with std::terminate."""
    from nemo_minitron.runtime.distributed import shutdown

    main()
    shutdown()
