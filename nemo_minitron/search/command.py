"""``nemo-minitron search``: argument handling; the work is in ``search.api``."""

from __future__ import annotations

from pathlib import Path

from nemo_minitron.commands import data_options, runtime_options
from nemo_minitron.config import from_args
from nemo_minitron.errors import require
from nemo_minitron.files import check_checkpoint, check_output_dir
from nemo_minitron.search.config import SearchConfig


def main(args) -> int:
    cfg = from_args(SearchConfig, args)
    check_checkpoint(args.checkpoint, "CKPT")
    if args.teacher is not None:
        check_checkpoint(args.teacher, "--teacher")
    require(Path(args.importance).is_dir(), f"--importance '{args.importance}' does not exist")
    check_output_dir(args.out, "--out")
    from nemo_minitron.search.api import search  # deferred: start-up time of the error path

    search(args.checkpoint, args.importance, args.data, args.out, cfg, teacher=args.teacher,
           teacher_logits=args.teacher_logits, eval_data=args.eval_data, force=args.force, **runtime_options(args),
           **data_options(args))
    return 0
