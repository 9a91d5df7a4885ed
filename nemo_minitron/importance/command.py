"""``nemo-minitron importance``: argument handling; the work is in ``importance.api``."""

from __future__ import annotations

from nemo_minitron.checkpoint.megatron_layout import model_path
from nemo_minitron.commands import data_options, runtime_options
from nemo_minitron.config import from_args
from nemo_minitron.files import check_checkpoint, check_new_output
from nemo_minitron.importance.config import ImportanceConfig


def main(args) -> int:
    path = model_path(args.checkpoint, args.iteration, "CKPT")
    cfg = from_args(ImportanceConfig, args)
    check_checkpoint(path, "CKPT")
    check_new_output(args.out, "--out")
    from nemo_minitron.importance.api import compute_importance  # deferred: start-up time of the error path

    compute_importance(path, args.data, args.out, cfg, **runtime_options(args), **data_options(args))
    return 0
