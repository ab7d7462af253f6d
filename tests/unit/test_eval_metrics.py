"""The benchmarks' official metrics on cases worked by hand from their definitions (and the scripts'
own quirks), so that a change of a rounding, a tie rule or a normalisation shows."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vistralv_ray.evaluation import text
from vistralv_ray.evaluation.benchmarks import clean_answer, get_benchmark
from vistralv_ray.evaluation.bootstrap import bootstrap_interval, paired_bootstrap
from vistralv_ray.evaluation.formats import Item
from vistralv_ray.evaluation.metrics import (
    anls,
    bleu_scores,
    cider_d,
    mean_scores,
    mtvqa_match,
    openvivqa_exact_match,
    openvivqa_f1,
    rouge_l,
    set_f1,
)


def toks(s: str) -> list[str]:
    return s.split()


def test_normalisations_follow_each_script():
    decomposed = "Ha\u0300 No\u0323\u0302i"  # NFD "Hà Nội": NFC first, so it matches the composed spelling
    assert text.vivqa_answer(decomposed + ".") == text.vivqa_answer("hà nội") == "hà nội"
    # OpenViVQA keeps punctuation as tokens; VLSP EVJVQA removes ASCII punctuation.
    assert text.openvivqa_tokens("Màu “đỏ”, xanh.") == ["màu", '"', "đỏ", '"', ",", "xanh", "."]
    assert text.evjvqa_tokens("Màu đỏ, xanh.", "màu đỏ") == ["màu", "đỏ", "xanh"]
    # A Japanese reference: the prediction is scored per character, case and punctuation untouched.
    assert text.evjvqa_tokens("赤い車", "赤い") == ["赤", "い", "車"]
    assert text.vitextvqa_text("  Hà Nội! ") == "hà nội"
    assert text.caption_tokens("Một con mèo, đang ngủ.") == ["một", "con", "mèo", "đang", "ngủ"]


def test_openvivqa_f1_counts_repeats_where_evjvqa_f1_does_not():
    pred, ref = toks("con mèo con"), toks("con mèo")
    # OpenViVQA: 2 shared distinct tokens / 3 predicted tokens, / 2 reference tokens: P 2/3, R 1.
    assert openvivqa_f1(pred, ref) == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))  # 0.8
    # EVJVQA: distinct tokens on both sides, P 2/2, R 2/2.
    assert set_f1(pred, ref) == 1.0
    assert set_f1([], []) == 1.0 and set_f1([], ["a"]) == 0.0 and openvivqa_f1(["a"], []) == 0.0
    assert set_f1(list("赤い"), list("赤いです")) == pytest.approx(2 * 1 * 0.5 / 1.5)


def test_openvivqa_exact_match_averages_over_references():
    assert openvivqa_exact_match(toks("màu đỏ"), [toks("màu đỏ"), toks("đỏ")]) == 0.5


def test_bleu_is_coco_captions_corpus_bleu():
    s = bleu_scores([toks("a b c d")], [[toks("a b c e")]])
    # Precisions 3/4, 2/3, 1/2, 0/1 and no brevity penalty; coco's tiny/small constants keep BLEU-4 > 0.
    assert s["bleu_1"].score() == pytest.approx(0.75)
    assert s["bleu_2"].score() == pytest.approx(math.sqrt(0.75 * 2 / 3))
    assert s["bleu_3"].score() == pytest.approx((0.75 * 2 / 3 * 0.5) ** (1 / 3))
    assert s["bleu_4"].score() == pytest.approx((0.25 * 1e-15 / (1 + 1e-9)) ** 0.25, rel=1e-6)
    assert s["bleu"].score() == pytest.approx(np.mean([s[f"bleu_{n}"].score() for n in (1, 2, 3, 4)]))
    # Brevity penalty exp(1 - r/c) with r = 4, c = 2.
    assert bleu_scores([toks("a b")], [[toks("a b c d")]])["bleu_1"].score() == pytest.approx(math.exp(-1))
    # The closest reference length, a tie going to the shorter one (3, not 5, for a 4-word prediction).
    closest = bleu_scores([toks("a b c d")], [[toks("a b c"), toks("a b c d e")]])["bleu_1"].score()
    assert closest == pytest.approx(1.0)
    # Corpus level: counts are summed before dividing (2 + 0 matches of 2 + 1 words), not averaged.
    corpus = bleu_scores([toks("a b"), toks("c")], [[toks("a b")], [toks("d")]])
    assert corpus["bleu_1"].score() == pytest.approx(2 / 3)


def test_rouge_l_takes_best_precision_and_best_recall_separately():
    # LCS("a b c d", "a c e") = 2: P 2/4, R 2/3, beta 1.2.
    p, r, b2 = 0.5, 2 / 3, 1.2**2
    assert rouge_l(toks("a b c d"), [toks("a c e")]) == pytest.approx((1 + b2) * p * r / (r + b2 * p))
    # P 1 from the first reference, R 1 from the second: coco-caption combines the two maxima.
    assert rouge_l(toks("a b"), [toks("a b c d"), toks("a")]) == pytest.approx(1.0)
    assert rouge_l([], [toks("a")]) == 0.0


def test_cider_d_by_hand():
    # Two images, so idf = ln 2 - ln df with df 1 for every reference n-gram (and max(1, 0) for unseen).
    scores = cider_d([toks("a b"), toks("c")], [[toks("a b")], [toks("d")]])
    # Image 1: cosine 1 for unigrams and bigrams, 0 for 3- and 4-grams, no length penalty: 10 * 2/4.
    # Image 2: nothing shared.
    assert scores.tolist() == pytest.approx([5.0, 0.0])
    # Clipping and the Gaussian length penalty (sigma 6; coco's "length" counts bigrams: 2 against 1).
    score = cider_d([toks("a b c"), toks("x")], [[toks("a b")], [toks("y")]])[0]
    unigram, bigram = 2 / math.sqrt(6), 1 / math.sqrt(2)
    assert score == pytest.approx(10 * (unigram + bigram) / 4 * math.exp(-1 / 72))


def test_anls_threshold_and_case():
    assert anls(text.anls_text("Hà Nội"), [text.anls_text("ha noi")]) == pytest.approx(1 - 2 / 6)
    assert anls("ab", ["ac"]) == 0.0  # normalised distance 0.5 is not below the threshold
    assert anls("abcd", ["abce", "xyz"]) == pytest.approx(0.75)  # the best reference counts
    assert anls("", [""]) == 1.0


def test_mtvqa_substring_match_and_its_dot_removal():
    assert mtvqa_match("Đáp án là hà nội.", [" Hà Nội "]) == 1.0  # both stripped and lower-cased
    assert mtvqa_match("Hà Nội.", ["Hà Nội."]) == 0.0  # the reference keeps its ".", the prediction loses it
    assert mtvqa_match("Thai", ["hai"]) == 1.0  # a substring, not a whole word
    assert mtvqa_match("3.5", ["3.5"]) == 0.0  # every "." leaves the prediction, not the reference
    assert mtvqa_match("35 kg", ["35", "x"]) == 1.0


def item(refs: list[str], group: str = "") -> Item:
    return Item("q", None, "?", refs, group)


def test_benchmark_scorers_name_their_metrics():
    assert set(get_benchmark("vivqa").score(["Màu đỏ."], [item(["màu đỏ"])])) == {"accuracy"}
    assert get_benchmark("vivqa").score(["Màu đỏ."], [item(["màu đỏ"])])["accuracy"].score() == 1.0
    names = {"exact_match", "f1", "bleu_1", "bleu_2", "bleu_3", "bleu_4", "bleu", "rouge_l", "cider"}
    assert set(get_benchmark("openvivqa").score(["a"], [item(["a"])])) == names
    assert set(get_benchmark("evjvqa").score(["a"], [item(["a"])])) == names
    assert set(get_benchmark("vitextvqa").score(["a"], [item(["a"])])) == {"exact_match", "f1", "anls"}
    assert set(get_benchmark("ktvic").score(["a"], [item(["a"])])) == names - {"exact_match", "f1"}
    text_vqa = get_benchmark("viocrvqa").score(["Nhà xuất bản Trẻ"], [item(["nxb trẻ", "Nhà Xuất Bản Trẻ."])])
    assert text_vqa["exact_match"].score() == 1.0 and text_vqa["anls"].score() < 1.0  # ANLS keeps the "."
    with pytest.raises(ValueError, match="unknown benchmark"):
        get_benchmark("vqav2")


def test_clean_answer_keeps_the_answer_line():
    assert clean_answer("Trả lời: Màu đỏ.\nVì quả táo chín.") == "Màu đỏ."
    assert clean_answer('  "Hà Nội"  ') == "Hà Nội"
    assert clean_answer("\n\n") == ""


def test_bootstrap_intervals_and_paired_significance():
    constant = mean_scores([1.0] * 20)
    assert bootstrap_interval(constant) == [1.0, 1.0]
    half = mean_scores([0.0, 1.0] * 50)
    lo, hi = bootstrap_interval(half)
    assert lo < 0.5 < hi and hi - lo < 0.25  # about +-1.96 * sqrt(.25 / 100) = +-0.098
    same = paired_bootstrap(half, half)
    assert same["difference"] == 0.0 and same["p_value"] == 1.0
    better = paired_bootstrap(mean_scores([0.0] * 50), mean_scores([1.0] * 25 + [0.0] * 25))
    assert better["difference"] == 0.5 and better["p_value"] == 0.0 and better["ci95"][0] > 0
    # Corpus BLEU resamples counts, not per-question BLEU.
    bleu = bleu_scores([toks("a b"), toks("c")], [[toks("a b")], [toks("d")]])["bleu_1"]
    assert bleu.score(np.array([0, 0])) == pytest.approx(1.0) and bleu.score(np.array([1, 1])) < 1e-9
