"""Drug-indication hit rates (QiZhenGPT table): ask ``{drug}的适应病症`` and count labelled
indications found in the answer; criteria 1/2/3 = at least one / half / two thirds of them.
"""

from __future__ import annotations

from pathlib import Path

from sfmed.eval.backends import Chat
from sfmed.eval.items import DrugItem
from sfmed.eval.loaders import load_drugs
from sfmed.eval.metrics import indication_hits
from sfmed.eval.report import chart_bars, md_table, pct
from sfmed.eval.tasks.common import RunContext, TaskResult, mean


def build_prompts(ctx: RunContext) -> tuple[list[DrugItem], list[Chat]]:
    """The drugs and the question asked about each (``drug.prompt``)."""
    c = ctx.cfg
    items = ctx.limit(load_drugs(c.data, ctx.problems, sep=c.drug.label_sep))
    sys = [{"role": "system", "content": c.system_prompt}] if c.system_prompt else []
    chats = [
        [*sys, {"role": "user", "content": c.drug.prompt.format(drug=it.drug)}] for it in items
    ]
    return items, chats


def run_drug_indication(ctx: RunContext) -> TaskResult:
    """Prompt per drug, answers, hits per answer and the three criterion rates."""
    c = ctx.cfg
    items, chats = build_prompts(ctx)
    outs = ctx.answers([it.id for it in items], chats)
    records = []
    for it, chat in zip(items, chats):
        if it.id not in outs:
            continue
        h = indication_hits(outs[it.id], it.indications)
        records.append(
            {
                "id": it.id,
                "source": it.source,
                "row": it.row,
                "drug": it.drug,
                "indications": it.indications,
                "prompt": chat,
                "output": outs[it.id],
                **h,
            }
        )
    rates = {k: mean([float(r[k]) for r in records]) for k in ("c1", "c2", "c3")}
    result = ctx.header(len(records), prompt=c.drug.prompt, label_sep=c.drug.label_sep)
    result.update(
        criterion1=rates["c1"],
        criterion2=rates["c2"],
        criterion3=rates["c3"],
        mean_hit_fraction=mean([r["hits"] / r["n_labels"] for r in records]),
        records=records,
    )
    name = ctx.side_name("")
    md = "\n".join(
        [
            f"## Drug indications: {result['dataset']}",
            "",
            md_table(
                ["模型", "标准1 (≥1)", "标准2 (≥1/2)", "标准3 (≥2/3)"],
                [[name, pct(rates["c1"]), pct(rates["c2"]), pct(rates["c3"])]],
            ),
            "",
            f"Hit rates in % of {result['n']} drugs; a labelled indication is a hit when it "
            "appears in the answer (whitespace and case ignored).",
        ]
    )

    def chart(path: Path) -> None:
        chart_bars(
            path,
            ["criterion 1", "criterion 2", "criterion 3"],
            [100 * rates[k] for k in ("c1", "c2", "c3")],
            f"{name}: drug indications",
            "hit rate (%)",
            top=100,
        )

    return TaskResult(result, md, chart)
