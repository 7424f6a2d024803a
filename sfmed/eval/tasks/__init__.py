"""The evaluation tasks by name."""

from sfmed.eval.tasks.consultation import run_consultation
from sfmed.eval.tasks.drug import run_drug_indication
from sfmed.eval.tasks.mcq import run_mcq
from sfmed.eval.tasks.pairwise import run_judge_pairwise, run_rouge_pairwise
from sfmed.eval.tasks.reference import run_reference_metrics

TASK_FNS = {
    "mcq": run_mcq,
    "rouge_pairwise": run_rouge_pairwise,
    "judge_pairwise": run_judge_pairwise,
    "reference_metrics": run_reference_metrics,
    "drug_indication": run_drug_indication,
    "consultation": run_consultation,
}

__all__ = ["TASK_FNS"]
