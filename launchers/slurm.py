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

Time limits: the job asks Slurm for SIGUSR1 ``--signal-seconds`` before its time limit
(``--signal=USR1@...``); every rank then saves a checkpoint at the next step boundary
and exits 0 (torchrun itself ignores the signal). If the recipe's report is not written
yet, the job requeues itself (``scontrol requeue``, at most ``--max-requeues`` times) and
continues where it stopped. ``--time`` is checked against the recipe's save intervals:
the first checkpoint of every training stage must come before the warning, estimated
from the models' FLOPs at ``--tflops-per-gpu`` (when the model's config can be read).
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


def parse_time(text: str) -> int:
    """Slurm's --time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) -> seconds."""
    from nemo_minitron.errors import UsageError

    try:
        days, _, rest = text.rpartition("-")
        parts = [int(x) for x in rest.split(":")]
        if days:
            parts += [0] * (3 - len(parts))
            h, m, sec = parts
        else:
            h, m, sec = {1: (0, parts[0], 0), 2: (0, *parts), 3: tuple(parts)}[len(parts)]
        return ((int(days or 0) * 24 + h) * 60 + m) * 60 + sec
    except (ValueError, KeyError):
        raise UsageError(f"--time '{text}' is not a Slurm time (e.g. 04:00:00 or 1-00:00:00)") from None


def _source_description(source: str, model_config: str | None):
    """The input model's description from --model-config, a local source, or the Hub's
    config.json alone (None when none of them can be read: the time check is skipped)."""
    import json

    from nemo_minitron.checkpoint.hf_format import description_from_hf_config

    if model_config:
        return description_from_hf_config(json.loads(Path(model_config).read_text()))
    try:
        from nemo_minitron.checkpoint.api import describe_model

        if Path(source).exists() or "/" not in source:
            return describe_model(source, flag="model.source")
        from huggingface_hub import hf_hub_download

        return description_from_hf_config(json.loads(Path(hf_hub_download(source, "config.json")).read_text()))
    except Exception:  # offline, gated: the estimate is a courtesy, not a requirement
        return None


def first_checkpoints(recipe, input_desc, world: int, tflops_per_gpu: float) -> list[tuple[str, int, float]]:
    """(recipe key, steps to the first checkpoint, estimated seconds) of every training stage."""
    from nemo_minitron.config import recipe_names
    from nemo_minitron.distill.metrics import training_flops_per_token
    from nemo_minitron.prune.api import planned_description

    stages = []
    if recipe.teacher_correction.enabled:
        stages.append(("teacher_correction", recipe.teacher_correction, input_desc, None))
    teacher, previous = input_desc, input_desc
    for i, rnd in enumerate(recipe.rounds):
        pr = rnd.prune
        student = planned_description(previous, pr, tp=recipe.parallel.tp, pp=recipe.parallel.pp,
                                      names=recipe_names(f"rounds.{i}.prune"))
        stages.append((f"rounds.{i}.distill", rnd.distill, student, teacher if rnd.distill.teacher == "original"
                       else previous))
        previous = student
    out = []
    for key, cfg, student, t in stages:
        steps = cfg.save_every or cfg.steps
        flops = training_flops_per_token(student, t, cfg.seq_len) * cfg.global_batch * cfg.seq_len * steps
        out.append((key, steps, flops / (world * tflops_per_gpu * 1e12)))
    return out


def render(recipe_path: str, overrides: list[str], *, nodes: int, gpus_per_node: int, job_name: str | None = None,
           partition: str | None = None, account: str | None = None, time: str = "04:00:00",
           container_image: str | None = None, container_mounts: str | None = None, workdir: str | None = None,
           log_dir: str = "logs", requeue: bool = True, max_requeues: int = 20, signal_seconds: int = 600,
           tflops_per_gpu: float = 400.0, model_config: str | None = None, extra_env: dict[str, str] | None = None,
           setup: str | None = None) -> str:
    """The sbatch script text (validates the recipe, the world size and the time limit first)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from nemo_minitron.errors import require
    from nemo_minitron.pipeline.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides)
    require(nodes >= 1 and gpus_per_node >= 1, "--nodes and --gpus-per-node must be >= 1")
    world = nodes * gpus_per_node
    model_parallel = recipe.parallel.tp * recipe.parallel.pp
    require(world % model_parallel == 0, f"--nodes {nodes} x --gpus-per-node {gpus_per_node} = {world} GPUs is not a "
                                         f"multiple of the recipe's tp x pp = {model_parallel}")
    limit = parse_time(time)
    require(0 < signal_seconds < limit, f"--signal-seconds {signal_seconds} must be between 0 and --time ({limit} s)")
    require(max_requeues >= 0, f"--max-requeues must be >= 0 (got {max_requeues})")
    require(tflops_per_gpu > 0, f"--tflops-per-gpu must be > 0 (got {tflops_per_gpu})")
    input_desc = _source_description(recipe.model.source, model_config)
    estimate = "time check skipped: the model's config could not be read (give --model-config)"
    if input_desc is not None:
        checks = first_checkpoints(recipe, input_desc, world, tflops_per_gpu)
        for key, steps, seconds in checks:
            require(seconds <= limit - signal_seconds,
                    f"--time {time}: the first checkpoint of {key} ({steps} steps) needs about {seconds / 3600:.1f} h "
                    f"at {tflops_per_gpu:g} TFLOP/s per GPU, but Slurm's warning comes after "
                    f"{(limit - signal_seconds) / 3600:.1f} h; lower {key}.save_every or raise --time")
        estimate = "first checkpoints (estimated at %g TFLOP/s per GPU): %s" % (tflops_per_gpu, ", ".join(
            f"{key} step {steps} after ~{seconds / 60:.0f} min" for key, steps, seconds in checks))
    name = job_name or f"minitron-{recipe.name}"
    workdir = workdir or str(Path.cwd())
    sbatch = [f"--job-name={name}", f"--nodes={nodes}", "--ntasks-per-node=1", f"--gpus-per-node={gpus_per_node}",
              "--exclusive", f"--time={time}", f"--output={log_dir}/%x-%j.out", f"--signal=USR1@{signal_seconds}"]
    if partition:
        sbatch.append(f"--partition={partition}")
    if account:
        sbatch.append(f"--account={account}")
    if requeue:
        sbatch += ["--requeue", "--open-mode=append"]
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
    # torchrun ignores SIGUSR1 (an ignored signal stays ignored across exec); the ranks
    # install their own handler, save at the next step boundary and exit 0.
    task = 'trap "" USR1; ' + (f"{setup} && " if setup else "") + "exec " + " ".join(
        a if a.startswith(("--nnodes", "--rdzv")) else shlex.quote(a) for a in torchrun)
    report = Path(recipe.output_dir) / "report" / "report.md"
    lines = ["#!/bin/bash"] + [f"#SBATCH {s}" for s in sbatch] + [
        "",
        f"# nemo-minitron recipe '{recipe.name}': {nodes} nodes x {gpus_per_node} GPUs = {world} ranks; "
        f"tp={recipe.parallel.tp} pp={recipe.parallel.pp} dp={world // model_parallel}",
        f"# {estimate}",
        "set -euo pipefail",
        f"mkdir -p {shlex.quote(log_dir)}",
        f"cd {shlex.quote(workdir)}",
        'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"export MASTER_PORT={RDZV_PORT}",
        *[f"export {k}={shlex.quote(v)}" for k, v in env.items()],
        "",
        # Single quotes: $SLURM_* and $MASTER_* expand on each node, inside srun's task.
        " ".join(srun) + " bash -c " + shlex.quote(task),
    ]
    if requeue:
        lines += [
            "",
            "# stopped by the time-limit warning (exit 0) before the recipe finished: continue in a new job",
            f"if [ ! -f {shlex.quote(str(report))} ]; then",
            f"  if [ \"${{SLURM_RESTART_COUNT:-0}}\" -lt {max_requeues} ]; then",
            '    echo "recipe not finished; requeueing job $SLURM_JOB_ID"',
            '    scontrol requeue "$SLURM_JOB_ID"',
            "  else",
            f'    echo "recipe not finished after {max_requeues} requeues; giving up" >&2',
            "    exit 1",
            "  fi",
            "fi",
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
    p.add_argument("--time", default="04:00:00", help="job time limit (default 04:00:00)")
    p.add_argument("--signal-seconds", type=int, default=600,
                   help="SIGUSR1 this long before the time limit: save and exit (default 600)")
    p.add_argument("--max-requeues", type=int, default=20, help="requeue an unfinished run at most this often")
    p.add_argument("--tflops-per-gpu", type=float, default=400.0,
                   help="throughput assumed to check --time against the first checkpoints (default 400, bf16 H100)")
    p.add_argument("--model-config", help="the model's HF config.json, for that check when model.source is a Hub "
                                          "id and this machine is offline")
    p.add_argument("--container-image", help="Pyxis/enroot image, e.g. nvcr.io/nvidia/pytorch:25.09-py3")
    p.add_argument("--container-mounts", help="comma-separated src:dst mounts")
    p.add_argument("--workdir", help="directory the job runs in (default: here)")
    p.add_argument("--log-dir", default="logs")
    p.add_argument("--no-requeue", dest="requeue", action="store_false", help="do not requeue an unfinished run")
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
                      workdir=args.workdir, log_dir=args.log_dir, requeue=args.requeue,
                      max_requeues=args.max_requeues, signal_seconds=args.signal_seconds,
                      tflops_per_gpu=args.tflops_per_gpu, model_config=args.model_config, setup=args.setup)
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
