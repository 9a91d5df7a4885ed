"""``nemo-minitron generate``: argument handling; the work is in ``generate.api``."""

from __future__ import annotations


def main(args) -> int:
    from nemo_minitron.checkpoint.api import model_path
    from nemo_minitron.commands import data_options, runtime_options
    from nemo_minitron.config import from_args
    from nemo_minitron.generate.api import generate
    from nemo_minitron.generate.config import GenerateConfig

    generate(model_path(args.model, args.iteration), args.out, from_args(GenerateConfig, args), prompts=args.prompts,
             data=args.data, **runtime_options(args), **data_options(args))
    return 0
