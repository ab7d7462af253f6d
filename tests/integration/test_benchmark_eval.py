"""`vistralv-ray eval --benchmark openvivqa / mtvqa` end to end on a local Ray: tiny files in the
published layouts, the tiny export, every metric with its interval, the blank-image control, and a
rerun that resumes from the predictions already written."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

pytestmark = pytest.mark.integration

QUESTIONS = [("Màu của tấm biển là gì?", "màu đỏ"), ("Có bao nhiêu người?", "hai người"), ("Chữ gì?", "phở")]
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]


def jpeg(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 32), colour).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def export(tiny_assets, tmp_path_factory):
    from vistralv_ray.config.schema import Config, ModelConfig
    from vistralv_ray.inference.export import save_export
    from vistralv_ray.model.assembly import build_model

    mc = ModelConfig(language_model=str(tiny_assets["llm"]), vision_tower=str(tiny_assets["vision"]), max_length=512)
    assembled = build_model(mc)
    out = tmp_path_factory.mktemp("bench-export")
    save_export(assembled.model, assembled.tokenizer, assembled.chat_template, Config(model=mc), out)
    return out


def test_openvivqa_and_mtvqa_end_to_end(ray_local, export, tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vistralv_ray.cli.main import main

    (tmp_path / "images").mkdir()
    for k, colour in enumerate(COLOURS):
        (tmp_path / "images" / f"img{k}.jpg").write_bytes(jpeg(colour))
    vlsp = {
        "images": {str(k): f"img{k}.jpg" for k in range(3)},
        "annotations": {str(k): {"image_id": k, "question": q, "answer": a} for k, (q, a) in enumerate(QUESTIONS)},
    }
    (tmp_path / "openvivqa.json").write_text(json.dumps(vlsp, ensure_ascii=False), encoding="utf-8")
    rows = [
        {"id": f"vi_{k}", "lang": "VI", "image": {"bytes": jpeg(c), "path": f"{k}.jpg"},
         "qa_pairs": json.dumps([{"question": q, "answer": a}], ensure_ascii=False)}
        for k, (c, (q, a)) in enumerate(zip(COLOURS, QUESTIONS))
    ]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "mtvqa.parquet")

    common = ["--blank-images", "--batch-size", "2", "--max-new-tokens", "4", "--resamples", "100"]
    out = tmp_path / "openvivqa-out"
    args = ["eval", str(export), "--benchmark", "openvivqa", "--data", str(tmp_path / "openvivqa.json")]
    assert main([*args, "--out", str(out), *common]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    names = ["exact_match", "f1", "bleu_1", "bleu_2", "bleu_3", "bleu_4", "bleu", "rouge_l", "cider"]
    for name in names:
        assert 0.0 <= metrics[name] <= (10.0 if name == "cider" else 1.0)
        assert f"blank_image_{name}" in metrics
        lo, hi = metrics["ci95"][name]
        assert lo <= metrics[name] + 1e-9 and metrics[name] <= hi + 1e-9
    assert metrics["questions"] == metrics["blank_image_questions"] == 3
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in predictions] == ["0", "1", "2"]
    assert all(p["blank_prediction"] is not None for p in predictions)

    # A rerun with the same settings asks nothing again and reports the same numbers.
    from vistralv_ray.evaluation import runner

    monkeypatch.setattr(runner, "_predict", lambda *a, **k: pytest.fail("a rerun asked answered questions again"))
    assert main([*args, "--out", str(out), *common]) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert {k: again[k] for k in names} == {k: metrics[k] for k in names}

    monkeypatch.undo()

    out = tmp_path / "mtvqa-out"
    args = ["eval", str(export), "--benchmark", "mtvqa", "--data", str(tmp_path / "mtvqa.parquet")]
    assert main([*args, "--out", str(out), *common]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["lang"] == "vi" and metrics["questions"] == 3
    assert 0.0 <= metrics["accuracy"] <= 1.0 and "blank_image_accuracy" in metrics and "accuracy" in metrics["ci95"]
