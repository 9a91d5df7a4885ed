"""``nemo-minitron``: one command per pipeline stage.

    convert -> importance -> plan/prune -> distill -> export   (and eval, preprocess, run)

Every command runs as a single process or under ``torchrun`` with ``--tp``/``--pp``
(data parallel = world size / (tp * pp)). Bad input is reported as one line on
stderr with exit status 2, before any work starts. Stage code is imported only when
its command runs, so ``--help`` and input errors are instant.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

from nemo_minitron.errors import UsageError

AGGREGATIONS = ("mean", "l2", "var")


def _parallel(p: argparse.ArgumentParser, dtype_default: str | None = None) -> None:
    g = p.add_argument_group("parallelism and precision")
    g.add_argument("--tp", type=int, default=1, help="tensor parallel size (default 1)")
    g.add_argument("--pp", type=int, default=1, help="pipeline parallel size (default 1)")
    g.add_argument("--dtype", default=dtype_default, help="float32, bfloat16 or float16"
                   + (f" (default {dtype_default})" if dtype_default else " (default: as stored)"))
    g.add_argument("--seed", type=int, default=1234, help="random seed (default 1234)")


def _data(p: argparse.ArgumentParser, what: str = "PATH") -> None:
    p.add_argument("--data", nargs="+", required=True, metavar=what,
                   help="sources (Megatron prefixes, text/JSONL files or folders, builtin:train|calib|heldout), "
                        "or Megatron's blend: WEIGHT PREFIX WEIGHT PREFIX ...")
    p.add_argument("--split", default=None, metavar="S", help="train,validation,test shares of every source's "
                   "documents (Megatron's split, e.g. 99,1,0): training and calibration read the first part, "
                   "evaluation the second (default: every use reads all of --data)")
    p.add_argument("--data-cache", default=None, metavar="DIR", help="where tokenised text and sample indices are "
                   "cached, on a file system every rank sees (default $NEMO_MINITRON_DATA_CACHE or "
                   "~/.cache/nemo_minitron/data)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nemo-minitron", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("convert", help="Hugging Face directory, .gguf or alias -> project checkpoint")
    p.add_argument("--hf", required=True, metavar="SRC", help="HF model directory, .gguf file, or 'smollm2-135m'")
    p.add_argument("--out", required=True, metavar="CKPT", help="new checkpoint directory (must not exist)")
    _parallel(p)
    p.set_defaults(handler="nemo_minitron.commands:convert")

    p = sub.add_parser("export", help="project checkpoint -> Hugging Face directory")
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("--hf-out", required=True, metavar="DIR", help="new HF model directory (must not exist)")
    p.add_argument("--verify", action="store_true", help="reload with transformers and compare logits")
    _parallel(p)
    p.set_defaults(handler="nemo_minitron.commands:export")

    p = sub.add_parser("eval", help="held-out loss and perplexity of a model")
    p.add_argument("model", metavar="MODEL", help="checkpoint, HF directory, .gguf or alias")
    _data(p)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate at most this many tokens")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--json", metavar="OUT", help="also write the result as JSON")
    _parallel(p)
    p.set_defaults(handler="nemo_minitron.commands:evaluate")

    p = sub.add_parser("importance", help="rank heads, query groups, neurons, channels and layers")
    p.add_argument("checkpoint", metavar="CKPT")
    _data(p)
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--samples", type=int, default=1024, help="calibration samples (default 1024)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--batch-agg", default="l2", help="aggregation over samples: mean, l2, var (default l2)")
    p.add_argument("--seq-agg", default="mean", help="aggregation over the sequence: mean, l2, var (default mean)")
    p.add_argument("--neuron-activation", default="post", help="post (input of the 2nd MLP linear, default) or "
                                                               "pre (the paper's X.W1 pre-activation)")
    p.add_argument("--layer-samples", type=int, default=None,
                   help="samples for the loss-drop layer scores (default: all calibration samples)")
    p.add_argument("--drop-blocks", default="", help="comma-separated block sizes k for the best contiguous "
                                                     "k-layer block to drop (e.g. 4,8)")
    _parallel(p)
    p.set_defaults(handler="nemo_minitron.importance.command:main")

    p = sub.add_parser("plan", help="candidate pruned architectures for a parameter budget")
    p.add_argument("model", metavar="MODEL", help="checkpoint, HF directory, .gguf, alias or a config.json")
    p.add_argument("--target-params", required=True, help="budget, e.g. 90M, 4.5B")
    p.add_argument("--tolerance", type=float, default=0.05, help="accepted relative distance to the budget")
    p.add_argument("--max-width-cut", type=float, default=0.5, help="largest fraction of any width to remove")
    p.add_argument("--max-depth-cut", type=float, default=0.5, help="largest fraction of layers to remove")
    p.add_argument("--prefer", default="width", help="width (default, as the paper advises) or depth")
    p.add_argument("--top", type=int, default=10, help="rows to print")
    p.add_argument("--json", metavar="OUT")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.set_defaults(handler="nemo_minitron.prune.command:plan_main")

    p = sub.add_parser("prune", help="prune a checkpoint to a target architecture")
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("--importance", required=True, metavar="DIR")
    p.add_argument("--out", required=True, metavar="CKPT2")
    t = p.add_mutually_exclusive_group(required=True)
    t.add_argument("--target", help="e.g. hidden=480,ffn=1024,heads=6,query_groups=3,layers=24 (any subset)")
    t.add_argument("--target-params", help="parameter budget, e.g. 90M (uses the planner's first candidate)")
    p.add_argument("--order", default="importance", help="what to keep: importance (default), or the "
                                                         "baselines magnitude (weight norms) and random (--seed)")
    p.add_argument("--layer-metric", default="contiguous",
                   help="layers to drop: contiguous (default; the best block recorded by importance --drop-blocks), "
                        "loss (least loss increase), block (lowest Block Importance), or the list, e.g. 3,7,9")
    p.add_argument("--max-width-cut", type=float, default=0.5, help="with --target-params: as for plan")
    p.add_argument("--max-depth-cut", type=float, default=0.5, help="with --target-params: as for plan")
    p.add_argument("--prefer", default="width", help="with --target-params: width (default) or depth")
    _parallel(p)
    p.set_defaults(handler="nemo_minitron.prune.command:prune_main")

    p = sub.add_parser("distill", help="knowledge distillation of a student from a teacher")
    p.add_argument("--teacher", required=True, metavar="CKPT", help="teacher checkpoint, or none for plain "
                   "cross-entropy fine-tuning (the baseline, and teacher correction)")
    p.add_argument("--student", required=True, metavar="CKPT")
    _data(p)
    p.add_argument("--eval-data", nargs="+", default=None, metavar="PATH",
                   help="held-out data, read whole (default: the validation part of --data under --split, "
                        "else builtin:heldout)")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--min-lr", type=float, default=None, help="cosine floor (default lr/10)")
    p.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of --steps")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--clip-grad", type=float, default=1.0)
    p.add_argument("--kd-temperature", type=float, default=1.0)
    p.add_argument("--kd-loss", default="forward", help="forward (KL(teacher||student), default) or reverse")
    p.add_argument("--kd-top-k", type=int, default=None, help="keep only the teacher's top-k logits")
    p.add_argument("--kd-weight", type=float, default=1.0)
    p.add_argument("--ce-weight", type=float, default=0.0)
    p.add_argument("--kd-pairs", default="", help="intermediate pairs 'student:teacher,...' e.g. 3:7,9:29")
    p.add_argument("--kd-pair-loss", default="cosine", help="cosine (default) or mse")
    p.add_argument("--kd-pair-weight", default="auto", help="auto (match the logit loss) or a number")
    p.add_argument("--eval-every", type=int, default=0, help="held-out eval every N steps (0: only at the end)")
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--logit-chunk", type=int, default=1024, help="tokens per chunk of the logit loss")
    _parallel(p, dtype_default=None)
    p.set_defaults(handler="nemo_minitron.distill.command:main")

    p = sub.add_parser("preprocess", help="text, JSONL or folders -> Megatron indexed data set (.bin/.idx)")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="text files, folders, .jsonl files (a 'text' field per line) or builtin:*")
    p.add_argument("--model", required=True, metavar="MODEL",
                   help="whose tokenizer: checkpoint, HF directory, .gguf or alias")
    p.add_argument("--out", required=True, metavar="PREFIX", help="writes PREFIX.bin and PREFIX.idx (must not exist)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    p.set_defaults(handler="nemo_minitron.data.command:preprocess_main")

    p = sub.add_parser("run", help="run a recipe: convert, importance, prune, distill, export, report")
    p.add_argument("recipe", metavar="RECIPE.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. distill.steps=20")
    p.set_defaults(handler="nemo_minitron.pipeline.run:main")
    return parser


def _report_error(command: str, message: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(f"nemo-minitron {command}: error: {message}", file=sys.stderr)


def _quiet_library_warnings() -> None:
    """megatron-core and torch warn about optional accelerators and deprecations on every
    run; users get our log instead (set PYTHONWARNINGS to see them)."""
    import warnings

    if not os.environ.get("PYTHONWARNINGS"):
        for module in (r"megatron(\..*)?", r"torch(\..*)?", r"transformers(\..*)?",
                       r"nemo_minitron\.runtime\.cpu_fallback"):
            warnings.filterwarnings("ignore", module=module)


def main(argv: Sequence[str] | None = None) -> int:
    _quiet_library_warnings()
    parser = build_parser()
    args = parser.parse_args(argv)
    module, func = args.handler.split(":")
    owns_process_group = not _process_group_exists()
    try:
        handler = getattr(importlib.import_module(module), func)
        result = handler(args)
    except UsageError as e:
        _report_error(args.command, str(e).splitlines()[0] if str(e) else type(e).__name__)
        return 2
    except KeyboardInterrupt:
        _report_error(args.command, "interrupted")
        return 130
    finally:
        if owns_process_group:  # called in-process by a program that has its own: leave it
            _close_process_group()
    return int(result or 0)


def _process_group_exists() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _close_process_group() -> None:
    from nemo_minitron.runtime import distributed

    if _process_group_exists():
        distributed.shutdown(wait_for_all=False)


if __name__ == "__main__":
    sys.exit(main())
