"""Evaluate a model (or a generations file) on one task; writes <task>.json/.md/.png.

    python launch/evaluate.py task=mcq model=/ckpt/hf data=cmmlu/test format=cmmlu
    python launch/evaluate.py task=rouge_pairwise data=huatuo26M_test.json \
        generations_a=ours.jsonl generations_b=peer.jsonl

Tasks, data formats and how to reproduce each seed-report table: docs/evaluation.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from sfmed.config.eval import EvalConfig, register
from sfmed.eval.runner import USER_ERRORS, run_evaluation

register()


@hydra.main(version_base="1.3", config_path="../conf/eval", config_name="evaluate")
def main(dcfg: DictConfig) -> None:
    try:
        cfg: EvalConfig = OmegaConf.to_object(dcfg)  # validates (EvalConfig.__post_init__)
        result = run_evaluation(cfg)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(Path(result["paths"]["markdown"]).read_text(encoding="utf-8"))
    print("written:", ", ".join(result["paths"].values()))


if __name__ == "__main__":
    main()
