"""The demo corpus teaches the benchmarks' short-answer instruction (as LLaVA-1.5's finetune mix does):
a share of the finetune questions carry it, the held-out questions do not, and `eval --benchmark`'s
prompt on the held-out files reads as the instructed training questions read."""

from __future__ import annotations

import json

from vistralv_ray.data import demo
from vistralv_ray.evaluation.benchmarks import SHORT_ANSWER, SHORT_ANSWER_SAME_LANGUAGE, get_benchmark
from vistralv_ray.evaluation.formats import read_mtvqa, read_vlsp

QUESTIONS = {
    *demo.COLOUR_QUESTIONS,
    *demo.POSITION_QUESTIONS,
    *demo.COUNT_QUESTIONS,
    *demo.SHAPE_QUESTIONS,
}


def qa_turns(path) -> list[tuple[str, str]]:
    """(question without the <image> tag, answer) of every turn of a demo QA file."""
    turns = []
    for record in json.loads(path.read_text(encoding="utf-8")):
        conv = record["conversations"]
        turns += [(q["value"].replace("<image>", "").strip(), a["value"]) for q, a in zip(conv[::2], conv[1::2])]
    return turns


def test_a_third_of_finetune_questions_carry_the_short_answer_instruction(demo_corpus):
    turns = qa_turns(demo_corpus["train"])
    instructed = [(q.split("\n"), a) for q, a in turns if "\n" in q]
    assert 0.2 < len(instructed) / len(turns) < 0.5, (len(instructed), len(turns))
    # The question itself, then one of the two instructions, word for word; the answer stays short.
    assert all(len(lines) == 2 and lines[0] in QUESTIONS for lines, _ in instructed), instructed
    assert {lines[1] for lines, _ in instructed} == {SHORT_ANSWER, SHORT_ANSWER_SAME_LANGUAGE}
    assert all(len(a.split()) <= 3 for _, a in instructed)
    # Every kind of question is asked with the instruction, not only the counts.
    kinds = [demo.COLOUR_QUESTIONS, demo.POSITION_QUESTIONS, demo.COUNT_QUESTIONS]
    assert all(any(lines[0] in kind for lines, _ in instructed) for kind in kinds)
    # Held-out questions stay plain: plain `eval` asks them as it always did.
    assert all(q in QUESTIONS for q, _ in qa_turns(demo_corpus["eval"]))


def test_benchmark_prompts_on_held_out_files_read_like_instructed_training_questions(demo_corpus, tmp_path):
    files = demo.held_out_benchmark_files(demo_corpus["eval"], demo_corpus["images"], tmp_path)
    trained = {q for q, _ in qa_turns(demo_corpus["train"])}
    for name, loaded in (
        ("openvivqa", read_vlsp(files["openvivqa"], str(demo_corpus["images"]))),
        ("mtvqa", read_mtvqa(files["mtvqa"], None)),
    ):
        bench = get_benchmark(name)
        prompts = {bench.prompt(item) for item in loaded.items}
        assert all(p.count(bench.instruction) == 1 for p in prompts), prompts  # added once, at eval time
        assert len(prompts & trained) >= len(prompts) // 2, sorted(prompts - trained)


def test_the_corpus_is_the_same_for_the_same_seed(tmp_path):
    a = demo.make_demo_corpus(tmp_path / "a", train_images=20, eval_images=4, seed=3)
    b = demo.make_demo_corpus(tmp_path / "b", train_images=20, eval_images=4, seed=3)
    for key in ("align", "train", "eval"):
        assert a[key].read_bytes() == b[key].read_bytes(), key
