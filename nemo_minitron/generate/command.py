"""``nemo-minitron generate``: argument handling; the work is in ``generate.api``."""

from __future__ import annotations

from nemo_minitron.checkpoint.megatron_layout import model_path
from nemo_minitron.commands import data_options, runtime_options
from nemo_minitron.config import from_args
from nemo_minitron.files import check_model, check_new_output
from nemo_minitron.generate.config import GenerateConfig


def main(args) -> int:
    path = model_path(args.model, args.iteration)
    cfg = from_args(GenerateConfig, args)
    check_model(path, "MODEL")
    check_new_output(args.out, "--out")
    from nemo_minitron.generate.api import generate  # deferred: start-up time of the error path

    generate(path, args.out, cfg, prompts=args.prompts, data=args.data, **runtime_options(args),
             **data_options(args))
    return 0
