"""A suite: several models × several data sets → the seed reports' tables in one command.

``launch/evaluate.py suite=<name>`` (``conf/eval/suite/<name>.yaml``) runs three phases:

1. **generate** what is missing: per (model, data set) one answers file
   ``generations/<model>/<data set>.jsonl``, written atomically when the pair is complete; a
   re-run generates only the ids missing from it (none when nothing changed). Each model answers
   in its own chat format; one engine is loaded at a time. Progress bar with ETA over all items.
2. **score** with the single-run tasks (``rouge_pairwise``, ``judge_pairwise``, ``mcq``,
   ``consultation``, ``drug_indication``) on those files; each result goes to
   ``results/<data set>/<task>[_<model>].json`` (+ ``.md``/``.png``) and is reused while its
   inputs (answers files, settings) are unchanged, so judge calls are not repeated.
3. **report**: ``report.md`` (the seed tables), ``report.json`` (every number with its
   provenance) and ``charts/*.png``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, replace
from pathlib import Path

from tqdm.auto import tqdm

import sfmed
from sfmed.config.eval import EvalConfig, SuiteDataset, SuiteModel
from sfmed.core.atomic import atomic_write_text
from sfmed.eval.backends import BackendPool, BackendSpec, Chat
from sfmed.eval.generations import read_all_generations, write_generations
from sfmed.eval.items import Problems
from sfmed.eval.judge import CONSULTATION_CRITERIA
from sfmed.eval.report import chart_grouped_bars, chart_win_tie_lose, md_table, pct, write_outputs
from sfmed.eval.tasks import TASK_FNS
from sfmed.eval.tasks.common import RunContext
from sfmed.eval.tasks.consultation import doctor_prompts

logger = logging.getLogger(__name__)

# The single-run task that generates / scores each data-set kind.
_GEN_TASK = {
    "qa": "rouge_pairwise",
    "mcq": "mcq",
    "consultation": "consultation",
    "drug": "drug_indication",
}
CMB_CLIN_HEADS = tuple(zh for zh, _ in CONSULTATION_CRITERIA.values())


def _file_sha(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


class Suite:
    """One suite run (see the module docstring)."""

    def __init__(self, cfg: EvalConfig):
        assert cfg.suite is not None
        self.cfg, self.s = cfg, cfg.suite
        self.out = Path(cfg.output_dir)
        self.problems = Problems(strict=cfg.strict)
        self.generated: dict[str, int] = {}  # "<model>/<dataset>" -> items generated this run

    # -- per data set: the single-run config, its items and prompts -------------------------

    def task_cfg(self, d: SuiteDataset, task: str | None = None, **kw) -> EvalConfig:
        """The single-run config of data set ``d`` (answers given as files in ``kw``)."""
        fields = {
            "suite": None,
            "task": task or _GEN_TASK[d.kind],
            "data": d.data,
            "format": d.format,
            "dataset_name": d.name,
            "cases": d.cases,
            "limit": d.limit if d.limit is not None else self.cfg.limit,
            "model": None,
            "model_b": None,
            "generations": None,
            "generations_a": None,
            "generations_b": None,
            "name_a": None,
            "name_b": None,
            "output_dir": str(self.out),
            "overwrite": True,
        }
        return replace(self.cfg, **{**fields, **kw})

    def requests(self, d: SuiteDataset) -> tuple[list[str], list[Chat]]:
        """Item ids and the chats every model answers for data set ``d``."""
        from sfmed.eval.tasks import drug, mcq, pairwise

        ctx = RunContext(cfg=self._prompt_cfg(d), problems=self.problems, out_dir=self.out)
        if d.kind == "mcq":
            items, chats, _, _ = mcq.build_prompts(ctx)
        elif d.kind == "drug":
            items, chats = drug.build_prompts(ctx)
        elif d.kind == "qa":
            items, chats, _ = pairwise.build_prompts(ctx)
        else:
            from sfmed.eval.loaders import load_dialogues

            dialogues = ctx.limit(load_dialogues(d.data, d.cases, self.problems))
            pairs = [p for dl in dialogues for p in doctor_prompts(dl, self.cfg.system_prompt)]
            return [i for i, _ in pairs], [chat for _, chat in pairs]
        return [it.id for it in items], chats

    def _prompt_cfg(self, d: SuiteDataset) -> EvalConfig:
        # a config that passes validation without answers: only its data settings are read
        if d.kind == "qa":
            return self.task_cfg(d, generations_a="-", generations_b="-")
        return self.task_cfg(d, generations="-")

    def gen_path(self, m: SuiteModel, d: SuiteDataset) -> Path:
        """The answers file of model ``m`` on data set ``d``."""
        if d.name in m.generations:
            return Path(m.generations[d.name])
        return self.out / "generations" / m.name / f"{d.name}.jsonl"

    # -- phase 1: generate ------------------------------------------------------------------

    def _spec(self, m: SuiteModel) -> BackendSpec:
        return BackendSpec(
            backend=m.backend, model=m.model, tokenizer=m.tokenizer, chat_format=m.chat_format
        )

    def generate(self) -> None:
        """Answer every (model, data set) item that has no answer on disk yet."""
        todo = []
        for d in self.s.datasets:
            ids, chats = self.requests(d)
            for m in self.s.models:
                if d.name in m.generations:
                    continue  # answers made elsewhere
                path = self.gen_path(m, d)
                have = _existing(path)
                missing = [k for k, i in enumerate(ids) if i not in have]
                if missing:
                    todo.append((m, d, path, ids, chats, have, missing))
        total = sum(len(t[-1]) for t in todo)
        if not total:
            logger.info("suite: every answer is already on disk; nothing to generate")
            return
        pool = None
        bar = tqdm(total=total, desc="suite: generate", unit="item")
        try:
            for m in self.s.models:  # model-major: each engine is loaded once
                mine = [t for t in todo if t[0] is m]
                if not mine:
                    continue
                pool = pool or BackendPool(self._model_cfg(m))
                pool.cfg = self._model_cfg(m)
                backend = pool.get(self._spec(m))
                for _, d, path, ids, chats, have, missing in mine:
                    bar.set_postfix_str(f"{m.name} on {d.name}")
                    outs = backend.generate(
                        [chats[k] for k in missing], self.cfg.decoding, desc=f"{m.name}/{d.name}"
                    )
                    have.update({ids[k]: o for k, o in zip(missing, outs)})
                    # rewritten whole and atomically: a crash leaves the previous complete file
                    write_generations(
                        path, [i for i in ids if i in have], [have[i] for i in ids if i in have]
                    )
                    self.generated[f"{m.name}/{d.name}"] = len(missing)
                    self._write_source(m, d, backend.info())
                    bar.update(len(missing))
        finally:
            bar.close()
            if pool is not None:
                pool.close()

    def _model_cfg(self, m: SuiteModel) -> EvalConfig:
        api = replace(self.cfg.api, base_url=m.base_url or self.cfg.api.base_url)
        # only the engine settings (hf, vllm, api, decoding seed) of this config are used
        return replace(
            self.cfg,
            suite=None,
            task="reference_metrics",
            data="-",
            generations="-",
            model=None,
            model_b=None,
            generations_a=None,
            generations_b=None,
            api=api,
        )

    def _write_source(self, m: SuiteModel, d: SuiteDataset, info: dict) -> None:
        src = {
            "model": m.name,
            "dataset": d.name,
            "backend": info,
            "decoding": asdict(self.cfg.decoding),
            "system_prompt": self.cfg.system_prompt,
            "sfmed_version": sfmed.__version__,
        }
        path = self.gen_path(m, d).with_suffix(".source.json")
        atomic_write_text(path, json.dumps(src, ensure_ascii=False, indent=1) + "\n")

    def provenance(self, m: SuiteModel, d: SuiteDataset) -> dict:
        """Where model ``m``'s answers on ``d`` came from."""
        path = self.gen_path(m, d)
        if d.name in m.generations:
            return {"generations": str(path), "sha256_16": _file_sha(path), "made": "elsewhere"}
        src = path.with_suffix(".source.json")
        info = json.loads(src.read_text("utf-8")) if src.is_file() else {}
        return {"generations": str(path), "sha256_16": _file_sha(path), **info}

    # -- phase 2: score ---------------------------------------------------------------------

    def score(self, d: SuiteDataset, task: str, label: str, **answers) -> dict:
        """Run ``task`` on ``d`` with answers files ``answers``; reuse a result whose inputs
        (answers files' hashes, settings) are unchanged."""
        tcfg = self.task_cfg(d, task=task, **answers)
        files = {k: v for k, v in answers.items() if k.startswith("generations") and v}
        key = {
            "task": task,
            "dataset": asdict(d),
            "answers": {k: _file_sha(v) for k, v in files.items()},
            "names": {k: v for k, v in answers.items() if k.startswith("name")},
            "settings": {
                k: asdict(getattr(self.cfg, k)) for k in ("mcq", "metric", "drug", "judge")
            },
            "strict": self.cfg.strict,
            "system_prompt": self.cfg.system_prompt,
            "sfmed_version": sfmed.__version__,
        }
        key_hash = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        out_dir = self.out / "results" / d.name
        stem = f"{task}_{label}"
        res_path = out_dir / f"{stem}.json"
        if res_path.is_file():
            old = json.loads(res_path.read_text("utf-8"))
            if old.get("suite_inputs") == key_hash:
                return old
        ctx = RunContext(cfg=tcfg, problems=Problems(strict=self.cfg.strict), out_dir=out_dir)
        tr = TASK_FNS[task](ctx)
        tr.result["suite_inputs"] = key_hash
        # no per-result chart: the report draws one chart per comparison / benchmark
        write_outputs(out_dir, stem, tr.result, tr.markdown, None)
        return tr.result

    # -- phase 3: tables ----------------------------------------------------------------------

    def run(self) -> dict:
        """Generate, score, and write ``report.md``, ``report.json`` and ``charts/``."""
        self.generate()
        ours = next(m for m in self.s.models if m.name == self.s.ours_name)
        peers = [m for m in self.s.models if m is not ours]
        by_kind = {k: [d for d in self.s.datasets if d.kind == k] for k in _GEN_TASK}
        report = {
            "suite": self.s.name,
            "ours": ours.name,
            "models": [m.name for m in self.s.models],
            "sfmed_version": sfmed.__version__,
            "decoding": asdict(self.cfg.decoding),
            "mcq_prompt": asdict(self.cfg.mcq.prompt),
            "generated_this_run": self.generated,
            "answers": {
                m.name: {d.name: self.provenance(m, d) for d in self.s.datasets}
                for m in self.s.models
            },
            "tables": {},
        }
        md = [f"# {self.s.name}", ""]
        charts = self.out / "charts"
        draw: list = []  # chart calls, made only when the numbers changed (rendering is slow)
        if by_kind["qa"] and peers:
            tables = [("qa_rouge", "rouge_pairwise", "QA-Rouge")]
            if self.s.judge_qa:
                tables.append(("qa_gpt", "judge_pairwise", "QA-GPT"))
            for key, task, title in tables:
                t = self._qa_table(by_kind["qa"], ours, peers, task)
                report["tables"][key] = t
                md += [f"## {title}", "", t["markdown"], "", t["note"], ""]
                for peer in peers:
                    rows = [(r["row"], *r["cells"][peer.name]["wtl"]) for r in t["rows"]]
                    draw.append(
                        (
                            chart_win_tie_lose,
                            charts / f"{key}_{ours.name}_vs_{peer.name}.png",
                            rows,
                            f"{title}: {ours.name} vs {peer.name}",
                        )
                    )
        if by_kind["mcq"]:
            t = self._mcq_table(by_kind["mcq"])
            report["tables"]["mcq"] = t
            md += ["## 选择题 (accuracy %)", "", t["markdown"], "", t["note"], ""]
            draw.append(
                (
                    chart_grouped_bars,
                    charts / "mcq_accuracy.png",
                    [r["row"] for r in t["rows"]],
                    {m: [100 * r["cells"][m]["accuracy"] for r in t["rows"]] for m in t["columns"]},
                    "accuracy by benchmark",
                    "accuracy (%)",
                    100,
                )
            )
        for d in by_kind["consultation"]:
            t = self._per_model_table(d, "consultation")
            report["tables"][f"cmb_clin/{d.name}"] = t
            md += [f"## CMB-Clin: {d.name}", "", t["markdown"], "", t["note"], ""]
            draw.append(
                (
                    chart_grouped_bars,
                    charts / f"cmb_clin_{d.name}.png",
                    list(CMB_CLIN_HEADS),
                    {r["row"]: r["values"] for r in t["rows"]},
                    f"CMB-Clin: {d.name}",
                    "score (1-5)",
                    5,
                )
            )
        for d in by_kind["drug"]:
            t = self._per_model_table(d, "drug_indication")
            report["tables"][f"drug/{d.name}"] = t
            md += [f"## 药品适应症: {d.name} (hit rate %)", "", t["markdown"], "", t["note"], ""]
            draw.append(
                (
                    chart_grouped_bars,
                    charts / f"drug_{d.name}.png",
                    ["标准1", "标准2", "标准3"],
                    {r["row"]: [100 * v for v in r["values"]] for r in t["rows"]},
                    f"drug indications: {d.name}",
                    "hit rate (%)",
                    100,
                )
            )
        self.out.mkdir(parents=True, exist_ok=True)
        report["skipped"] = list(self.problems.messages)
        report["charts"] = sorted(str(c[1].relative_to(self.out)) for c in draw)
        text = json.dumps(report, ensure_ascii=False, indent=1) + "\n"
        unchanged = _same_numbers(self.out / "report.json", report)
        if not (unchanged and all(c[1].is_file() for c in draw)):
            for fn, path, *args in draw:
                fn(path, *args)
        atomic_write_text(self.out / "report.md", "\n".join(md).rstrip() + "\n")
        atomic_write_text(self.out / "report.json", text)  # last: a complete report
        report["paths"] = {
            "markdown": str(self.out / "report.md"),
            "json": str(self.out / "report.json"),
            "charts": str(charts),
        }
        return report

    def _qa_table(self, datasets, ours: SuiteModel, peers, task: str) -> dict:
        """Rows = data sets (+ a pooled row after each group), columns = ours vs each peer."""
        rows, pooled = [], {}
        for i, d in enumerate(datasets):
            cells = {}
            for p in peers:
                r = self.score(
                    d,
                    task,
                    f"{ours.name}_vs_{p.name}",
                    generations_a=str(self.gen_path(ours, d)),
                    generations_b=str(self.gen_path(p, d)),
                    name_a=ours.name,
                    name_b=p.name,
                )
                outcomes = [rec["outcome"] for rec in r["records"]]
                cells[p.name] = _wtl_cell(outcomes, r)
                if d.group:
                    pooled.setdefault(d.group, {}).setdefault(p.name, []).extend(outcomes)
            rows.append({"row": d.name, "group": d.group, "cells": cells})
            nxt = datasets[i + 1].group if i + 1 < len(datasets) else None
            if d.group and nxt != d.group:
                cells = {p.name: _wtl_cell(pooled[d.group][p.name]) for p in peers}
                rows.append(
                    {"row": self.s.all_row, "group": d.group, "pooled": True, "cells": cells}
                )
        heads = ["数据集", *(f"{ours.name} vs {p.name}" for p in peers)]
        body = []
        for r in rows:
            line = [r["row"]]
            for p in peers:
                w, t, lo = r["cells"][p.name]["wtl"]
                cell = "/".join(str(round(x, 4)) for x in (w, t, lo))
                line.append(f"**{cell}**" if w > lo else cell)  # bold where ours wins
            body.append(line)
        metric = "ROUGE-L F1" if task == "rouge_pairwise" else f"LLM judge ({self.cfg.judge.model})"
        note = (
            f"Cells: win/tie/lose of {ours.name} (fractions of the items); bold where "
            f"{ours.name} wins more than it loses. Per item: {metric}"
            + (
                f", tokenizer {self.cfg.metric.tokenizer}, epsilon {self.cfg.metric.epsilon}"
                if task == "rouge_pairwise"
                else ", both answer orders"
            )
            + f". '{self.s.all_row}' pools the items of the rows above it in its group."
        )
        return {
            "columns": [p.name for p in peers],
            "rows": rows,
            "markdown": md_table(heads, body),
            "note": note,
        }

    def _mcq_table(self, datasets) -> dict:
        """Rows = All then each benchmark, columns = models; accuracy in %."""
        names = [m.name for m in self.s.models]
        rows = []
        pooled = {m: [0, 0] for m in names}
        for d in datasets:
            cells = {}
            for m in self.s.models:
                r = self.score(
                    d, "mcq", m.name, generations=str(self.gen_path(m, d)), name_a=m.name
                )
                cells[m.name] = {
                    "accuracy": r["accuracy"],
                    "correct": r["correct"],
                    "n": r["n"],
                    "n_unparsed": r["n_unparsed"],
                    "result": str(self.out / "results" / d.name / f"mcq_{m.name}.json"),
                    "answers": self.provenance(m, d),
                }
                pooled[m.name][0] += r["correct"]
                pooled[m.name][1] += r["n"]
            rows.append({"row": d.name, "cells": cells})
        all_row = {
            "row": self.s.all_row,
            "pooled": True,
            "cells": {
                m: {"accuracy": c / n if n else 0.0, "correct": c, "n": n}
                for m, (c, n) in pooled.items()
            },
        }
        rows.insert(0, all_row)
        body = []
        for r in rows:
            accs = [r["cells"][m]["accuracy"] for m in names]
            body.append([r["row"], *_bold_best(accs, pct)])
        note = (
            "Accuracy in %; bold = best in the row. "
            f"'{self.s.all_row}' = all questions of the benchmarks below pooled (correct / n). "
            f"Prompt preset {self.cfg.mcq.prompt.preset}, {self.cfg.mcq.shots}-shot, answers "
            "extracted from generated text."
        )
        return {
            "columns": names,
            "rows": rows,
            "markdown": md_table(["数据集", *names], body),
            "note": note,
        }

    def _per_model_table(self, d: SuiteDataset, task: str) -> dict:
        """Rows = models; CMB-Clin's four judge criteria or the drug table's three criteria."""
        rows = []
        for m in self.s.models:
            r = self.score(d, task, m.name, generations=str(self.gen_path(m, d)), name_a=m.name)
            if task == "consultation":
                values = [r[k] for k in CONSULTATION_CRITERIA]
            else:
                values = [r["criterion1"], r["criterion2"], r["criterion3"]]
            rows.append(
                {"row": m.name, "values": values, "n": r["n"], "answers": self.provenance(m, d)}
            )
        fmt = (lambda v: f"{v:.2f}") if task == "consultation" else pct
        cols = [
            _bold_best([r["values"][k] for r in rows], fmt) for k in range(len(rows[0]["values"]))
        ]
        body = [[r["row"], *(col[i] for col in cols)] for i, r in enumerate(rows)]
        if task == "consultation":
            heads = ["模型", *CMB_CLIN_HEADS]
            note = (
                f"LLM judge ({self.cfg.judge.model}) scores 1–5, mean over dialogues; bold = best."
            )
        else:
            heads = ["模型", "标准1", "标准2", "标准3"]
            note = (
                "Hit rates in %: criterion 1 = at least one labelled indication in the answer, "
                "2 = at least half, 3 = at least two thirds; bold = best."
            )
        return {"rows": rows, "markdown": md_table(heads, body), "note": note}


def _same_numbers(path: Path, report: dict) -> bool:
    """True when ``path`` holds a report with the same tables (so its charts are current)."""
    if not path.is_file():
        return False
    try:
        old = json.loads(path.read_text("utf-8"))
    except json.JSONDecodeError:
        return False
    return old.get("tables") == json.loads(json.dumps(report["tables"]))


def _bold_best(values: list[float], fmt) -> list[str]:
    """Formatted values, the best in bold (none when all are equal)."""
    best = max(values)
    tie = all(v == best for v in values)
    return [f"**{fmt(v)}**" if v == best and not tie else fmt(v) for v in values]


def _existing(path: Path) -> dict[str, str]:
    """Answers already on disk (none when the file does not exist)."""
    if not path.is_file():
        return {}
    return read_all_generations(path)


def _wtl_cell(outcomes: list[str], result: dict | None = None) -> dict:
    n = len(outcomes)
    w, t, lo = (outcomes.count(k) / n if n else 0.0 for k in ("win", "tie", "lose"))
    cell = {"wtl": [w, t, lo], "n": n}
    if result is not None:
        cell["mean_rouge_l"] = [result.get("mean_rouge_l_a"), result.get("mean_rouge_l_b")]
        cell["result"] = result.get("task")
    return cell


def run_suite(cfg: EvalConfig) -> dict:
    """Run the suite of ``cfg`` (see the module docstring); returns the report object."""
    return Suite(cfg).run()
