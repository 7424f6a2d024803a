"""Corpora -> Megatron indexed datasets + token report: ``python launch/preprocess.py [overrides]``.

Examples::

    python launch/preprocess.py input='data/raw/huatuo26M/*.json' reader=json render=template \
        'template=["问：{instruction}","答：{output}"]' tokenizer=tok/qwen2 output_dir=data/indexed
    python launch/preprocess.py 'sources=[huatuo26m_lite,cmtmedqa,wiki2019zh]' \
        data_root=data/raw tokenizer=tok/qwen2 output_dir=data/indexed workers=16
    python launch/preprocess.py format=sft 'sources=[cmtmedqa,disc_med_sft]' \
        data_root=data/raw tokenizer=tok/qwen2 output_dir=data/sft chat.seq_length=4096
"""

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from sfmed.config.data import check_source_overrides, register
from sfmed.config.validate import build_config
from sfmed.core.cli import run_cli
from sfmed.core.logging import setup_logging

CONF = Path(__file__).resolve().parents[1] / "conf"

register()


def _preprocess(cfg: DictConfig) -> None:
    from sfmed.data.preprocess import preprocess
    from sfmed.data.report import render_markdown

    setup_logging(logging.INFO)
    conf = build_config(cfg)  # the typed PreprocessConfig; every problem at once
    try:
        report = preprocess(conf)
    except KeyboardInterrupt:
        print("preprocess: complete sources are kept; rerun to resume", file=sys.stderr)
        raise
    if report.get("format") in ("sft", "preference"):
        from sfmed.data.chat.preprocess import render_chat_markdown

        print(render_chat_markdown(report))
    else:
        print(render_markdown(report))


@hydra.main(config_path="../conf", config_name="preprocess", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_cli("preprocess", _preprocess, cfg)


if __name__ == "__main__":
    # Unknown corpus names are refused with the list of corpora before Hydra composes (whose
    # own error would be a raw traceback-style message and exit 1).
    run_cli("preprocess", check_source_overrides, sys.argv[1:], CONF / "sources")
    main()
