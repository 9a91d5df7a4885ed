"""``nemo-minitron sparsify``: argument handling; the work is in ``sparsity.api``."""

from __future__ import annotations

from nemo_minitron.checkpoint.megatron_layout import model_path
from nemo_minitron.commands import data_options, runtime_options
from nemo_minitron.config import flag_of, from_args
from nemo_minitron.errors import require
from nemo_minitron.files import check_checkpoint, check_new_output
from nemo_minitron.sparsity.config import SparsifyConfig


def main(args) -> int:
    path = model_path(args.checkpoint, args.iteration, "CKPT")
    cfg = from_args(SparsifyConfig, args)
    require(args.data or not cfg.needs_data, f"--data is required by {flag_of(SparsifyConfig, 'method')} "
                                             f"{cfg.method} (calibration); magnitude needs none")
    check_checkpoint(path, "CKPT")
    check_new_output(args.out, "--out")
    from nemo_minitron.sparsity.api import sparsify  # deferred: start-up time of the error path

    sparsify(path, args.out, args.data, cfg, **runtime_options(args), **data_options(args))
    return 0
