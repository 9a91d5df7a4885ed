#!/usr/bin/env python3
"""Render an sbatch script that runs a recipe on a Slurm cluster.

    python launchers/slurm.py recipes/llama3.1-8b-4b-width.yaml --nodes 2 --gpus-per-node 8 \
        --partition batch --account myacct --container-image nvcr.io/nvidia/pytorch:25.09-py3 \
        --container-mounts /lustre:/lustre data.train=[/lustre/corpus_text_document] > job.sbatch
    sbatch job.sbatch

One torchrun per node, started by srun; the nodes meet at a c10d rendezvous on the
allocation's first host. With --container-image the job runs in a Pyxis/enroot
container. The recipe is validated (and the world size checked against its TP x PP)
before anything is written. A killed or requeued job resumes: finished stages are
skipped and distillation continues from its last checkpoint.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

RDZV_PORT = 29500

NCCL_ENV = {
    # Megatron overlaps communication with compute only with one hardware queue per device.
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "NCCL_DEBUG": "WARN",
    "NCCL_IB_TIMEOUT": "22",
    "NCCL_NVLS_ENABLE": "0",
    "OMP_NUM_THREADS": "8",
    "TOKENIZERS_PARALLELISM": "false",
}


def render(recipe_path: str, overrides: list[str], *, nodes: int, gpus_per_node: int, job_name: str | None = None,
           partition: str | None = None, account: str | None = None, time: str = "04:00:00",
           container_image: str | None = None, container_mounts: str | None = None, workdir: str | None = None,
           log_dir: str = "logs", requeue: bool = False, extra_env: dict[str, str] | None = None,
           setup: str | None = None) -> str:
    """The sbatch script text (validates the recipe and the world size first)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from nemo_minitron.errors import require
    from nemo_minitron.pipeline.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides)
    require(nodes >= 1 and gpus_per_node >= 1, "--nodes and --gpus-per-node must be >= 1")
    world = nodes * gpus_per_node
    model_parallel = recipe.parallel.tp * recipe.parallel.pp
    require(world % model_parallel == 0, f"--nodes {nodes} x --gpus-per-node {gpus_per_node} = {world} GPUs is not a "
                                         f"multiple of the recipe's tp x pp = {model_parallel}")
    name = job_name or f"minitron-{recipe.name}"
    workdir = workdir or str(Path.cwd())
    sbatch = [f"--job-name={name}", f"--nodes={nodes}", "--ntasks-per-node=1", f"--gpus-per-node={gpus_per_node}",
              "--exclusive", f"--time={time}", f"--output={log_dir}/%x-%j.out"]
    if partition:
        sbatch.append(f"--partition={partition}")
    if account:
        sbatch.append(f"--account={account}")
    if requeue:
        sbatch.append("--requeue")
    srun = ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--no-container-mount-home"
            if container_image else None]
    if container_image:
        srun += [f"--container-image={container_image}", f"--container-workdir={workdir}"]
        if container_mounts:
            srun.append(f"--container-mounts={container_mounts}")
    srun = [s for s in srun if s]
    torchrun = ["torchrun", "--nnodes=$SLURM_NNODES", f"--nproc-per-node={gpus_per_node}",
                "--rdzv-id=$SLURM_JOB_ID", "--rdzv-backend=c10d", "--rdzv-endpoint=$MASTER_ADDR:$MASTER_PORT",
                "-m", "nemo_minitron", "run", recipe_path, *overrides]
    env = {**NCCL_ENV, **(extra_env or {})}
    lines = ["#!/bin/bash"] + [f"#SBATCH {s}" for s in sbatch] + [
        "",
        f"# nemo-minitron recipe '{recipe.name}': {nodes} nodes x {gpus_per_node} GPUs = {world} ranks; "
        f"tp={recipe.parallel.tp} pp={recipe.parallel.pp} dp={world // model_parallel}",
        "set -euo pipefail",
        f"mkdir -p {shlex.quote(log_dir)}",
        f"cd {shlex.quote(workdir)}",
        'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"export MASTER_PORT={RDZV_PORT}",
        *[f"export {k}={shlex.quote(v)}" for k, v in env.items()],
        "",
        # Single quotes: $SLURM_* and $MASTER_* expand on each node, inside srun's task.
        " ".join(srun) + " bash -c " + shlex.quote((f"{setup} && " if setup else "") + " ".join(
            a if a.startswith(("--nnodes", "--rdzv")) else shlex.quote(a) for a in torchrun)),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="dotted recipe overrides key=value")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--job-name")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--time", default="04:00:00")
    p.add_argument("--container-image", help="Pyxis/enroot image, e.g. nvcr.io/nvidia/pytorch:25.09-py3")
    p.add_argument("--container-mounts", help="comma-separated src:dst mounts")
    p.add_argument("--workdir", help="directory the job runs in (default: here)")
    p.add_argument("--log-dir", default="logs")
    p.add_argument("--requeue", action="store_true")
    p.add_argument("--setup", help="command run on every node before torchrun, e.g. 'pip install -e .' "
                                   "inside a container that lacks the package")
    p.add_argument("--output", "-o", help="write the script here instead of stdout")
    args = p.parse_intermixed_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from nemo_minitron.errors import UsageError

    try:
        text = render(args.recipe, args.overrides, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                      job_name=args.job_name, partition=args.partition, account=args.account, time=args.time,
                      container_image=args.container_image, container_mounts=args.container_mounts,
                      workdir=args.workdir, log_dir=args.log_dir, requeue=args.requeue, setup=args.setup)
    except UsageError as e:
        print(f"slurm.py: error: {e}", file=sys.stderr)
        return 2
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
