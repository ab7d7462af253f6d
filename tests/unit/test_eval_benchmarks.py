"""Benchmark files in each published layout (written here, tiny), the benchmark predictor on the tiny
export without Ray, the chat-template rule, and eval-compare on two hand-written output directories."""

from __future__ import annotations

import io
import json
import shutil
import typing

import numpy as np
import pytest
from PIL import Image

from vistralv_ray.evaluation import formats
from vistralv_ray.evaluation.benchmarks import get_benchmark
from vistralv_ray.evaluation.runner import BenchmarkPredictor, resolve_chat_template, score_report

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200)]


def jpeg(colour, size=(40, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


def write_benchmark_files(root) -> dict:
    """One tiny file per layout, images beside them; returns {benchmark: data path}."""
    images = root / "images"
    (images / "val2014").mkdir(parents=True)
    for k, colour in enumerate(COLOURS):
        (images / f"img{k}.jpg").write_bytes(jpeg(colour, (40 + 8 * k, 32)))
    (images / "COCO_train2014_000000000042.jpg").write_bytes(jpeg(COLOURS[0]))
    (images / "val2014" / "COCO_val2014_000000000007.jpg").write_bytes(jpeg(COLOURS[1]))
    paths = {}
    paths["vivqa"] = root / "vivqa_test.csv"
    paths["vivqa"].write_text(
        ",question,answer,img_id,type\n"
        "0,màu của quả táo là gì,màu đỏ,42,2\n"
        "1,có bao nhiêu con mèo,hai,7,1\n"
        "2,cái gì ở trên bàn,quyển sách,99,0\n",  # image 99 is missing: rejected, counted
        encoding="utf-8",
    )
    vlsp = {
        "images": {str(k): f"img{k}.jpg" for k in range(len(COLOURS))},
        "annotations": {
            str(100 + k): {"image_id": k, "question": q, "answer": a}
            for k, (q, a) in enumerate(
                [
                    ("Màu của tấm biển là gì?", "màu đỏ"),
                    ("Có bao nhiêu người?", "hai người"),
                    ("Chữ trên biển là gì?", "phở hà nội"),
                    ("Chiếc xe màu gì?", "màu xanh dương"),
                    ("Bức tường màu gì?", "màu vàng"),
                ]
            )
        },
    }
    paths["openvivqa"] = root / "openvivqa_test.json"
    paths["openvivqa"].write_text(json.dumps(vlsp, ensure_ascii=False), encoding="utf-8")
    text_vqa = {
        "images": [{"id": k, "filename": f"img{k}.jpg"} for k in range(3)],
        "annotations": [
            {"id": k, "image_id": k, "question": "Tên quán là gì?", "answers": ["phở thìn", "quán phở thìn"]}
            for k in range(3)
        ],
    }
    paths["vitextvqa"] = root / "vitextvqa_test.json"
    paths["vitextvqa"].write_text(json.dumps(text_vqa, ensure_ascii=False), encoding="utf-8")
    captions = {
        "images": [{"id": k, "file_name": f"img{k}.jpg"} for k in range(2)],
        "annotations": [
            {"id": 2 * k + j, "image_id": k, "caption": c}
            for k in range(2)
            for j, c in enumerate(["một tấm biển màu đỏ.", "tấm biển đỏ trên tường."])
        ],
    }
    paths["ktvic"] = root / "ktvic_test.json"
    paths["ktvic"].write_text(json.dumps(captions, ensure_ascii=False), encoding="utf-8")
    paths["mtvqa"] = write_mtvqa(root / "mtvqa_test.parquet")
    return paths


def write_mtvqa(path, qa_as_json: bool = True):
    import pyarrow as pa
    import pyarrow.parquet as pq

    def pairs(items):
        listed = [{"question": q, "answer": a} for q, a in items]
        return json.dumps(listed, ensure_ascii=False) if qa_as_json else listed

    rows = [
        {"id": "vi_0", "lang": "VI", "image": {"bytes": jpeg(COLOURS[0]), "path": "a.jpg"},
         "qa_pairs": pairs([("Tên cửa hàng là gì?", "Phở Thìn"), ("Giá bao nhiêu?", "35.000đ")])},
        {"id": "vi_1", "lang": "VI", "image": {"bytes": jpeg(COLOURS[1], (64, 48)), "path": "b.jpg"},
         "qa_pairs": pairs([("Biển ghi gì?", "Cấm đỗ xe")])},
        {"id": "ja_0", "lang": "JA", "image": {"bytes": jpeg(COLOURS[2]), "path": "c.jpg"},
         "qa_pairs": pairs([("店の名前は?", "ラーメン")])},
    ]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_readers_of_each_layout(tmp_path):
    paths = write_benchmark_files(tmp_path)
    vivqa = formats.read_vivqa(paths["vivqa"], str(tmp_path / "images"))
    assert [(i.id, i.references, i.group) for i in vivqa.items] == [("0", ["màu đỏ"], "2"), ("1", ["hai"], "1")]
    assert vivqa.items[1].image == (tmp_path / "images/val2014/COCO_val2014_000000000007.jpg").read_bytes()
    assert vivqa.rejected == {"missing_image": 1}

    vlsp = formats.read_vlsp(paths["openvivqa"], None)  # default roots: the file's folder, then images/
    assert [i.id for i in vlsp.items] == ["100", "101", "102", "103", "104"]
    assert vlsp.items[2].references == ["phở hà nội"] and vlsp.items[2].image[:2] == b"\xff\xd8"

    text_vqa = formats.read_text_vqa(paths["vitextvqa"], None)
    assert text_vqa.items[0].references == ["phở thìn", "quán phở thìn"]

    captions = formats.read_coco_captions(paths["ktvic"], None)
    assert [(i.id, len(i.references), i.question) for i in captions.items] == [("0", 2, ""), ("1", 2, "")]

    mtvqa = formats.read_mtvqa(paths["mtvqa"], None)  # Vietnamese by default
    assert [(i.id, i.references, i.group) for i in mtvqa.items] == [
        ("vi_0-0", ["Phở Thìn"], "VI"),
        ("vi_0-1", ["35.000đ"], "VI"),
        ("vi_1-0", ["Cấm đỗ xe"], "VI"),
    ]
    assert len(formats.read_mtvqa(paths["mtvqa"], None, "all").items) == 4
    listed = write_mtvqa(tmp_path / "listed.parquet", qa_as_json=False)  # qa_pairs as a list column
    assert [i.id for i in formats.read_mtvqa(listed, None, "ja").items] == ["ja_0-0"]


def test_vivqa_accuracy_is_reported_per_question_type():
    bench = get_benchmark("vivqa")
    items = [
        formats.Item(str(k), None, "?", [a], t) for k, (a, t) in enumerate([("đỏ", "2"), ("hai", "1"), ("ba", "1")])
    ]
    values, intervals = score_report(bench, ["Đỏ.", "hai", "bốn"], items, resamples=50)
    assert values["accuracy"] == pytest.approx(2 / 3)
    assert values["accuracy_type_1"] == 0.5 and values["accuracy_type_2"] == 1.0
    assert intervals["accuracy_type_2"] == [1.0, 1.0]


@pytest.fixture(scope="module")
def export(tiny_assets, tmp_path_factory, spread_weights):
    from vistralv_ray.config.schema import Config, ModelConfig
    from vistralv_ray.inference.export import save_export
    from vistralv_ray.model.assembly import build_model

    mc = ModelConfig(language_model=str(tiny_assets["llm"]), vision_tower=str(tiny_assets["vision"]), max_length=512)
    assembled = build_model(mc)
    spread_weights(assembled.model)
    out = tmp_path_factory.mktemp("bench-export")
    save_export(assembled.model, assembled.tokenizer, assembled.chat_template, Config(model=mc), out)
    return out


def as_batch(records: list[dict]) -> dict[str, np.ndarray]:
    batch = {k: np.empty(len(records), dtype=object) for k in ("id", "image", "prompt")}
    for i, r in enumerate(records):
        for k in batch:
            batch[k][i] = r[k]
    return batch


def run(predictor, records, batch_size):
    rows = []
    for start in range(0, len(records), batch_size):
        out = predictor(as_batch(records[start : start + batch_size]))
        rows += [dict(zip(out, values)) for values in zip(*out.values())]
    return rows


def test_benchmark_answers_do_not_depend_on_the_batch_size(export, tmp_path):
    paths = write_benchmark_files(tmp_path)
    bench = get_benchmark("openvivqa")
    items = formats.read_vlsp(paths["openvivqa"], None).items
    items += formats.read_mtvqa(paths["mtvqa"], None, "all").items
    records = [{"id": i.id, "image": i.image, "prompt": bench.prompt(i)} for i in items]
    records.append({"id": "broken", "image": b"not an image", "prompt": "?"})
    predictor = BenchmarkPredictor(str(export), max_new_tokens=5, device="cpu", blank_images=True)
    ones, eights = run(predictor, records, 1), run(predictor, records, 8)
    assert ones == eights and len(ones) == len(records) == 10
    answered = [r for r in ones if not r["reject_reason"]]
    assert len({r["raw_prediction"] for r in answered}) > 1  # the answers depend on the question and image
    assert all(r["blank_prediction"] is not None for r in answered)
    assert ones[-1]["reject_reason"] and ones[-1]["raw_prediction"] == ""  # counted, not a crash


def test_the_training_benchmark_step_asks_what_eval_asks(export, tiny_assets, tmp_path):
    """train.benchmark's step (training/benchmark.py: training tokenizer, template and pixels) answers as
    `eval --benchmark` answers with the export of the same weights, and deals uneven questions to ranks."""
    import types

    import torch
    from transformers import LlavaForConditionalGeneration

    from vistralv_ray.config import ConfigError
    from vistralv_ray.config.schema import ModelConfig, TrainBenchmark
    from vistralv_ray.evaluation.benchmarks import BENCHMARKS, clean_answer
    from vistralv_ray.model.assembly import build_model
    from vistralv_ray.training.benchmark import BenchmarkStep, load_subset

    # train.benchmark.name takes the benchmarks `eval --benchmark` reads a published layout of.
    hint = typing.get_type_hints(TrainBenchmark)["name"]
    assert {name for arg in typing.get_args(hint) for name in typing.get_args(arg)} == set(BENCHMARKS)
    paths = write_benchmark_files(tmp_path)
    settings = TrainBenchmark(name="openvivqa", data=str(paths["openvivqa"]), max_questions=4, max_new_tokens=5)
    items = load_subset(settings)
    assert [i.id for i in items] == ["100", "101", "102", "103"]  # the file's first questions
    with pytest.raises(ConfigError, match="^train.benchmark.data: .* is not a file"):
        load_subset(TrainBenchmark(name="openvivqa", data=str(tmp_path / "absent.json")))

    mc = ModelConfig(language_model=str(tiny_assets["llm"]), vision_tower=str(tiny_assets["vision"]), max_length=512)
    assembled = build_model(mc)
    model = LlavaForConditionalGeneration.from_pretrained(str(export), dtype=torch.float32).eval()
    engine = types.SimpleNamespace(module=model, eval=model.eval, train=model.eval)
    step = BenchmarkStep(settings, items, assembled, mc, rank=0, world=1, synced=False)
    metrics = step.run(engine, torch.device("cpu"), torch.float32, step=1)

    bench = get_benchmark("openvivqa")
    predictor = BenchmarkPredictor(str(export), max_new_tokens=5, device="cpu")
    rows = run(predictor, [{"id": i.id, "image": i.image, "prompt": bench.prompt(i)} for i in items], 8)
    expected = [clean_answer(r["raw_prediction"]) for r in rows]
    assert step.last_predictions == expected and len(set(expected)) > 1
    values, _ = score_report(bench, expected, items, resamples=10)
    assert metrics == {f"bench/{k}": v for k, v in values.items()} | {"bench/questions": 4}
    # 3 ranks, 4 questions: every rank makes 2 generate calls; ranks 1 and 2 repeat a question.
    dealt = [BenchmarkStep(settings, items, assembled, mc, rank=r, world=3, synced=True) for r in range(3)]
    assert [(s.asked, s.answered) for s in dealt] == [([0, 3], 2), ([1, 1], 1), ([2, 2], 1)]


def test_a_model_without_chat_template_needs_template(export, tmp_path):
    from vistralv_ray.config import ConfigError

    assert resolve_chat_template(export, None) is None  # ours carries its template
    bare = tmp_path / "bare"
    shutil.copytree(export, bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    for name in ("processor_config.json", "tokenizer_config.json", "chat_template.json"):
        if (bare / name).is_file():
            config = json.loads((bare / name).read_text())
            config.pop("chat_template", None)
            (bare / name).write_text(json.dumps(config))
    (bare / "chat_template.json").unlink(missing_ok=True)
    with pytest.raises(ConfigError, match="no chat template"):
        resolve_chat_template(bare, None)
    assert "[INST]" in resolve_chat_template(bare, "vistral")
    with pytest.raises(ConfigError, match="vicuna"):
        resolve_chat_template(bare, "vicuna")


def write_run(root, predictions: list[str], references: list[str], benchmark: str = "openvivqa"):
    root.mkdir()
    rows = [
        {"id": str(k), "group": "", "question": "?", "references": [r], "prediction": p, "blank_prediction": None}
        for k, (p, r) in enumerate(zip(predictions, references))
    ]
    (root / "predictions.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    (root / "metrics.json").write_text(json.dumps({"benchmark": benchmark}))


def test_eval_compare_writes_a_paired_table_and_chart(tmp_path):
    from vistralv_ray.cli.main import main

    refs = ["màu đỏ", "hai người", "phở hà nội", "màu xanh"] * 10
    write_run(tmp_path / "a", ["màu vàng", "ba người", "phở", "màu xanh"] * 10, refs)
    write_run(tmp_path / "b", refs, refs)
    assert main(["eval-compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp")]) == 0
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| exact_match | 0.2500 | 1.0000 | +0.7500 * |" in table
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert {r["metric"] for r in result["rows"]} >= {"exact_match", "f1", "bleu", "rouge_l", "cider"}
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    write_run(tmp_path / "c", refs, refs, benchmark="evjvqa")
    with pytest.raises(ValueError, match="not one benchmark"):
        main(["eval-compare", str(tmp_path / "a"), str(tmp_path / "c"), "--out", str(tmp_path / "x")])


def test_the_benchmark_step_leaves_out_questions_with_control_tokens_before_any_worker(tmp_path, caplog):
    """A literal `</s>` or `<image>` in a question would stop every rank at its first benchmark step;
    the driver leaves such questions out (counted) when it reads the subset."""
    from vistralv_ray.config.schema import TrainBenchmark
    from vistralv_ray.training.benchmark import load_subset

    paths = write_benchmark_files(tmp_path)
    data = json.loads(paths["openvivqa"].read_text(encoding="utf-8"))
    data["annotations"]["101"]["question"] += " </s>"
    data["annotations"]["102"]["question"] = "<image> " + data["annotations"]["102"]["question"]
    paths["openvivqa"].write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    items = load_subset(TrainBenchmark(name="openvivqa", data=str(paths["openvivqa"]), max_questions=3))
    assert [i.id for i in items] == ["100", "103", "104"]
    assert "control_token_in_text" in caplog.text
