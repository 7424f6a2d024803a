"""One evaluation run: check the destination, run the task, write JSON/Markdown/PNG."""

from __future__ import annotations

import logging
from pathlib import Path

from sfmed.config.eval import EvalConfig, EvalConfigError
from sfmed.core.atomic import OutputExistsError, check_destination
from sfmed.eval.items import Problems
from sfmed.eval.report import write_outputs
from sfmed.eval.tasks import TASK_FNS
from sfmed.eval.tasks.common import RunContext

logger = logging.getLogger(__name__)


def run_evaluation(cfg: EvalConfig) -> dict:
    """Run ``cfg.task`` and write ``<output_dir>/<task>.json`` (+ ``.md``, ``.png``).

    Refuses an existing result unless ``overwrite`` — before any model is loaded. Returns the
    result object (the JSON's content) with ``paths`` of the written files added.
    """
    out_dir = Path(cfg.output_dir)
    # Errors a user causes (bad setting, bad file, missing install) are UserErrors: the entry
    # point prints their message once and exits 2 (sfmed.core.cli.run_cli).
    try:
        check_destination(out_dir / f"{cfg.task}.json", cfg.overwrite)
    except OutputExistsError as e:
        raise EvalConfigError(str(e)) from None
    ctx = RunContext(cfg=cfg, problems=Problems(strict=cfg.strict), out_dir=out_dir)
    try:
        tr = TASK_FNS[cfg.task](ctx)
    finally:
        ctx.close()
    paths = write_outputs(out_dir, cfg.task, tr.result, tr.markdown, tr.chart)
    return {**tr.result, "paths": paths}
