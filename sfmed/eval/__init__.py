"""Evaluation of Chinese medical LLMs: the tables of the SFMed, DISC-MedLLM, QiZhenGPT and
ChiMed-GPT reports from one command (``launch/evaluate.py``; see docs/evaluation.md).

Library entry point: :func:`sfmed.eval.runner.run_evaluation` with a
:class:`sfmed.config.eval.EvalConfig`.
"""
