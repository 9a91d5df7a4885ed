"""``nemo-minitron run RECIPE.yaml``: argument handling; the work is in ``pipeline.run``.

The recipe is read and validated without torch (``pipeline.recipe``), so a wrong key is
reported at once; the runner, which needs every stage, is imported after that."""

from __future__ import annotations

import os

from nemo_minitron.files import check_model, check_output_dir
from nemo_minitron.pipeline.recipe import load_recipe


def main(args) -> int:
    recipe = load_recipe(args.recipe, [*args.overrides, *(["resume=force"] if getattr(args, "force", False) else [])])
    check_model(recipe.model.source, "recipe key 'model.source'")
    check_output_dir(recipe.output_dir, "recipe key 'output_dir'")
    from nemo_minitron.pipeline.run import run_recipe  # deferred: start-up time of the error path

    report = run_recipe(recipe)
    if os.environ.get("RANK", "0") == "0" and report is not None:  # rank 0 speaks for the run
        print(f"report: {report / 'report.md'}")
    return 0
