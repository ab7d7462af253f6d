"""The metrics of the benchmarks, as their official scripts define them, over already tokenised text.

Every scorer returns per-question statistics (`ItemScores`) rather than one number: a metric is a
reduction of them over a set of questions, so the bootstrap (`bootstrap.py`) and the paired comparison
(`compare.py`) resample questions and reduce again without re-scoring. For most metrics the reduction
is the mean; corpus BLEU sums n-gram counts first, as coco-caption's BleuScorer does.

Sources (facts, not code): coco-caption / pycocoevalcap (BLEU `option="closest"`, ROUGE-L with
beta 1.2, CIDEr-D with sigma 6), as vendored by OpenViVQA and VLSP's EVJVQA scorer; OpenViVQA's
`evaluation/accuracy` and `evaluation/f1`; VLSP 2022 EVJVQA's `F1`; ST-VQA's ANLS; MTVQA's
`scripts/acc.py`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

BLEU_ORDER = 4
ROUGE_BETA = 1.2
CIDER_SIGMA = 6.0
ANLS_THRESHOLD = 0.5
# coco-caption's BleuScorer: added to counts so that an order with no n-gram gives ~0, not 0/0.
_TINY, _SMALL = 1e-15, 1e-9


@dataclass
class ItemScores:
    """Per-question statistics of one metric and the reduction that turns a sample of them into it."""

    values: np.ndarray  # (questions,) or (questions, k)
    reduce: Callable[[np.ndarray], float]

    def score(self, index: np.ndarray | None = None) -> float:
        values = self.values if index is None else self.values[index]
        return float(self.reduce(values)) if len(values) else float("nan")


def mean_scores(values: Sequence[float]) -> ItemScores:
    return ItemScores(np.asarray(values, dtype=float), lambda v: v.mean())


# --- answer matching ---------------------------------------------------------------------------------


def openvivqa_exact_match(prediction: list[str], references: list[list[str]]) -> float:
    """OpenViVQA `Accuracy`: the token sequences equal, averaged over the references (not the best one)."""
    return float(np.mean([prediction == ref for ref in references]))


def openvivqa_f1(prediction: list[str], reference: list[str]) -> float:
    """OpenViVQA `F1`: shared distinct tokens over the token counts (with repeats) of each side.
    Two empty answers agree (1), one empty answer does not (0)."""
    if not prediction or not reference:
        return float(prediction == reference)
    common = len(set(prediction) & set(reference))
    if common == 0:
        return 0.0
    precision, recall = common / len(prediction), common / len(reference)
    return 2 * precision * recall / (precision + recall)


def set_f1(prediction: list[str], reference: list[str]) -> float:
    """VLSP EVJVQA `F1` (also ViTextVQA / ViOCRVQA): the same over distinct tokens on both sides, so a
    repeated word neither helps nor hurts."""
    if not prediction or not reference:
        return float(prediction == reference)
    common = len(set(prediction) & set(reference))
    if common == 0:
        return 0.0
    precision, recall = common / len(set(prediction)), common / len(set(reference))
    return 2 * precision * recall / (precision + recall)


def levenshtein(a: str, b: str) -> int:
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, references: list[str], threshold: float = ANLS_THRESHOLD) -> float:
    """ST-VQA's Average Normalized Levenshtein Similarity of one question: the best over the references
    of 1 - distance / longer length, and 0 where that distance is `threshold` or more."""
    best = 0.0
    for ref in references:
        longest = max(len(ref), len(prediction))
        distance = levenshtein(ref, prediction) / longest if longest else 0.0
        best = max(best, 1.0 - distance if distance < threshold else 0.0)
    return best


def mtvqa_match(prediction: str, references: list[str]) -> float:
    """MTVQA `evaluate_exact_match_accuracy`: some reference (stripped, lower-cased) is a substring of the
    prediction (stripped, lower-cased, every "." removed): 1, else 0. Substring, not whole words."""
    pred = prediction.strip().lower().replace(".", "")
    return float(any(ref.strip().lower() in pred for ref in references))


# --- BLEU (coco-caption's BleuScorer, corpus level, closest reference length) --------------------------


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu_stats(prediction: list[str], references: list[list[str]], order: int = BLEU_ORDER) -> np.ndarray:
    """[prediction length, closest reference length, guesses 1..order, clipped matches 1..order]. The
    closest reference length breaks ties towards the shorter reference, as coco-caption does."""
    test_len = len(prediction)
    ref_len = min((abs(len(r) - test_len), len(r)) for r in references)[1]
    guess = [max(0, test_len - k + 1) for k in range(1, order + 1)]
    correct = []
    for k in range(1, order + 1):
        max_ref = Counter()
        for ref in references:
            max_ref |= _ngrams(ref, k)  # union of Counters keeps the largest count of each n-gram
        correct.append(sum(min(c, max_ref[g]) for g, c in _ngrams(prediction, k).items()))
    return np.asarray([test_len, ref_len, *guess, *correct], dtype=float)


def corpus_bleu(stats: np.ndarray, n: int, order: int = BLEU_ORDER) -> float:
    """BLEU-n from summed `bleu_stats`: the geometric mean of the 1..n precisions, times the brevity
    penalty of the summed lengths."""
    totals = stats.sum(axis=0)
    test_len, ref_len = totals[0], totals[1]
    guess, correct = totals[2 : 2 + order], totals[2 + order : 2 + 2 * order]
    product = 1.0
    for k in range(n):
        product *= (correct[k] + _TINY) / (guess[k] + _SMALL)
    score = product ** (1.0 / n)
    ratio = (test_len + _TINY) / (ref_len + _SMALL)
    return score * math.exp(1 - 1 / ratio) if ratio < 1 else score


def bleu_scores(predictions: list[list[str]], references: list[list[list[str]]]) -> dict[str, ItemScores]:
    """`bleu_1`..`bleu_4` and `bleu`, their mean (VLSP EVJVQA's "BLEU")."""
    stats = np.stack([bleu_stats(p, r) for p, r in zip(predictions, references, strict=True)])
    out = {f"bleu_{n}": ItemScores(stats, lambda s, n=n: corpus_bleu(s, n)) for n in range(1, BLEU_ORDER + 1)}
    out["bleu"] = ItemScores(stats, lambda s: float(np.mean([corpus_bleu(s, n) for n in range(1, BLEU_ORDER + 1)])))
    return out


# --- ROUGE-L (coco-caption) --------------------------------------------------------------------------


def lcs_length(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, 1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(prediction: list[str], references: list[list[str]], beta: float = ROUGE_BETA) -> float:
    """coco-caption's ROUGE-L of one prediction: the best LCS precision and the best LCS recall over the
    references (each on its own), combined as an F-measure weighted by beta = 1.2."""
    if not prediction:
        return 0.0
    lcs = [lcs_length(ref, prediction) for ref in references]
    precision = max(c / len(prediction) for c in lcs)
    recall = max(c / len(ref) if ref else 0.0 for c, ref in zip(lcs, references))
    if precision == 0 or recall == 0:
        return 0.0
    return (1 + beta**2) * precision * recall / (recall + beta**2 * precision)


# --- CIDEr-D (coco-caption's Cider, which is CIDEr-D) ------------------------------------------------


def cider_d(predictions: list[list[str]], references: list[list[list[str]]], sigma: float = CIDER_SIGMA) -> np.ndarray:
    """Per-item CIDEr-D, document frequencies taken over the references of the whole scored set.

    As coco-caption computes it: tf-idf vectors of 1..4-grams, the prediction's weights clipped at the
    reference's, a Gaussian penalty on the length difference, averaged over n and over references, x10.
    Its "length" is the number of bigrams, not of words, and that is kept.
    """
    doc_freq: Counter = Counter()
    cooked_refs = [[_all_ngrams(r) for r in refs] for refs in references]
    for refs in cooked_refs:
        doc_freq.update({g for ref in refs for g in ref})
    log_docs = math.log(float(len(references)))

    def vector(counts: Counter) -> tuple[list[dict], list[float], int]:
        vec = [{} for _ in range(BLEU_ORDER)]
        norm = [0.0] * BLEU_ORDER
        length = 0
        for gram, tf in counts.items():
            n = len(gram) - 1
            vec[n][gram] = tf * (log_docs - math.log(max(1.0, doc_freq[gram])))
            norm[n] += vec[n][gram] ** 2
            if n == 1:
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    scores = []
    for prediction, refs in zip(predictions, cooked_refs, strict=True):
        vec, norm, length = vector(_all_ngrams(prediction))
        total = np.zeros(BLEU_ORDER)
        for ref in refs:
            vec_r, norm_r, length_r = vector(ref)
            penalty = math.exp(-((length - length_r) ** 2) / (2 * sigma**2))
            for n in range(BLEU_ORDER):
                value = sum(min(w, vec_r[n].get(g, 0.0)) * vec_r[n].get(g, 0.0) for g, w in vec[n].items())
                if norm[n] != 0 and norm_r[n] != 0:
                    value /= norm[n] * norm_r[n]
                total[n] += value * penalty
        scores.append(float(total.mean()) / len(refs) * 10.0)
    return np.asarray(scores)


def _all_ngrams(tokens: list[str]) -> Counter:
    counts: Counter = Counter()
    for n in range(1, BLEU_ORDER + 1):
        counts.update(_ngrams(tokens, n))
    return counts


def generation_scores(predictions: list[list[str]], references: list[list[list[str]]]) -> dict[str, ItemScores]:
    """BLEU-1..4 and their mean, ROUGE-L and CIDEr-D over tokenised predictions and references."""
    out = bleu_scores(predictions, references)
    out["rouge_l"] = mean_scores([rouge_l(p, r) for p, r in zip(predictions, references, strict=True)])
    out["cider"] = mean_scores(cider_d(predictions, references))
    return out
