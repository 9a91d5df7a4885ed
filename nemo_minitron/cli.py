"""``nemo-minitron``: one command per pipeline stage.

    convert -> importance -> plan/prune -> [sparsify] -> distill -> [sparsify] -> export
    (and eval, generate, preprocess, run)

Every command runs as a single process or under ``torchrun`` with ``--tp``/``--pp``
(data parallel = world size / (tp * pp)). Bad input is reported as one line on
stderr with exit status 2, before any work starts. Stage code is imported only when
its command runs, so ``--help`` and input errors are instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Sequence

from nemo_minitron.errors import UsageError

EXAMPLES = """examples:
  nemo-minitron convert --hf smollm2-135m --out ckpt
  nemo-minitron importance ckpt --data builtin:calib --out imp --samples 64 --seq-len 256
  nemo-minitron plan ckpt --target-params 90M
  nemo-minitron prune ckpt --importance imp --out pruned --target hidden=480,ffn=1024,heads=6
  nemo-minitron sparsify pruned --out sparse --pattern 2:4 --method sparsegpt --data builtin:calib --seq-len 512
  nemo-minitron distill --teacher ckpt --student pruned --data builtin:train --out distilled --steps 40
  nemo-minitron search ckpt --importance imp --target-params 90M --data builtin:train --out search --steps 100
  nemo-minitron export distilled/final --hf-out hf --verify
  nemo-minitron eval distilled/final --data builtin:heldout --tasks minitron_lastword,minitron_nextsentence
  nemo-minitron generate ckpt --prompts prompts.jsonl --out completions.jsonl --max-new-tokens 64
  nemo-minitron run recipes/smollm2-135m.yaml rounds.0.distill.steps=20
  torchrun --nproc-per-node 8 $(which nemo-minitron) importance ckpt --tp 2 --data /data/corpus_text_document --out imp
"""


def _runtime(p: argparse.ArgumentParser, *, seed: str | None, dtype_help: str | None = None) -> None:
    """--tp, --pp, --seed, --dtype: from the runtime's config dataclasses. ``seed``: what the
    seed decides in this command (None: the command draws no random numbers, no --seed)."""
    from nemo_minitron.config import add_flags
    from nemo_minitron.runtime.config import ParallelConfig, RunConfig

    add_flags(p, ParallelConfig, title="parallelism (data parallel = world size / (tp x pp))")
    group = add_flags(p, RunConfig, title="precision and seed" if seed else "precision",
                      skip=() if seed else ("seed",))
    for action in group._group_actions:
        if action.dest == "dtype" and dtype_help:
            action.help = dtype_help
        elif action.dest == "seed":
            action.help = f"random seed: {seed} [default: {action.default}]"


def _iteration(p: argparse.ArgumentParser) -> None:
    p.add_argument("--iteration", type=int, default=None, metavar="N",
                   help="with a Megatron-LM / Megatron-Bridge checkpoint directory: the iteration to read "
                        "[default: the latest, from latest_checkpointed_iteration.txt]")


MODEL_HELP = ("checkpoint: nemo-minitron's, a Megatron-LM / Megatron-Bridge directory (or its iter_N "
              "directory) or a NeMo 2 checkpoint")


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (``nemo-minitron CMD: error: ...``), exit status 2, like
    every other input error; ``--help`` shows the rest."""

    def error(self, message: str):  # type: ignore[override]
        import re

        choice = re.fullmatch(r"argument ([^:]+): invalid choice: (.+) \(choose from (.+)\)", message)
        named = re.fullmatch(r"argument ([^:]+): (.*)", message, re.DOTALL)
        if choice:  # the same words as every other bad value
            flag, value, allowed = choice.groups()
            message = f"{flag.split('/')[0]} must be one of {allowed.replace(chr(39), '')} (got {value})"
        elif named and named.group(2).startswith(tuple(named.group(1).split("/"))):
            message = named.group(2)  # the value's own message names the flag already
        if os.environ.get("RANK", "0") == "0":
            print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def _sub(sub, name: str, help: str, handler: str, example: str = "") -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help + ".", epilog=f"example:\n  {example}" if example else None,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(handler=handler)
    return p


def _data(p: argparse.ArgumentParser, *, required: bool = True, help: str | None = None) -> None:
    """--data, --split, --data-cache."""
    from nemo_minitron.config import add_flags
    from nemo_minitron.data.config import DataOptions

    p.add_argument("--data", nargs="+", required=required, metavar="PATH", help=help or DATA_HELP)
    add_flags(p, DataOptions, title="data")


def build_parser() -> argparse.ArgumentParser:
    from nemo_minitron import __version__
    from nemo_minitron.checkpoint.config import ConvertConfig, ExportConfig
    from nemo_minitron.config import add_flags
    from nemo_minitron.data.config import PreprocessConfig
    from nemo_minitron.distill.config import DistillConfig, TeacherLogitsConfig
    from nemo_minitron.eval_config import EvalConfig
    from nemo_minitron.generate.config import STOP_HELP, GenerateConfig
    from nemo_minitron.importance.config import ImportanceConfig
    from nemo_minitron.prune.config import PerLayerConfig, PlanConfig, PlanOutputConfig, PruneConfig
    from nemo_minitron.runtime.config import ParallelConfig
    from nemo_minitron.search.config import SearchConfig
    from nemo_minitron.sparsity.config import SparsifyConfig
    from nemo_minitron.tasks.config import TaskConfig

    parser = _Parser(prog="nemo-minitron", description=__doc__.split("\n\n")[0],
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = _sub(sub, "convert", "Hugging Face or Megatron checkpoint -> project checkpoint",
             "nemo_minitron.commands:convert", "nemo-minitron convert --hf smollm2-135m --out ckpt")
    add_flags(p.add_mutually_exclusive_group(required=True), ConvertConfig)
    p.add_argument("--out", required=True, metavar="CKPT", help="new checkpoint directory (must not exist)")
    _iteration(p)
    _runtime(p, seed=None, dtype_help="dtype of the stored weights; auto: as in the source [default: auto]")

    p = _sub(sub, "export", "checkpoint -> Hugging Face directory and/or Megatron-LM / Megatron-Bridge checkpoint",
             "nemo_minitron.commands:export", "nemo-minitron export distilled/final --hf-out hf --verify")
    p.add_argument("checkpoint", metavar="CKPT", help=MODEL_HELP)
    p.add_argument("--hf-out", metavar="DIR", help="new HF model directory (must not exist)")
    p.add_argument("--megatron-out", metavar="DIR", help="new Megatron-LM / Megatron-Bridge checkpoint directory "
                                                         "(torch_dist, args in common.pt, run_config.yaml, tokenizer)")
    add_flags(p, ExportConfig, title="export")
    _iteration(p)
    _runtime(p, seed=None, dtype_help="dtype of the exported weights; auto: as stored [default: auto]")

    p = _sub(sub, "eval", "held-out loss and perplexity, and downstream task accuracy, of a model",
             "nemo_minitron.commands:evaluate",
             "nemo-minitron eval distilled/final --data builtin:heldout --tasks minitron_lastword,hellaswag")
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP + ", an HF directory, .gguf or alias")
    _iteration(p)
    _data(p, required=False, help="held-out data for loss and perplexity: " + DATA_HELP)
    add_flags(p, EvalConfig, title="evaluation")
    add_flags(p, TaskConfig, title="downstream tasks (lm-evaluation-harness)")
    p.add_argument("--json", metavar="OUT", help="also write the result as JSON")
    _runtime(p, seed="the order of the held-out samples (which ones --max-tokens reads) and the tasks' few-shot "
                     "examples")

    p = _sub(sub, "generate", "complete prompts with a model (batched, KV cache) into a JSONL file",
             "nemo_minitron.generate.command:main",
             "nemo-minitron generate ckpt --prompts prompts.jsonl --out completions.jsonl --max-new-tokens 64")
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP + ", an HF directory, .gguf or alias")
    _iteration(p)
    p.add_argument("--out", required=True, metavar="OUT.jsonl", help="new JSONL file (a killed run continues its "
                   "OUT.jsonl.partial when started again with the same settings)")
    p.add_argument("--prompts", metavar="FILE", help="JSONL with a 'prompt' or 'messages' (chat) field per line, or "
                   "text with one prompt per line")
    _data(p, required=False, help="or prompts cut from data (with --prefix-tokens; the training part under "
                                  "--split): " + DATA_HELP)
    g = add_flags(p, GenerateConfig, title="generation")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help=STOP_HELP)
    _runtime(p, seed="sampling (--temperature > 0), and which windows of --data become prompts")

    p = _sub(sub, "importance", "rank heads, query groups, neurons, channels and layers",
             "nemo_minitron.importance.command:main",
             "nemo-minitron importance ckpt --data builtin:calib --out imp --samples 64 --seq-len 256")
    p.add_argument("checkpoint", metavar="CKPT", help=MODEL_HELP)
    _iteration(p)
    _data(p)
    p.add_argument("--out", required=True, metavar="DIR", help="new importance directory (must not exist)")
    add_flags(p, ImportanceConfig, title="importance")
    _runtime(p, seed="which calibration samples are drawn from --data (megatron-core's shuffle)")

    p = _sub(sub, "plan", "candidate pruned architectures for a parameter budget", "nemo_minitron.prune.command:plan_main",
             "nemo-minitron plan meta-llama__Llama-3.1-8B/config.json --target-params 4.5B")
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP + ", an HF directory (config.json is enough), .gguf, "
                                                  "alias or a config.json")
    _iteration(p)
    p.add_argument("--target-params", metavar="N", help="budget, e.g. 90M, 4.5B (required unless --per-layer "
                                                        "gives another budget)")
    p.add_argument("--importance", metavar="DIR", help="with --per-layer: the importance directory whose block-variant "
                                                       "scores choose each layer's shape")
    p.add_argument("--refit", action=argparse.BooleanOptionalAction, default=None,
                   help="with --per-layer: the MLP widths chosen by their refit scores (--no-refit: the unrefit "
                        "ones), as prune --per-layer chooses them with the same flag [default: auto]")
    add_flags(p, PlanConfig, title="planner")
    add_flags(p, PerLayerConfig, title="per-layer architecture (Puzzle-style)")
    add_flags(p, PlanOutputConfig, title="output")
    add_flags(p, ParallelConfig, title="parallelism the candidates must fit")

    p = _sub(sub, "prune", "prune a checkpoint to a target architecture", "nemo_minitron.prune.command:prune_main",
             "nemo-minitron prune ckpt --importance imp --out pruned --target hidden=480,ffn=1024,heads=6")
    p.add_argument("checkpoint", metavar="CKPT", help=MODEL_HELP)
    _iteration(p)
    p.add_argument("--importance", required=True, metavar="DIR", help="importance directory of CKPT")
    p.add_argument("--out", required=True, metavar="CKPT2", help="new checkpoint directory (must not exist)")
    add_flags(p, PruneConfig, title="pruning (give --target, --drop-layers or --target-params; or --per-layer and a "
                                    "budget)")
    _runtime(p, seed="--order random's draw (the other orders draw nothing)",
             dtype_help="dtype of the saved checkpoint; auto: as stored [default: auto]")

    p = _sub(sub, "sparsify", "one-shot 2:4 (N:M) or unstructured sparsity of the linear layers: magnitude, Wanda or "
             "SparseGPT", "nemo_minitron.sparsity.command:main",
             "nemo-minitron sparsify pruned --out sparse --pattern 2:4 --method sparsegpt --data builtin:calib "
             "--samples 128 --seq-len 512")
    p.add_argument("checkpoint", metavar="CKPT", help=MODEL_HELP)
    _iteration(p)
    p.add_argument("--out", required=True, metavar="CKPT2", help="new checkpoint directory (must not exist)")
    _data(p, required=False, help="calibration data (wanda, sparsegpt): " + DATA_HELP)
    add_flags(p, SparsifyConfig, title="sparsity")
    _runtime(p, seed="which calibration samples are drawn from --data (megatron-core's shuffle)",
             dtype_help="dtype of the calibration passes and the saved checkpoint; auto: as stored [default: auto]")

    p = _sub(sub, "distill", "knowledge distillation of a student from a teacher", "nemo_minitron.distill.command:main",
             "nemo-minitron distill --teacher ckpt --student pruned --data builtin:train --out distilled --steps 40")
    p.add_argument("--teacher", metavar="CKPT", help="teacher checkpoint, or none for plain cross-entropy "
                   "fine-tuning (the baseline, and teacher correction) [required unless --teacher-logits]")
    p.add_argument("--teacher-logits", metavar="DIR", help="or a teacher-logit cache (from teacher-logits): no "
                   "teacher runs; trains on the samples it covers")
    p.add_argument("--student", required=True, metavar="CKPT", help=MODEL_HELP + " (Megatron: give the iter_N "
                   "directory to choose an iteration; also for --teacher)")
    _data(p, required=False, help=DATA_HELP + "; a .jsonl of completions (from generate) trains on the "
                                              "completions' tokens only [required unless --method synthetic]")
    p.add_argument("--synthetic-data", nargs="+", default=None, metavar="PATH",
                   help="--method synthetic/both: the teacher's generations (a .jsonl from generate: prompt tokens "
                        "are not trained on), or any --data source")
    p.add_argument("--eval-data", nargs="+", default=None, metavar="PATH",
                   help="held-out data, read whole [default: the validation part of --data under --split, "
                        "else builtin:heldout when --data is built-in; required for other --data without --split]")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (a run with checkpoints there "
                                                               "resumes)")
    add_flags(p, DistillConfig, title="training and distillation")
    p.add_argument("--resume", action="store_true", help="require a checkpoint in --out to continue from")
    p.add_argument("--force", action="store_true", help="resume even though settings changed (the new ones apply "
                                                        "from the resumed step)")
    p.add_argument("--config", metavar="KD.yaml", help="a ModelOpt / NeMo / Megatron-Bridge distillation YAML "
                   "(logit_layers, intermediate_layer_pairs, skip_lm_loss, kd_loss_scale, logit_kl_temperature) "
                   "setting the --kd-* and --ce-weight options")
    _runtime(p, seed="the order of the training samples (megatron-core's shuffle) and the initial projections of "
                     "--kd-pairs")

    p = _sub(sub, "teacher-logits", "store a teacher's top-k log-probabilities of the training samples, for "
             "distillation without the teacher", "nemo_minitron.distill.command:teacher_logits_main",
             "nemo-minitron teacher-logits --teacher ckpt --data builtin:train --top-k 64 --seq-len 128 --out logits")
    p.add_argument("--teacher", required=True, metavar="CKPT", help="the teacher: " + MODEL_HELP)
    _data(p)
    p.add_argument("--out", required=True, metavar="DIR", help="new cache directory (must not exist)")
    add_flags(p, TeacherLogitsConfig, title="cache")
    _runtime(p, seed="which training samples, in which order: distill reads the cache with the same --seed")

    p = _sub(sub, "search", "choose the pruned architecture by distilling candidates briefly",
             "nemo_minitron.search.command:main",
             "nemo-minitron search ckpt --importance imp --target-params 90M --data builtin:train --out search "
             "--steps 100")
    p.add_argument("checkpoint", metavar="CKPT", help="the model to prune: " + MODEL_HELP)
    p.add_argument("--importance", required=True, metavar="DIR", help="importance directory of CKPT")
    _data(p)
    p.add_argument("--eval-data", nargs="+", default=None, metavar="PATH",
                   help="held-out data the candidates are ranked on, read whole [default: the validation part of "
                        "--data under --split, else builtin:heldout when --data is built-in; required for other "
                        "--data without --split]")
    p.add_argument("--out", required=True, metavar="DIR", help="search directory (a killed search there resumes)")
    p.add_argument("--teacher", metavar="CKPT", help="who teaches the candidates [default: CKPT]")
    p.add_argument("--teacher-logits", metavar="DIR", help="distil every candidate from this teacher-logit cache "
                   "(one teacher pass for all) instead of CKPT itself")
    plan_fields, distill_fields = _field_names(PlanConfig), _field_names(DistillConfig)
    per_layer_fields = _field_names(PerLayerConfig) + ["per_layer_candidates"]
    own = [f for f in _field_names(SearchConfig) if f not in plan_fields + distill_fields + per_layer_fields]
    add_flags(p, SearchConfig, skip=plan_fields + distill_fields + per_layer_fields, title="search")
    add_flags(p, SearchConfig, skip=own + distill_fields + per_layer_fields,
              title="planner (which shapes meet the budget)")
    add_flags(p, SearchConfig, skip=own + plan_fields + distill_fields,
              title="per-layer candidates (Puzzle-style, from importance --block-variants)")
    add_flags(p, SearchConfig, skip=own + plan_fields + per_layer_fields,
              title="each candidate's distillation (the same for all)")
    p.add_argument("--force", action="store_true", help="resume even though settings changed")
    _runtime(p, seed="as distill's, the same for every candidate")

    p = _sub(sub, "preprocess", "text, JSONL or folders -> Megatron indexed data set (PREFIX.bin/.idx)",
             "nemo_minitron.data.command:preprocess_main",
             "nemo-minitron preprocess --input corpus/ --model smollm2-135m --out corpus_text_document --workers 8")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="text files, folders, .jsonl files (a 'text' field per line) or builtin:*")
    p.add_argument("--model", required=True, metavar="MODEL",
                   help="whose tokenizer: checkpoint, HF directory, .gguf or alias")
    p.add_argument("--out", required=True, metavar="PREFIX", help="writes PREFIX.bin and PREFIX.idx (must not exist; "
                                                                 "missing directories are made)")
    add_flags(p, PreprocessConfig, title="tokenisation")

    p = _sub(sub, "run", "run a recipe: convert, importance, prune, distill, export, report",
             "nemo_minitron.pipeline.command:main", "nemo-minitron run recipes/smollm2-135m.yaml rounds.0.distill.steps=20")
    p.add_argument("recipe", metavar="RECIPE.yaml", help="the recipe (recipes/*.yaml; docs/usage.md lists its keys)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. rounds.0.distill.steps=20")
    p.add_argument("--force", action="store_true", help="continue a run whose finished or in-progress stages were "
                                                        "made with other settings (same as resume=force)")
    for command in sub.choices.values():
        _mark_required(command)
    return parser


def _mark_required(parser: argparse.ArgumentParser) -> None:
    """Say in --help which flags are required (argparse only shows it in the usage line)."""
    for group in parser._mutually_exclusive_groups:
        if group.required:
            names = " or ".join(a.option_strings[0] for a in group._group_actions)
            for action in group._group_actions:
                action.help = f"{action.help} [required: {names}]"
    for action in parser._actions:
        if action.required and action.option_strings:
            action.help = f"{action.help} [required]" if action.help else "[required]"


def _field_names(cls) -> list[str]:
    import dataclasses

    return [f.name for f in dataclasses.fields(cls)]


DATA_HELP = ("sources: Megatron indexed data set prefixes (PREFIX.bin/.idx), text files or folders, JSONL with a "
             "text field, builtin:calib|train|heldout|docs; or Megatron's blend WEIGHT PREFIX WEIGHT PREFIX ...")


def _report_error(command: str, message: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(f"nemo-minitron {command}: error: {message}", file=sys.stderr)


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def _quiet_library_warnings() -> None:
    """megatron-core and torch warn about optional accelerators and deprecations on every
    run; users get our log instead (set PYTHONWARNINGS to see them)."""
    import warnings

    if not os.environ.get("PYTHONWARNINGS"):
        for module in (r"megatron(\..*)?", r"torch(\..*)?", r"transformers(\..*)?",
                       r"nemo_minitron\.runtime\.cpu_fallback"):
            warnings.filterwarnings("ignore", module=module)
    # a CUDA build of torch on a machine without a GPU logs "No CUDA runtime is found" here
    # when megatron-core imports its extension helpers: not our user's concern, and it
    # would stand before a one-line error on stderr. A filter, not a level: importing
    # torch resets the levels of its loggers.
    logging.getLogger("torch.utils.cpp_extension").addFilter(_errors_only)


def main(argv: Sequence[str] | None = None) -> int:
    _quiet_library_warnings()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error already printed
        return int(e.code or 0)
    module, func = args.handler.split(":")
    owns_process_group = not _process_group_exists()
    # Training commands save and exit 0 on SIGTERM/SIGUSR1 (Slurm's warnings); others stop as usual.
    try:
        handler = getattr(importlib.import_module(module), func)
        with _stop_signals(args.command in STOPPABLE):
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


STOPPABLE = ("distill", "run")


def _stop_signals(enabled: bool):
    import contextlib

    if not enabled:
        return contextlib.nullcontext()
    from nemo_minitron.runtime.signals import handle_stop_signals

    return handle_stop_signals()


def _process_group_exists() -> bool:
    dist = sys.modules.get("torch.distributed")  # not imported yet: no process group can exist
    return dist is not None and dist.is_available() and dist.is_initialized()


def _close_process_group() -> None:
    if _process_group_exists():
        from nemo_minitron.runtime import distributed

        distributed.shutdown(wait_for_all=False)


if __name__ == "__main__":
    sys.exit(main())
