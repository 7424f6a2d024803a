"""The ``lm_eval`` preset against lm-evaluation-harness itself (a ``[test]`` dependency). lm-eval's own ``cmmlu_anatomy`` task (its YAML included as shipped, only the data
pointed at a local CSV) runs on a tiny model; sfmed with ``mcq.prompt.preset=lm_eval`` must send
the same context strings and get the same per-choice log-likelihoods."""

from __future__ import annotations

import json
from pathlib import Path

import lm_eval
import pytest
from tiny_models import tiny_chat_model_fixture  # noqa: F401 (registers the fixture)

from sfmed.config.eval import EvalConfig, HFConfig, MCQConfig, MCQPromptConfig
from sfmed.eval.runner import run_evaluation

ROWS = [
    ("壁胸膜的分部不包括 ", " 肋胸膜", "肺胸膜", "膈胸膜", "胸膜顶", "B"),
    ("属于右心房的结构是", "肉柱", "室上嵴", "乳头肌", "梳状肌", "D"),
    ("咽的分部", "咽隐窝", "口咽部", "鼻咽部", "喉咽部", "C"),
]


def _csv(path: Path, rows) -> None:
    import csv

    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["", "Question", "A", "B", "C", "D", "Answer"])
        for i, r in enumerate(rows):
            w.writerow([i, *r])


@pytest.mark.slow
def test_lm_eval_preset_matches_lm_evaluation_harness(tiny_chat_model, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    test, dev = tmp_path / "test", tmp_path / "dev"
    test.mkdir()
    dev.mkdir()
    _csv(test / "anatomy.csv", ROWS)
    _csv(dev / "anatomy.csv", [(q.replace("壁", "脏"), *rest) for q, *rest in ROWS])
    shipped = Path(lm_eval.__file__).parent / "tasks" / "cmmlu" / "cmmlu_anatomy.yaml"
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "local_cmmlu_anatomy.yaml").write_text(
        json.dumps(
            {
                "include": str(shipped),
                "task": "local_cmmlu_anatomy",
                "dataset_path": "csv",
                "dataset_name": None,
                "dataset_kwargs": {
                    "data_files": {
                        "test": str(test / "anatomy.csv"),
                        "dev": str(dev / "anatomy.csv"),
                    }
                },
            },
            ensure_ascii=False,
        ),
        "utf-8",
    )
    out = simple_evaluate(
        model="hf",
        model_args=f"pretrained={tiny_chat_model},dtype=float32",
        tasks=["local_cmmlu_anatomy"],
        num_fewshot=1,
        task_manager=TaskManager(include_path=str(tasks)),
        log_samples=True,
        batch_size=1,
        device="cpu",
    )
    samples = sorted(out["samples"]["local_cmmlu_anatomy"], key=lambda s: s["doc_id"])
    r = run_evaluation(
        EvalConfig(
            task="mcq",
            data=str(test / "anatomy.csv"),
            format="cmmlu",
            model=str(tiny_chat_model),
            output_dir=str(tmp_path / "sfmed"),
            hf=HFConfig(batch_size=4),
            mcq=MCQConfig(
                mode="loglik",
                shots=1,
                dev_data=str(dev),
                prompt=MCQPromptConfig(preset="lm_eval"),
            ),
        )
    )
    assert len(samples) == r["n"] == 3
    for s, rec in zip(samples, r["records"]):
        contexts = (
            {a[0] for a in s["arguments"].values()}
            if isinstance(s["arguments"], dict)
            else {a[0] for a in s["arguments"]}
        )
        assert contexts == {rec["prompt"][-1]["content"]}  # byte-identical context
        theirs = [float(x[0][0]) for x in s["resps"]]
        ours = [rec["logprobs"][k] for k in "ABCD"]
        assert ours == pytest.approx(theirs, abs=1e-4)
        assert rec["extracted"] == [("ABCD")[theirs.index(max(theirs))]]
