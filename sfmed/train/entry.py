"""What a training entry point's ``@hydra.main`` function calls: validate, then train.

Importing this module is light (no torch): the composed config is validated first
(:func:`sfmed.config.validate.validate_run_config`, every problem at once), and only a valid
config pays for importing torch, megatron-core and the recipe. Errors leave through
:func:`sfmed.core.cli.run_cli`: one message on rank 0, exit 2 on every rank, no traceback.
"""

from __future__ import annotations

import importlib
from typing import Any


def _resolve(target: str) -> Any:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def launch(prog: str, cfg: Any, schema: type, recipe: str, hf_run: str | None = None) -> str:
    """Validate ``cfg`` against ``schema`` and train the recipe ``"module:Class"``; returns
    'complete' or 'interrupted' (after printing ``<prog>: <status>`` on rank 0).

    A stage with a Hugging Face engine names its entry ``hf_run`` (``"module:function"`` taking
    the typed config); ``engine=hf`` runs that instead of the sharded recipe.
    """
    from sfmed.config.validate import validate_run_config
    from sfmed.core.cli import hold_sigterm, is_rank0, run_cli

    if hf_run is not None and cfg.get("engine") == "hf":
        from omegaconf import OmegaConf

        from sfmed.core.logging import quiet_third_party

        quiet_third_party()

        def _hf() -> str:
            hold_sigterm(False)
            return _resolve(hf_run)(OmegaConf.to_object(cfg))

        return run_cli(prog, _hf)

    def _train() -> str:
        conf = validate_run_config(cfg, schema)
        hold_sigterm(False)  # held since the entry point started (see hold_sigterm)
        import os

        from sfmed.core.logging import setup_logging

        # Before the plan and megatron-core's import: their warnings shown once (rank 0), with
        # the known third-party noise filtered.
        setup_logging(conf.logging.level, int(os.environ.get("RANK", "0")))
        recipe_cls = _resolve(recipe)
        from sfmed.train.trainer import run

        return run(conf, recipe_cls(conf))

    status = run_cli(prog, _train)
    if is_rank0():
        print(f"{prog}: {status}", flush=True)
    return status
