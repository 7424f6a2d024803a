"""Loaders for the published evaluation files (one function per shape)."""

from sfmed.eval.loaders.mcq import MCQ_FORMATS, detect_mcq_format, load_mcq
from sfmed.eval.loaders.qa import QA_FORMATS, detect_qa_format, load_dialogues, load_drugs, load_qa

__all__ = [
    "MCQ_FORMATS",
    "QA_FORMATS",
    "detect_mcq_format",
    "detect_qa_format",
    "load_dialogues",
    "load_drugs",
    "load_mcq",
    "load_qa",
]
