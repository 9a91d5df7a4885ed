#!/usr/bin/env python3
"""bfloat16 against float32 matrix products on this CPU, and what ``--dtype auto`` chose.

One product of SmolLM2-135M's MLP shape (2048 tokens x 576 @ 576 x 1536), timed in each
dtype, interleaved, median of ``--repeats``. ``auto`` should choose bfloat16 exactly where
bf16 is faster (``agrees``). Run it under ``ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2`` to see an AVX2-only CPU on an AVX-512 one. Target: agrees."""

from __future__ import annotations

import statistics
import time

from common import parser, write_results


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--shape", default="2048,576,1536", help="M,K,N of the product")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    import torch

    from nemo_minitron.runtime.precision import probe

    m, k, n = (int(v) for v in args.shape.split(","))
    gen = torch.Generator().manual_seed(0)
    operands = {dt: (torch.randn(m, k, generator=gen).to(dt), torch.randn(k, n, generator=gen).to(dt))
                for dt in (torch.float32, torch.bfloat16)}
    times: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    for a, b in operands.values():  # warm-up: oneDNN builds its kernels on the first call
        a @ b
    for _ in range(args.repeats):
        for dt, (a, b) in operands.items():
            start = time.perf_counter()
            a @ b
            times[str(dt).replace("torch.", "")].append(time.perf_counter() - start)
    median = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    choice = probe()
    bf16_faster = median["bfloat16"] < median["float32"]
    write_results(args, {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "shape": [m, k, n], "threads": torch.get_num_threads(),
        "ms": {name: round(v, 2) for name, v in median.items()},
        "bf16_over_fp32": round(median["bfloat16"] / median["float32"], 2),
        "auto": choice.dtype, "reason": choice.reason, "agrees": bf16_faster == (choice.dtype == "bfloat16")})


if __name__ == "__main__":
    main()
