#!/usr/bin/env python3
"""Run a recipe with NeMo-Run, the way NeMo users launch recipes.

    # this machine, N processes under torchrun
    python launchers/nemorun_launcher.py recipes/smollm2-135m.yaml --executor local --nproc 2

    # a Slurm cluster, over SSH from a laptop or from the login node
    python launchers/nemorun_launcher.py recipes/llama3.1-8b-4b-width.yaml --executor slurm \
        --nodes 2 --gpus-per-node 8 --account myacct --partition batch \
        --container-image nvcr.io/nvidia/pytorch:25.09-py3 --container-mounts /lustre:/lustre \
        --ssh-host login.cluster --ssh-user me --job-dir /lustre/me/nemo-run \
        data.train=[/lustre/corpus_text_document]

The task is ``python -m nemo_minitron run RECIPE [overrides]`` launched by torchrun on
every node (``LocalExecutor`` or ``SlurmExecutor`` with ``launcher="torchrun"``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build(recipe_path: str, overrides: list[str], args: argparse.Namespace):
    """(script, executor) for NeMo-Run; validates the recipe first."""
    sys.path.insert(0, str(ROOT))
    import nemo_run as run

    from nemo_minitron.errors import require
    from nemo_minitron.pipeline.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides)
    per_node = args.nproc if args.executor == "local" else args.gpus_per_node
    world = per_node * (1 if args.executor == "local" else args.nodes)
    model_parallel = recipe.parallel.tp * recipe.parallel.pp
    require(world % model_parallel == 0, f"{world} processes are not a multiple of the recipe's tp x pp = "
                                         f"{model_parallel}")
    script = run.Script(path="nemo_minitron", m=True, entrypoint="python",
                        args=["run", str(Path(recipe_path).resolve()), *overrides])
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "TOKENIZERS_PARALLELISM": "false"}
    if args.executor == "local":
        # torchrun must be found next to this interpreter (a virtual environment need not be activated)
        os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        if args.nproc > 1 and not _has_gpu():
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.nproc))
        executor = run.LocalExecutor(ntasks_per_node=args.nproc, launcher="torchrun", env_vars=env)
    else:
        require(args.account, "--account is required with --executor slurm")
        tunnel = (run.SSHTunnel(host=args.ssh_host, user=args.ssh_user, job_dir=args.job_dir) if args.ssh_host
                  else run.LocalTunnel(job_dir=args.job_dir or str(Path.cwd() / "nemo-run")))
        executor = run.SlurmExecutor(
            account=args.account, partition=args.partition, nodes=args.nodes, ntasks_per_node=args.gpus_per_node,
            gpus_per_node=args.gpus_per_node, time=args.time, container_image=args.container_image,
            container_mounts=[m for m in (args.container_mounts or "").split(",") if m], tunnel=tunnel,
            env_vars={**env, "CUDA_DEVICE_MAX_CONNECTIONS": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"},
            launcher="torchrun", exclusive=True)
    return recipe, script, executor


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="dotted recipe overrides key=value")
    p.add_argument("--executor", choices=("local", "slurm"), default="local")
    p.add_argument("--nproc", type=int, default=1, help="processes on this machine (local)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--account")
    p.add_argument("--partition")
    p.add_argument("--time", default="04:00:00")
    p.add_argument("--container-image")
    p.add_argument("--container-mounts", help="comma-separated src:dst mounts")
    p.add_argument("--ssh-host")
    p.add_argument("--ssh-user")
    p.add_argument("--job-dir", help="where NeMo-Run keeps the job's files on the cluster")
    p.add_argument("--name", help="experiment name (default: the recipe's)")
    p.add_argument("--dryrun", action="store_true", help="print what would be launched")
    args = p.parse_intermixed_args(argv)
    sys.path.insert(0, str(ROOT))
    from nemo_minitron.errors import UsageError

    try:
        recipe, script, executor = build(args.recipe, args.overrides, args)
    except UsageError as e:
        print(f"nemorun_launcher.py: error: {e}", file=sys.stderr)
        return 2
    import nemo_run as run

    with run.Experiment(args.name or f"minitron-{recipe.name}", log_level="WARN") as exp:
        exp.add(script, executor=executor, name=recipe.name)
        if args.dryrun:
            exp.dryrun()
            return 0
        exp.run(detach=False, tail_logs=True, sequential=True)
    # leaving the experiment waits for its jobs; NeMo-Run reports no status for local jobs,
    # so judge by the outcome: the run's report
    if args.executor == "local":
        return 0 if (Path(recipe.output_dir) / "report" / "report.md").is_file() else 1
    states = [str(job.status(runner=exp._runner)) for job in exp.jobs]
    return 0 if states and all("SUCCEEDED" in s.upper() for s in states) else 1


if __name__ == "__main__":
    sys.exit(main())
