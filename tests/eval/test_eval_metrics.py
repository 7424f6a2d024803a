"""Metrics against hand-computed values, independent textbook formulas written out here, and
``rouge-chinese``; the module itself delegates to rouge-score, rapidfuzz and sacrebleu."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from sfmed.eval.metrics import (
    compare,
    corpus_bleu,
    indication_hits,
    lcs_length,
    rouge_l,
    rouge_n,
    sentence_bleu,
    tokenize,
    win_tie_lose,
)

PAIRS = [
    ("患者应低盐低脂饮食，规律服药。", "高血压患者需要低盐饮食并按时服药。"),
    ("建议做胃镜检查，明确诊断。", "建议尽快做胃镜检查以明确是否为胃炎"),
    ("多喝水，注意休息", "注意休息，多喝温水，必要时就医"),
    ("可能是感冒 fever 38.5", "考虑上呼吸道感染，体温38.5需要退烧"),
    ("完全无关的回答", "阿莫西林适用于敏感菌感染"),
]


# --- textbook formulas, written out independently of the packages sfmed delegates to ---------


def _ngrams(tokens, n):
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _prf(overlap, hyp_total, ref_total):
    p = overlap / hyp_total if hyp_total else 0.0
    r = overlap / ref_total if ref_total else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def _dp_lcs(a, b):
    m = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            m[i + 1][j + 1] = m[i][j] + 1 if x == y else max(m[i][j + 1], m[i + 1][j])
    return m[-1][-1]


def _bleu(pairs, max_n, effective_order):
    """BLEU of summed statistics, brevity penalty, mteval ``exp`` smoothing of zero-match orders."""
    correct, total, hyp_len, ref_len = [0] * max_n, [0] * max_n, 0, 0
    for h, r in pairs:
        for n in range(1, max_n + 1):
            correct[n - 1] += sum((_ngrams(h, n) & _ngrams(r, n)).values())
            total[n - 1] += len(h) - n + 1 if len(h) >= n else 0
        hyp_len, ref_len = hyp_len + len(h), ref_len + len(r)
    if not any(correct):
        return 0.0
    logs, smooth = [], 1
    for c, t in zip(correct, total):
        if t == 0:
            break
        if c == 0:
            smooth *= 2
        logs.append(math.log(c / t if c else 1 / (smooth * t)))
    if len(logs) < max_n and not effective_order:
        return 0.0  # an order without n-grams has precision 0
    bp = 1.0 if hyp_len >= ref_len else math.exp(1 - ref_len / hyp_len)
    return bp * math.exp(sum(logs) / len(logs))


# --- tests --------------------------------------------------------------------------------------


def test_tokenize_modes():
    assert tokenize("高血压 患者A1", "char") == ["高", "血", "压", "患", "者", "A", "1"]
    words = tokenize("高血压患者需要低盐饮食", "jieba")
    assert "".join(words) == "高血压患者需要低盐饮食" and len(words) < 11
    with pytest.raises(ValueError, match="tokenizer='bpe'"):
        tokenize("x", "bpe")


def test_hand_computed_values():
    # hyp 我爱北京 / ref 我爱上海: unigrams 2/4 each side; bigram 我爱 1 of 3; LCS 2
    h, r = list("我爱北京"), list("我爱上海")
    assert rouge_n(h, r, 1).f == pytest.approx(0.5)
    assert rouge_n(h, r, 2).f == pytest.approx(1 / 3)
    assert rouge_l(h, r).f == pytest.approx(0.5)
    # clipped counts: hyp 的的的 vs ref 的 → p = 1/3, r = 1
    assert rouge_n(list("的的的"), list("的"), 1).p == pytest.approx(1 / 3)
    # ROUGE-L of 甲乙丙丁 vs 甲丙乙丁: LCS 3 → p = r = f = 3/4
    got = rouge_l(list("甲乙丙丁"), list("甲丙乙丁"))
    assert (got.p, got.r, got.f) == pytest.approx((0.75,) * 3)
    # BLEU-1 of 我爱北京 vs 我爱北京天安门: p1 = 1, BP = exp(1 - 7/4)
    assert corpus_bleu([list("我爱北京")], [list("我爱北京天安门")], 1) == pytest.approx(
        math.exp(-0.75)
    )
    # BLEU-2 = sqrt(p1 p2) with p1 = 2/4, p2 = 1/3, no brevity penalty
    assert corpus_bleu([h], [r], 2) == pytest.approx((0.5 * (1 / 3)) ** 0.5)
    assert sentence_bleu(h, r, 2) == pytest.approx((0.5 * (1 / 3)) ** 0.5)
    # hyp 甲 / ref 甲乙: no bigram in hyp → corpus BLEU-2 is 0, sentence BLEU-2 stops at
    # order 1 (effective order): p1 = 1, BP = exp(1 - 2/1)
    assert corpus_bleu([["甲"]], [list("甲乙")], 2) == 0.0
    assert sentence_bleu(["甲"], list("甲乙"), 2) == pytest.approx(math.exp(-1))
    assert rouge_l([], r).f == 0.0 and rouge_n([], r, 1).f == 0.0
    assert corpus_bleu([[]], [r], 2) == 0.0 and sentence_bleu([], r, 1) == 0.0
    assert corpus_bleu([], [], 2) == 0.0


def test_bleu_exp_smoothing_hand_value():
    # hyp 甲乙丙 / ref 甲丙乙: p1 = 3/3, bigrams 0 of 2 → smoothed 1/(2*2); BLEU-2 = sqrt(1 * 1/4)
    assert corpus_bleu([list("甲乙丙")], [list("甲丙乙")], 2) == pytest.approx(0.5)
    assert sentence_bleu(list("甲乙丙"), list("甲丙乙"), 2) == pytest.approx(0.5)


def test_tokens_reach_the_packages_unchanged():
    # rouge-score's default tokenizer lowercases and drops non-[a-z0-9]; ours must not
    assert rouge_n(["A", "Ü", "，"], ["a", "Ü", "，"], 1).p == pytest.approx(2 / 3)
    assert rouge_l(["Ab", "高"], ["ab", "高"]).f == pytest.approx(0.5)
    # sacrebleu splits lines on whitespace: a token holding a space stays one token...
    assert sentence_bleu(["a b"], ["a", "b"], 1) == 0.0
    assert sentence_bleu(["a b", "c"], ["a b", "c"], 2) == pytest.approx(1.0)
    # ...and an empty or full-width-space token is not dropped: p1 = 1/2, lengths equal
    assert sentence_bleu(["", "x"], ["x", "x"], 1) == pytest.approx(0.5)
    assert corpus_bleu([["\u3000", "x"]], [["x", "x"]], 1) == pytest.approx(0.5)
    # multi-character tokens (jieba words) compare whole: 高血压 ≠ 高血
    assert lcs_length(["高血压", "患者"], ["高血", "患者"]) == 1


def test_input_errors():
    with pytest.raises(ValueError, match="ROUGE-0"):
        rouge_n(["a"], ["a"], 0)
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        corpus_bleu([["a"], ["b"]], [["a"]], 2)


def test_lcs_matches_dynamic_programming():
    rng = random.Random(0)
    vocab = ["甲", "乙", "丙", "丁", "戊", "高血压", "a b", ""]
    for k in range(320):
        hi = 200 if k % 16 == 0 else 40  # some beyond 64 tokens: multi-word bit vectors
        a = [rng.choice(vocab) for _ in range(rng.randint(0, hi))]
        b = [rng.choice(vocab) for _ in range(rng.randint(0, hi))]
        assert lcs_length(a, b) == _dp_lcs(a, b)


@pytest.mark.parametrize("mode", ["char", "jieba"])
def test_rouge_matches_textbook_formulas(mode):
    for hyp, ref in PAIRS:
        h, r = tokenize(hyp, mode), tokenize(ref, mode)
        for n in (1, 2):
            want = _prf(
                sum((_ngrams(h, n) & _ngrams(r, n)).values()), len(h) - n + 1, len(r) - n + 1
            )
            got = rouge_n(h, r, n)
            assert (got.p, got.r, got.f) == pytest.approx(want, abs=1e-12)
        got = rouge_l(h, r)
        assert (got.p, got.r, got.f) == pytest.approx(
            _prf(_dp_lcs(h, r), len(h), len(r)), abs=1e-12
        )


def test_rouge_l_matches_rouge_score_on_text():
    # rouge-score's own ROUGE-L (its O(nm) LCS table) with sfmed's tokens, from raw text
    from rouge_score import rouge_scorer

    class CharTok:
        def tokenize(self, text):
            return tokenize(text, "char")

    sc = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=CharTok())
    for hyp, ref in PAIRS:
        want = sc.score(ref, hyp)  # score(target, prediction)
        h, r = tokenize(hyp), tokenize(ref)
        for got, key in (
            (rouge_n(h, r, 1), "rouge1"),
            (rouge_n(h, r, 2), "rouge2"),
            (rouge_l(h, r), "rougeL"),
        ):
            w = want[key]
            assert (got.p, got.r, got.f) == pytest.approx(
                (w.precision, w.recall, w.fmeasure), abs=1e-12
            )


def test_rouge_matches_rouge_chinese_package():
    rc = pytest.importorskip("rouge_chinese")
    # count-based n-grams (exclusive=False); single 'sentences' (no 。！？) so that its
    # summary-level ROUGE-L equals sentence-level LCS
    scorer = rc.Rouge(exclusive=False)
    for hyp, ref in PAIRS:
        hyp, ref = hyp.replace("。", ""), ref.replace("。", "")
        h, r = tokenize(hyp), tokenize(ref)
        want = scorer.get_scores(" ".join(h), " ".join(r))[0]
        assert rouge_n(h, r, 1).f == pytest.approx(want["rouge-1"]["f"], abs=1e-6)
        assert rouge_n(h, r, 2).f == pytest.approx(want["rouge-2"]["f"], abs=1e-6)
        assert rouge_l(h, r).f == pytest.approx(want["rouge-l"]["f"], abs=1e-6)


@pytest.mark.parametrize("mode", ["char", "jieba"])
def test_bleu_matches_textbook_formula(mode):
    hyps = [tokenize(h, mode) for h, _ in PAIRS]
    refs = [tokenize(r, mode) for _, r in PAIRS]
    for n in (1, 2, 4):
        assert corpus_bleu(hyps, refs, n) == pytest.approx(
            _bleu(list(zip(hyps, refs)), n, False), abs=1e-12
        )
        for h, r in zip(hyps, refs):
            assert sentence_bleu(h, r, n) == pytest.approx(_bleu([(h, r)], n, True), abs=1e-12)


def test_pairwise_compare_epsilon_and_fractions():
    assert compare(0.5, 0.4) == "win" and compare(0.4, 0.5) == "lose" and compare(0.4, 0.4) == "tie"
    assert compare(0.50, 0.45, epsilon=0.05) == "tie"  # ahead by exactly epsilon is a tie
    assert compare(0.51, 0.45, epsilon=0.05) == "win"
    f = win_tie_lose(["win", "win", "tie", "lose"])
    assert f == {"win": 0.5, "tie": 0.25, "lose": 0.25, "n": 4}
    assert win_tie_lose([])["n"] == 0


@pytest.mark.parametrize(
    ("answer", "hits", "c"),
    [
        ("可用于呼吸道感染", 1, (True, False, False)),
        ("用于呼吸道感染和泌尿道 感染", 2, (True, True, True)),  # 2 of 3 meets 2/3 exactly
        ("用于呼吸道感染、泌尿道感染、皮肤软组织感染", 3, (True, True, True)),
        ("不清楚", 0, (False, False, False)),
    ],
)
def test_indication_criteria(answer, hits, c):
    h = indication_hits(answer, ["呼吸道感染", "泌尿道感染", "皮肤软组织感染"])
    assert h["hits"] == hits and (h["c1"], h["c2"], h["c3"]) == c


def test_indication_half_of_four():
    labels = ["甲病", "乙病", "丙病", "丁病"]
    h = indication_hits("甲病乙病", labels)
    assert (h["c1"], h["c2"], h["c3"]) == (True, True, False)
