"""``nemo-minitron importance``: argument handling; the work is in ``importance.api``."""

from __future__ import annotations


def main(args) -> int:
    from nemo_minitron.checkpoint.api import model_path
    from nemo_minitron.commands import data_options, runtime_options
    from nemo_minitron.config import from_args
    from nemo_minitron.importance.api import compute_importance
    from nemo_minitron.importance.config import ImportanceConfig

    compute_importance(model_path(args.checkpoint, args.iteration, "CKPT"), args.data, args.out,
                       from_args(ImportanceConfig, args), **runtime_options(args), **data_options(args))
    return 0
