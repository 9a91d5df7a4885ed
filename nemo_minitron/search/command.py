"""``nemo-minitron search``: argument handling; the work is in ``search.api``."""

from __future__ import annotations

from nemo_minitron.commands import data_options, runtime_options
from nemo_minitron.config import from_args
from nemo_minitron.search.config import SearchConfig


def main(args) -> int:
    cfg = from_args(SearchConfig, args)
    from nemo_minitron.search.api import search  # deferred: start-up time of the error path

    search(args.checkpoint, args.importance, args.data, args.out, cfg, teacher=args.teacher,
           teacher_logits=args.teacher_logits, eval_data=args.eval_data, force=args.force, **runtime_options(args),
           **data_options(args))
    return 0
