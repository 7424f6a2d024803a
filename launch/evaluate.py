"""Evaluate a model (or a generations file) on one task, or run a suite of models × data sets.

    python launch/evaluate.py task=mcq model=/ckpt/hf data=cmmlu/test format=cmmlu
    python launch/evaluate.py task=rouge_pairwise data=huatuo26M_test.json \\
        generations_a=ours.jsonl generations_b=peer.jsonl
    python launch/evaluate.py suite=sfmed_report      # conf/eval/suite/sfmed_report.yaml

Tasks, data formats, prompt presets and suites: docs/evaluation.md.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from sfmed.config.eval import EvalConfig, register
from sfmed.config.validate import build_config
from sfmed.core.cli import run_cli

register()


def evaluate(dcfg: DictConfig) -> None:
    """Validate the composed config, run the task or the suite, print where results went."""
    cfg: EvalConfig = build_config(dcfg)  # validates: every problem at once
    if cfg.suite is not None:
        from sfmed.eval.suite import run_suite

        report = run_suite(cfg)
    else:
        from sfmed.eval.runner import run_evaluation

        report = run_evaluation(cfg)
    print(Path(report["paths"]["markdown"]).read_text(encoding="utf-8"))
    print("written:", ", ".join(report["paths"].values()))


@hydra.main(version_base="1.3", config_path="../conf/eval", config_name="evaluate")
def main(dcfg: DictConfig) -> None:
    run_cli("evaluate", evaluate, dcfg)


if __name__ == "__main__":
    main()
