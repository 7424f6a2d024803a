"""Pairwise win/tie/lose of model A against model B on the same questions.

``rouge_pairwise`` (SFMed's QA-Rouge table): ROUGE-L F1 of each answer against the reference;
A wins when ahead by more than ``metric.epsilon``. ``judge_pairwise`` (SFMed's QA-GPT table): an
LLM judge compares the answers in both orders (see :mod:`sfmed.eval.judge`).
"""

from __future__ import annotations

from pathlib import Path

from sfmed.eval.backends import Chat
from sfmed.eval.backends.openai_api import parallel_map
from sfmed.eval.items import QAItem
from sfmed.eval.judge import Judge
from sfmed.eval.loaders import detect_qa_format, load_qa
from sfmed.eval.metrics import compare, rouge_l, tokenize, win_tie_lose
from sfmed.eval.report import chart_win_tie_lose, md_table, wtl
from sfmed.eval.tasks.common import RunContext, TaskResult, mean


def build_prompts(ctx: RunContext) -> tuple[list[QAItem], list[Chat], str]:
    """The questions (with their dialogue history as chat turns) and the resolved format."""
    c = ctx.cfg
    fmt = detect_qa_format(c.data) if c.format == "auto" else c.format
    items = ctx.limit(load_qa(c.data, fmt, ctx.problems))
    return items, [it.messages(c.system_prompt) for it in items], fmt


def _two_sides(ctx: RunContext) -> tuple[list[QAItem], dict[str, str], dict[str, str], str]:
    items, chats, fmt = build_prompts(ctx)
    ids = [it.id for it in items]
    a = ctx.answers(ids, chats, "a")
    b = ctx.answers(ids, chats, "b")
    return [it for it in items if it.id in a and it.id in b], a, b, fmt


def _base_record(it: QAItem, a: str, b: str) -> dict:
    return {
        "id": it.id,
        "source": it.source,
        "row": it.row,
        "history": [list(t) for t in it.history],
        "question": it.question,
        "reference": it.reference,
        "output_a": a,
        "output_b": b,
    }


def _finish(
    ctx: RunContext, records: list[dict], fmt: str, title: str, note: str = "", **extra
) -> TaskResult:
    stats = win_tie_lose([r["outcome"] for r in records])
    result = ctx.header(stats["n"], resolved_format=fmt, **extra.pop("settings"))
    result.update(
        name_a=ctx.side_name("a"),
        name_b=ctx.side_name("b"),
        win=stats["win"],
        tie=stats["tie"],
        lose=stats["lose"],
        **extra,
        records=records,
    )
    vs = f"{result['name_a']} vs {result['name_b']}"
    md = "\n".join(
        [
            f"## {title}: {result['dataset']}",
            "",
            md_table(
                ["数据集", f"{vs} (win/tie/lose)"],
                [[result["dataset"], wtl(result["win"], result["tie"], result["lose"])]],
            ),
            "",
            f"Fractions of {result['n']} items, from A's side ({result['name_a']}); "
            f"skipped = {result['n_skipped']}.{note}",
        ]
    )

    def chart(path: Path) -> None:
        chart_win_tie_lose(
            path,
            [(result["dataset"], result["win"], result["tie"], result["lose"])],
            f"{title}: {vs}",
        )

    return TaskResult(result, md, chart)


def run_rouge_pairwise(ctx: RunContext) -> TaskResult:
    """ROUGE-L of A and B against the reference per question; win/tie/lose fractions."""
    c = ctx.cfg
    items, a, b, fmt = _two_sides(ctx)
    records = []
    for it in items:
        ref = tokenize(it.reference, c.metric.tokenizer)
        ra = rouge_l(tokenize(a[it.id], c.metric.tokenizer), ref).f
        rb = rouge_l(tokenize(b[it.id], c.metric.tokenizer), ref).f
        rec = _base_record(it, a[it.id], b[it.id])
        rec.update(rouge_l_a=ra, rouge_l_b=rb, outcome=compare(ra, rb, c.metric.epsilon))
        records.append(rec)
    ma = mean([r["rouge_l_a"] for r in records])
    mb = mean([r["rouge_l_b"] for r in records])
    tk = c.metric.tokenizer
    note = (
        f" Mean ROUGE-L F1: {ctx.side_name('a')} {ma:.4f}, {ctx.side_name('b')} {mb:.4f}; "
        f"tokenizer: {tk} ({'every non-space character a token' if tk == 'char' else 'jieba words'})"
        f", epsilon = {c.metric.epsilon}."
    )
    return _finish(
        ctx,
        records,
        fmt,
        "QA-ROUGE",
        note,
        settings={
            "metric": "rouge_l_f1",
            "tokenizer": c.metric.tokenizer,
            "epsilon": c.metric.epsilon,
        },
        mean_rouge_l_a=ma,
        mean_rouge_l_b=mb,
    )


def run_judge_pairwise(ctx: RunContext) -> TaskResult:
    """An LLM judge's verdicts in both orders per question; win/tie/lose fractions."""
    c = ctx.cfg
    judge = Judge(c.judge)  # created first: a missing key fails before any generation
    items, a, b, fmt = _two_sides(ctx)
    verdicts = parallel_map(
        lambda it: judge.pair(it, a[it.id], b[it.id]), items, c.judge.concurrency, "judge"
    )
    records = [{**_base_record(it, a[it.id], b[it.id]), **v} for it, v in zip(items, verdicts)]
    return _finish(
        ctx,
        records,
        fmt,
        "QA-GPT",
        f" Judge: {c.judge.model}, both orders per pair.",
        settings={"judge": judge.info()},
        n_malformed=sum(r["malformed"] for r in records),
    )
