"""Exam multiple choice (SFMed 选择题 table; DISC's MLEC-QA / 考研306): accuracy per file,
subject, exam/question type and overall; multi-answer questions need an exact set match.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

from sfmed.eval.backends import Chat
from sfmed.eval.extract import extract_choice
from sfmed.eval.items import MCQItem
from sfmed.eval.loaders import detect_mcq_format, load_mcq
from sfmed.eval.prompts import MCQPrompt, candidates, mcq_prompt, resolve_prompt
from sfmed.eval.report import chart_bars, md_table, pct
from sfmed.eval.tasks.common import RunContext, TaskResult, accuracy_table

logger = logging.getLogger(__name__)


def _shot_pool(ctx: RunContext, items: list[MCQItem], fmt: str) -> dict[str, list[MCQItem]]:
    """Dev-split questions by subject, in file order (checked: enough for every subject)."""
    cfg = ctx.cfg.mcq
    if cfg.shots == 0:
        return {}
    pool: dict[str, list[MCQItem]] = defaultdict(list)
    for it in load_mcq(cfg.dev_data, fmt, ctx.problems):
        pool[it.subject].append(it)
    for subject in sorted({it.subject for it in items}):
        have = len(pool.get(subject, []))
        if have < cfg.shots:
            ctx.problems.report(
                f"mcq.dev_data={cfg.dev_data} has {have} example(s) for subject {subject!r}, "
                f"fewer than mcq.shots={cfg.shots}"
            )
    return pool


def shots_for(item: MCQItem, pool: dict[str, list[MCQItem]], k: int) -> list[MCQItem]:
    """The first ``k`` dev questions of the item's subject, never the question itself."""
    same = [s for s in pool.get(item.subject, []) if s.question != item.question]
    return same[:k]


def build_prompts(ctx: RunContext) -> tuple[list[MCQItem], list[Chat], str, MCQPrompt]:
    """Items, their chats, the resolved data format and prompt of an mcq run (no model)."""
    c = ctx.cfg
    fmt = detect_mcq_format(c.data) if c.format == "auto" else c.format
    prompt = resolve_prompt(c.mcq.prompt, fmt)
    items = ctx.limit(load_mcq(c.data, fmt, ctx.problems))
    pool = _shot_pool(ctx, items, fmt)
    chats = [
        mcq_prompt(it, shots_for(it, pool, c.mcq.shots), prompt, c.system_prompt) for it in items
    ]
    return items, chats, fmt, prompt


def run_mcq(ctx: RunContext) -> TaskResult:
    """Load, prompt, answer (generate + extract, or log-likelihood), score and tabulate."""
    c = ctx.cfg
    items, chats, fmt, prompt = build_prompts(ctx)
    ids = [it.id for it in items]
    records = []
    if c.mcq.mode == "generate":
        outs = ctx.answers(ids, chats)
        for it, chat in zip(items, chats):
            if it.id not in outs:
                continue
            ex = extract_choice(outs[it.id], it.options, multi=it.multi)
            records.append(_record(it, chat, outs[it.id], ex.letters, ex.rule))
    else:
        backend = ctx.backend("", scoring=True)
        cands = [candidates(it, prompt) for it in items]
        reqs = [(chat, cont) for chat, cs in zip(chats, cands) for _, cont in cs]
        scores = iter(_scores(backend, reqs, prompt.scoring))
        ctx.sources["model"] = backend.info()
        for it, chat, cs in zip(items, chats, cands):
            lp = {letters: next(scores) for letters, _ in cs}
            best = max(lp, key=lambda k: (lp[k], -len(k)))
            r = _record(it, chat, best, tuple(best), "loglik")
            r["logprobs"] = lp
            r["continuations"] = dict(cs)
            records.append(r)
    n = len(records)
    correct = sum(r["score"] for r in records)
    by_group: dict[str, dict] = {}
    for key in sorted({k for r in records for k in r["groups"]}):
        by_group[key] = accuracy_table(records, lambda r, k=key: r["groups"].get(k))
    result = ctx.header(
        n,
        mode=c.mcq.mode,
        shots=c.mcq.shots,
        dev_data=c.mcq.dev_data,
        resolved_format=fmt,
        prompt=prompt.settings(),
    )
    result.update(
        accuracy=correct / n if n else 0.0,
        correct=correct,
        n_unparsed=sum(r["extracted"] is None for r in records),
        by_file=accuracy_table(records, lambda r: Path(r["source"]).name),
        by_subject=accuracy_table(records, lambda r: r["subject"]),
        by_group=by_group,
        records=records,
    )
    return TaskResult(result, _markdown(ctx, result), _chart(result))


def _scores(backend, reqs: list, scoring: str) -> list[float]:
    """One score per (chat, continuation), higher is better.

    ``continuation``: log P(continuation | prompt). ``sequence``: OpenCompass's PPLInferencer
    (HuggingFaceBaseModel.get_ppl): minus the summed NLL of every token after the first of the
    whole prompt + continuation text, divided by its token count (the first token included).
    """
    if scoring == "continuation":
        return backend.loglikelihood(reqs)
    return [lp / n for lp, n in backend.sequence_logprob(reqs)]


def _record(it: MCQItem, chat: Chat, output: str, letters, rule: str) -> dict:
    return {
        "id": it.id,
        "source": it.source,
        "row": it.row,
        "subject": it.subject,
        "groups": it.groups,
        "prompt": chat,
        "output": output,
        "extracted": list(letters) if letters else None,
        "rule": rule,
        "answer": list(it.answer),
        "score": int(letters is not None and set(letters) == set(it.answer)),
    }


def _markdown(ctx: RunContext, r: dict) -> str:
    name = ctx.side_name("")
    shots = f"{r['settings']['shots']}-shot"
    parts = [
        f"## Exam multiple choice: {r['dataset']} ({r['settings']['mode']}, {shots})",
        "",
        md_table(["模型", r["dataset"]], [[name, pct(r["accuracy"])]]),
        "",
        f"Accuracy in %. n = {r['n']}, unparsed answers = {r['n_unparsed']}, "
        f"skipped rows = {r['n_skipped']}.",
    ]
    for title, table in [("file", r["by_file"]), ("subject", r["by_subject"])] + [
        (f"{k}", v) for k, v in r["by_group"].items()
    ]:
        if len(table) > 1:
            rows = [[k, v["n"], pct(v["accuracy"])] for k, v in table.items()]
            parts += ["", f"### By {title}", "", md_table([title, "n", "accuracy"], rows)]
    return "\n".join(parts)


def _chart(r: dict):
    table = r["by_subject"]
    if len(table) < 2:
        return None

    def draw(path: Path) -> None:
        labels = list(table)
        chart_bars(
            path,
            labels,
            [100 * table[k]["accuracy"] for k in labels],
            f"{r['dataset']}: accuracy by subject",
            "accuracy (%)",
            top=100,
        )

    return draw
