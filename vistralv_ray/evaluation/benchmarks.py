"""The benchmarks `vistralv-ray eval --benchmark` knows: reader, prompt, and the official scoring of each.

A benchmark is a value (`Benchmark`): which file layout it reads, what it asks the model, how the
answer is cleaned up, and which metrics its official script reports, with that script's normalisation.
`get_benchmark` maps a name to one and raises on an unknown name. `llava` (our LLaVA JSON) is not here:
it keeps today's eval in `vistralv_ray/inference/evaluate.py`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vistralv_ray.evaluation import formats, text
from vistralv_ray.evaluation.formats import Item, Loaded
from vistralv_ray.evaluation.metrics import (
    ItemScores,
    anls,
    generation_scores,
    mean_scores,
    mtvqa_match,
    openvivqa_exact_match,
    openvivqa_f1,
    set_f1,
)

# "Answer the question with one word or a short phrase." (LLaVA's short-answer instruction, in Vietnamese)
SHORT_ANSWER = "Trả lời câu hỏi bằng một từ hoặc một cụm từ ngắn."
# EVJVQA and MTVQA ask in several languages and expect the answer in the question's language.
SHORT_ANSWER_SAME_LANGUAGE = "Trả lời câu hỏi bằng một từ hoặc một cụm từ ngắn, bằng đúng ngôn ngữ của câu hỏi."
# "Describe the image in one sentence."
CAPTION = "Hãy mô tả bức ảnh bằng một câu."

_ANSWER_LEAD = re.compile(r"^\s*(câu trả lời|trả lời|đáp án|answer)\s*:\s*", re.IGNORECASE)
_QUOTES = "\"'“”‘’`"


def clean_answer(raw: str) -> str:
    """The answer a chat model gives, as a benchmark answer: its first non-empty line, without an
    "Answer:" lead-in or wrapping quotes. Nothing else: each metric normalises in its own way."""
    lines = [line.strip() for line in str(raw).splitlines() if line.strip()]
    first = _ANSWER_LEAD.sub("", lines[0]) if lines else ""
    return first.strip().strip(_QUOTES).strip()


Scorer = Callable[[list[str], list[Item]], dict[str, ItemScores]]


@dataclass(frozen=True)
class Benchmark:
    name: str
    kind: str  # "vqa" or "caption"
    read: Callable[..., Loaded]
    score: Scorer
    instruction: str
    group_label: str = ""  # "type": ViVQA's accuracy is also reported per question type

    def prompt(self, item: Item) -> str:
        return self.instruction if self.kind == "caption" else f"{item.question}\n{self.instruction}"


def score_vivqa(predictions: list[str], items: list[Item]) -> dict[str, ItemScores]:
    correct = [
        any(text.vivqa_answer(p) == text.vivqa_answer(r) for r in item.references)
        for p, item in zip(predictions, items, strict=True)
    ]
    return {"accuracy": mean_scores(correct)}


def score_openvivqa(predictions: list[str], items: list[Item]) -> dict[str, ItemScores]:
    """OpenViVQA (VLSP 2023 ViVRC): EM and its F1, averaged over references, and the caption metrics."""
    preds = [text.openvivqa_tokens(p) for p in predictions]
    refs = [[text.openvivqa_tokens(r) for r in item.references] for item in items]
    out = {
        "exact_match": mean_scores([openvivqa_exact_match(p, r) for p, r in zip(preds, refs, strict=True)]),
        "f1": mean_scores([np.mean([openvivqa_f1(p, x) for x in r]) for p, r in zip(preds, refs, strict=True)]),
    }
    return out | generation_scores(preds, refs)


def score_evjvqa(predictions: list[str], items: list[Item]) -> dict[str, ItemScores]:
    """VLSP 2022 EVJVQA: its set F1 and BLEU (the mean of BLEU-1..4); EM, ROUGE-L and CIDEr on the same
    tokens. Japanese references are scored per character."""
    preds = [text.evjvqa_tokens(p, item.references[0]) for p, item in zip(predictions, items, strict=True)]
    refs = [[text.evjvqa_tokens(r, r) for r in item.references] for item in items]
    out = {
        "exact_match": mean_scores([max(p == x for x in r) for p, r in zip(preds, refs, strict=True)]),
        "f1": mean_scores([max(set_f1(p, x) for x in r) for p, r in zip(preds, refs, strict=True)]),
    }

    def words(tokens: list[str]) -> list[str]:
        # The scorer joins tokens with spaces and BLEU splits on whitespace: a Japanese space disappears.
        return [t for t in tokens if t.strip()]

    return out | generation_scores([words(p) for p in preds], [[words(x) for x in r] for r in refs])


def score_text_vqa(predictions: list[str], items: list[Item]) -> dict[str, ItemScores]:
    """ViOCRVQA / ViTextVQA: EM and set F1 as the authors' code computes them, and ST-VQA's ANLS; each
    the best over the question's reference answers."""
    em, f1, similarity = [], [], []
    for p, item in zip(predictions, items, strict=True):
        pred = text.vitextvqa_text(p)
        refs = [text.vitextvqa_text(r) for r in item.references]
        em.append(max(float(pred == r) for r in refs))
        f1.append(max(set_f1(pred.split(), r.split()) for r in refs))
        similarity.append(anls(text.anls_text(p), [text.anls_text(r) for r in item.references]))
    return {"exact_match": mean_scores(em), "f1": mean_scores(f1), "anls": mean_scores(similarity)}


def score_mtvqa(predictions: list[str], items: list[Item]) -> dict[str, ItemScores]:
    return {
        "accuracy": mean_scores(
            [mtvqa_match(text.nfc(p), item.references) for p, item in zip(predictions, items, strict=True)]
        )
    }


def score_captions(predictions: list[str], items: list[Item]) -> dict[str, ItemScores]:
    preds = [text.caption_tokens(p) for p in predictions]
    refs = [[text.caption_tokens(r) for r in item.references] for item in items]
    return generation_scores(preds, refs)


def _mtvqa_reader(path: Path, images: str | None, lang: str = "vi") -> Loaded:
    return formats.read_mtvqa(path, images, lang)


def _ignore_lang(reader):
    return lambda path, images, lang="vi": reader(path, images)


BENCHMARKS = {
    b.name: b
    for b in (
        Benchmark("vivqa", "vqa", _ignore_lang(formats.read_vivqa), score_vivqa, SHORT_ANSWER, "type"),
        Benchmark("openvivqa", "vqa", _ignore_lang(formats.read_vlsp), score_openvivqa, SHORT_ANSWER),
        Benchmark("evjvqa", "vqa", _ignore_lang(formats.read_vlsp), score_evjvqa, SHORT_ANSWER_SAME_LANGUAGE),
        Benchmark("viocrvqa", "vqa", _ignore_lang(formats.read_text_vqa), score_text_vqa, SHORT_ANSWER),
        Benchmark("vitextvqa", "vqa", _ignore_lang(formats.read_text_vqa), score_text_vqa, SHORT_ANSWER),
        Benchmark("mtvqa", "vqa", _mtvqa_reader, score_mtvqa, SHORT_ANSWER_SAME_LANGUAGE, "lang"),
        Benchmark("uit-viic", "caption", _ignore_lang(formats.read_coco_captions), score_captions, CAPTION),
        Benchmark("ktvic", "caption", _ignore_lang(formats.read_coco_captions), score_captions, CAPTION),
    )
}
BENCHMARK_NAMES = ("llava", *BENCHMARKS)


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARK_NAMES)}")
    return BENCHMARKS[name]
