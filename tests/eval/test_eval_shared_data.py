"""Loaders on the real files in ../shared/data (skipped when absent)."""

from __future__ import annotations

import pytest

from sfmed.eval.loaders import load_dialogues, load_mcq, load_qa

pytestmark = pytest.mark.shared


def _need(p):
    if not p.exists():
        pytest.skip(f"{p} not present")
    return p


def test_real_cmmlu_dev(shared_dir):
    items = load_mcq(_need(shared_dir / "data" / "CMMLU" / "dev"), "auto")
    assert len(items) == 50 and len({it.subject for it in items}) == 10
    assert all(len(it.answer) == 1 and set(it.options) == set("ABCD") for it in items)
    assert items[0].id == "anatomy/0" and items[0].question == "壁胸膜的分部不包括"


def test_real_huatuo26m_test(shared_dir):
    items = load_qa(_need(shared_dir / "data" / "huatuo26M_test" / "huatuo26M_test.json"), "auto")
    assert len(items) == 6000 and items[0].id == "0" and items[-1].id == "5999"
    assert all(it.question and it.reference and not it.history for it in items[:100])


def test_real_disc_cmb_clin_dialogues(shared_dir):
    base = shared_dir / "data" / "DISC-MedLLM"
    dlg = load_dialogues(
        _need(base / "dialogues" / "DISC-MedLLM_cmb-clin.json"),
        _need(base / "samples" / "CMB-cases.json"),
    )
    assert dlg and all(d.case for d in dlg)
    assert dlg[0].turns[0][0] == "patient" and any(r == "doctor" for r, _ in dlg[0].turns)
