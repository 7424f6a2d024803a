"""Multi-turn consultation quality (DISC-MedLLM's CMB-Clin table): an LLM judge scores the doctor's
proactivity, accuracy, helpfulness and linguistic quality from 1 to 5.

Without a model the recorded dialogues are scored as they are (e.g. DISC's published ones). With
``model=``/``generations=`` every doctor turn is answered by the model given the recorded
conversation before it, and the dialogue is judged with the model's replies in place (the patient
turns are not re-simulated).
"""

from __future__ import annotations

from pathlib import Path

from sfmed.eval.backends import Chat
from sfmed.eval.backends.openai_api import parallel_map
from sfmed.eval.items import Dialogue
from sfmed.eval.judge import CONSULTATION_CRITERIA, Judge
from sfmed.eval.loaders import load_dialogues
from sfmed.eval.report import chart_bars, md_table
from sfmed.eval.tasks.common import RunContext, TaskResult, mean


def doctor_prompts(d: Dialogue, system_prompt: str | None) -> list[tuple[str, Chat]]:
    """``(id, chat)`` for each doctor turn: the recorded conversation before it, doctor = assistant."""
    out = []
    chat: Chat = [{"role": "system", "content": system_prompt}] if system_prompt else []
    k = 0
    for role, text in d.turns:
        if role == "doctor":
            out.append((f"{d.id}-{k}", list(chat)))
            k += 1
        chat.append({"role": "assistant" if role == "doctor" else "user", "content": text})
    return out


def run_consultation(ctx: RunContext) -> TaskResult:
    """Judge every dialogue (recorded or with the model's doctor turns) on the four criteria."""
    c = ctx.cfg
    judge = Judge(c.judge)
    dialogues = ctx.limit(load_dialogues(c.data, c.cases, ctx.problems))
    replaced: dict[str, list[str]] = {}
    if c.model or c.generations:
        prompts = [(d, doctor_prompts(d, c.system_prompt)) for d in dialogues]
        ids = [i for _, ps in prompts for i, _ in ps]
        outs = ctx.answers(ids, [chat for _, ps in prompts for _, chat in ps])
        for d, ps in prompts:
            if all(i in outs for i, _ in ps):
                replaced[d.id] = [outs[i] for i, _ in ps]
        dialogues = [d for d in dialogues if d.id in replaced]
    else:
        ctx.sources["model"] = {"recorded_dialogues": c.data}
    verdicts = parallel_map(
        lambda d: judge.consultation(d, replaced.get(d.id)), dialogues, c.judge.concurrency, "judge"
    )
    records = []
    for d, v in zip(dialogues, verdicts):
        records.append(
            {
                "id": d.id,
                "source": d.source,
                "row": d.row,
                "case": d.case,
                "turns": [list(t) for t in d.turns],
                "doctor_turns": replaced.get(d.id),
                **v,
            }
        )
    scored = [r["scores"] for r in records if r["scores"]]
    means = {k: mean([s[k] for s in scored]) for k in CONSULTATION_CRITERIA}
    result = ctx.header(len(scored), judge=judge.info(), cases=c.cases)
    result.update(
        **means,
        average=mean(list(means.values())) if scored else 0.0,
        n_malformed=len(records) - len(scored),
        records=records,
    )
    name = ctx.side_name("")
    heads = [zh for zh, _ in CONSULTATION_CRITERIA.values()]
    md = "\n".join(
        [
            f"## Consultation quality: {result['dataset']}",
            "",
            md_table(
                ["模型", *heads, "平均"],
                [
                    [
                        name,
                        *(f"{means[k]:.2f}" for k in CONSULTATION_CRITERIA),
                        f"{result['average']:.2f}",
                    ]
                ],
            ),
            "",
            f"Judge scores 1–5, mean of {result['n']} dialogues (malformed judge replies: "
            f"{result['n_malformed']}); judge: {c.judge.model}.",
        ]
    )

    def chart(path: Path) -> None:
        chart_bars(
            path,
            [*CONSULTATION_CRITERIA, "average"],
            [*means.values(), result["average"]],
            f"{name}: consultation",
            "score (1-5)",
            top=5,
        )

    return TaskResult(result, md, chart)
