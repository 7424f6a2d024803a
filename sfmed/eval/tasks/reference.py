"""Reference metrics (ChiMed-GPT tables): BLEU-1/2 and ROUGE-1/2/L F1 against the reference."""

from __future__ import annotations

from pathlib import Path

from sfmed.eval.loaders import detect_qa_format, load_qa
from sfmed.eval.metrics import (
    corpus_bleu,
    rouge_l,
    rouge_n,
    sentence_bleu,
    tokenize,
)
from sfmed.eval.report import chart_bars, md_table, pct
from sfmed.eval.tasks.common import RunContext, TaskResult, mean

METRICS = ("bleu1", "bleu2", "rouge1", "rouge2", "rougeL")
_LABELS = {
    "bleu1": "BLEU-1",
    "bleu2": "BLEU-2",
    "rouge1": "ROUGE-1",
    "rouge2": "ROUGE-2",
    "rougeL": "ROUGE-L",
}


def run_reference_metrics(ctx: RunContext) -> TaskResult:
    """Score one model's answers against the references (QA or every multi-turn assistant turn)."""
    c = ctx.cfg
    fmt = detect_qa_format(c.data) if c.format == "auto" else c.format
    items = ctx.limit(load_qa(c.data, fmt, ctx.problems))
    ids = [it.id for it in items]
    outs = ctx.answers(ids, [it.messages(c.system_prompt) for it in items])
    items = [it for it in items if it.id in outs]
    tk = c.metric.tokenizer
    hyps = [tokenize(outs[it.id], tk) for it in items]
    refs = [tokenize(it.reference, tk) for it in items]
    records = []
    for it, h, r in zip(items, hyps, refs):
        records.append(
            {
                "id": it.id,
                "source": it.source,
                "row": it.row,
                "question": it.question,
                "reference": it.reference,
                "output": outs[it.id],
                "bleu1": sentence_bleu(h, r, 1),
                "bleu2": sentence_bleu(h, r, 2),
                "rouge1": rouge_n(h, r, 1).f,
                "rouge2": rouge_n(h, r, 2).f,
                "rougeL": rouge_l(h, r).f,
            }
        )
    scores = {m: mean([rec[m] for rec in records]) for m in METRICS}
    if c.metric.bleu_level == "corpus":
        scores["bleu1"] = corpus_bleu(hyps, refs, 1)
        scores["bleu2"] = corpus_bleu(hyps, refs, 2)
    result = ctx.header(
        len(records),
        resolved_format=fmt,
        tokenizer=tk,
        bleu_level=c.metric.bleu_level,
        rouge="F1, mean over items",
    )
    result.update(scores, records=records)
    name = ctx.side_name("")
    md = "\n".join(
        [
            f"## Reference metrics: {result['dataset']}",
            "",
            md_table(
                ["模型", *(_LABELS[m] for m in METRICS)],
                [[name, *(pct(scores[m]) for m in METRICS)]],
            ),
            "",
            f"Scores in %, n = {result['n']}. Tokenisation: {tk} "
            f"({'every non-space character a token' if tk == 'char' else 'jieba words'}); "
            f"BLEU-n = {c.metric.bleu_level}-level BLEU with n-grams up to n (brevity penalty, "
            "sacrebleu exp smoothing); ROUGE = F1 averaged over items.",
        ]
    )

    def chart(path: Path) -> None:
        chart_bars(
            path,
            [_LABELS[m] for m in METRICS],
            [100 * scores[m] for m in METRICS],
            f"{name} on {result['dataset']}",
            "score (%)",
        )

    return TaskResult(result, md, chart)
