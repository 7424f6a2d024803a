"""Text metrics for Chinese answers: tokenisation, ROUGE-1/2/L, BLEU-n, pairwise win/tie/lose,
drug-indication hits.

Tokenisation is the choice that decides Chinese scores, so it is explicit and ours: ``char``
(every non-space character is a token, the common practice for Chinese ROUGE) or ``jieba``
(words). The scores themselves come from the maintained packages, fed these tokens as they are:
ROUGE-N from ``rouge-score``'s ``RougeScorer`` (given a tokenizer that returns sfmed's tokens, so
it neither lowercases nor drops CJK characters as its default tokenizer does), ROUGE-L from the
longest common subsequence by ``rapidfuzz`` (C++, bit-parallel; ``rouge-score``'s own LCS is a
pure-Python O(nm) table, about 12 ms for two 300-character answers) with ``rouge-score``'s
F-measure, and BLEU from ``sacrebleu`` (``tokenize='none'``, ``exp`` smoothing). What no package
does stays here: pairwise win/tie/lose with an epsilon and QiZhenGPT's indication criteria.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from rapidfuzz.distance import LCSseq
from sacrebleu.metrics import BLEU

# rouge-score is imported where it is used: it imports nltk (~3 s), which every evaluation
# process would otherwise pay for, ROUGE or not.

TOKENIZERS = ("char", "jieba")


def tokenize(text: str, mode: str = "char") -> list[str]:
    """Split ``text`` into tokens: characters (``char``) or jieba words (``jieba``); no spaces."""
    if mode == "char":
        return [c for c in text if not c.isspace()]
    if mode == "jieba":
        import jieba

        jieba.setLogLevel(logging.WARNING)  # its dictionary-loading chatter goes to stderr
        return [w for w in jieba.lcut(text) if w.strip()]
    raise ValueError(f"tokenizer={mode!r} is not supported; use one of {TOKENIZERS}")


@dataclass(frozen=True)
class PRF:
    """Precision, recall and F1 of one comparison."""

    p: float
    r: float
    f: float


@functools.cache
def _rouge_n_scorer(n: int):
    from rouge_score import rouge_scorer
    from rouge_score.tokenizers import Tokenizer

    class GivenTokens(Tokenizer):
        """``rouge-score`` tokenizer for input sfmed has already tokenised: tokens pass as they are.

        The default tokenizer would lowercase and replace everything outside ``[a-z0-9]`` (all
        Chinese) with spaces; this one changes nothing, so ``RougeScorer`` sees exactly our tokens.
        """

        def tokenize(self, text: Sequence[str]) -> list[str]:
            return list(text)

    return rouge_scorer.RougeScorer([f"rouge{n}"], tokenizer=GivenTokens())


def rouge_n(hyp: Sequence[str], ref: Sequence[str], n: int) -> PRF:
    """ROUGE-N of token lists: clipped n-gram overlap over hypothesis/reference n-gram counts."""
    if not 1 <= n <= 9:  # rouge-score names the type ``rouge<digit>``
        raise ValueError(f"ROUGE-{n} is not supported; use n from 1 to 9")
    s = _rouge_n_scorer(n).score(ref, hyp)[f"rouge{n}"]  # score(target, prediction)
    return PRF(s.precision, s.recall, s.fmeasure)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (rapidfuzz, bit-parallel)."""
    return int(LCSseq.similarity(a, b))


def rouge_l(hyp: Sequence[str], ref: Sequence[str]) -> PRF:
    """ROUGE-L (sentence level): LCS over hypothesis and reference lengths, F1 (rouge-score's)."""
    if not hyp or not ref:
        return PRF(0.0, 0.0, 0.0)
    lcs = lcs_length(hyp, ref)
    from rouge_score import scoring

    p, r = lcs / len(hyp), lcs / len(ref)
    return PRF(p, r, scoring.fmeasure(p, r))


@functools.cache
def _bleu(max_n: int, effective_order: bool) -> BLEU:
    return BLEU(tokenize="none", max_ngram_order=max_n, effective_order=effective_order)


def _as_lines(*token_lists: Sequence[Sequence[str]]) -> list[list[str]]:
    """Token lists as sacrebleu input lines: one word per token, joined by spaces.

    sacrebleu re-splits lines on whitespace, so a token holding a space (or an empty one) would
    change the n-gram counts; every distinct token is written as its index in one shared table
    instead, which keeps token identity and nothing else, as BLEU needs.
    """
    ids: dict[str, str] = {}
    return [
        [" ".join(ids.setdefault(t, str(len(ids))) for t in tokens) for tokens in tl]
        for tl in token_lists
    ]


def corpus_bleu(hyps: Sequence[Sequence[str]], refs: Sequence[Sequence[str]], max_n: int) -> float:
    """Corpus BLEU-``max_n`` in [0, 1]: n-gram statistics summed over all pairs, then one score."""
    if len(hyps) != len(refs):
        raise ValueError(f"corpus_bleu got {len(hyps)} hypotheses but {len(refs)} references")
    if not hyps:
        return 0.0
    h, r = _as_lines(hyps, refs)
    return _bleu(max_n, False).corpus_score(h, [r]).score / 100


def sentence_bleu(hyp: Sequence[str], ref: Sequence[str], max_n: int) -> float:
    """Sentence BLEU-``max_n`` in [0, 1] with ``exp`` smoothing and effective order (sacrebleu)."""
    (h,), (r,) = _as_lines([hyp], [ref])
    return _bleu(max_n, True).sentence_score(h, [r]).score / 100


def compare(score_a: float, score_b: float, epsilon: float = 0.0) -> str:
    """``'win'`` when A beats B by more than ``epsilon``, ``'lose'`` the reverse, else ``'tie'``."""
    if score_a - score_b > epsilon:
        return "win"
    if score_b - score_a > epsilon:
        return "lose"
    return "tie"


def win_tie_lose(outcomes: Sequence[str]) -> dict[str, float]:
    """Fractions of ``win``/``tie``/``lose`` (they sum to 1) and ``n``."""
    n = len(outcomes)
    c = Counter(outcomes)
    if n == 0:
        return {"win": 0.0, "tie": 0.0, "lose": 0.0, "n": 0}
    return {"win": c["win"] / n, "tie": c["tie"] / n, "lose": c["lose"] / n, "n": n}


def _norm(text: str) -> str:
    return "".join(text.split()).lower()


def indication_hits(answer: str, labels: Sequence[str]) -> dict:
    """Which labelled indications occur in ``answer`` and QiZhenGPT's three criteria.

    Criterion 1: at least one label found; 2: at least half; 3: at least two thirds
    (compared as integers, so 2 of 3 labels meets criterion 3 exactly).
    """
    ans = _norm(answer)
    found = [lab for lab in labels if _norm(lab) and _norm(lab) in ans]
    k, n = len(found), len(labels)
    return {
        "found": found,
        "hits": k,
        "n_labels": n,
        "c1": k >= 1,
        "c2": n > 0 and 2 * k >= n,
        "c3": n > 0 and 3 * k >= 2 * n,
    }
