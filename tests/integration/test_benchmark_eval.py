"""`vistralv-ray eval --benchmark openvivqa / mtvqa` end to end on a local Ray: the demo's held-out
questions written in the published layouts, the tiny export, every metric with its interval, the
blank-image control, the progress bar, and a rerun that resumes from the predictions already written."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.integration


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


def test_openvivqa_and_mtvqa_end_to_end(ray_local, export, demo_corpus, tmp_path, monkeypatch, capsys):
    from vistralv_ray.cli.main import main
    from vistralv_ray.data.demo import held_out_benchmark_files

    files = held_out_benchmark_files(demo_corpus["eval"], demo_corpus["images"], tmp_path)
    held_out = json.loads(files["openvivqa"].read_text(encoding="utf-8"))["annotations"]
    first = list(held_out)[:5]  # --limit 5: the file's first questions, in its order

    common = ["--blank-images", "--batch-size", "2", "--max-new-tokens", "4", "--resamples", "100", "--limit", "5"]
    out = tmp_path / "openvivqa-out"
    args = ["eval", str(export), "--benchmark", "openvivqa", "--data", str(files["openvivqa"])]
    args += ["--images", str(demo_corpus["images"])]
    capsys.readouterr()
    assert main([*args, "--out", str(out), *common, "--progress"]) == 0
    # The bar counts questions answered out of the total, on stderr (stdout keeps the table).
    err = capsys.readouterr().err
    assert "eval openvivqa" in err and "5/5" in err and "question" in err, err
    metrics = json.loads((out / "metrics.json").read_text())
    names = ["exact_match", "f1", "bleu_1", "bleu_2", "bleu_3", "bleu_4", "bleu", "rouge_l", "cider"]
    for name in names:
        assert 0.0 <= metrics[name] <= (10.0 if name == "cider" else 1.0)
        assert f"blank_image_{name}" in metrics
        lo, hi = metrics["ci95"][name]
        assert lo <= metrics[name] + 1e-9 and metrics[name] <= hi + 1e-9
    assert metrics["questions"] == metrics["blank_image_questions"] == 5
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in predictions] == first
    assert [p["references"] for p in predictions] == [[held_out[q]["answer"]] for q in first]
    assert all(p["blank_prediction"] is not None for p in predictions)

    # A rerun with the same settings asks nothing again and reports the same numbers.
    from vistralv_ray.evaluation import runner

    monkeypatch.setattr(runner, "_predict", lambda *a, **k: pytest.fail("a rerun asked answered questions again"))
    assert main([*args, "--out", str(out), *common]) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert {k: again[k] for k in names} == {k: metrics[k] for k in names}

    monkeypatch.undo()

    out = tmp_path / "mtvqa-out"
    args = ["eval", str(export), "--benchmark", "mtvqa", "--data", str(files["mtvqa"])]
    assert main([*args, "--out", str(out), *common]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["lang"] == "vi" and metrics["questions"] == metrics["blank_image_questions"] == 5
    for name in ("accuracy", "blank_image_accuracy"):
        assert 0.0 <= metrics[name] <= 1.0
        lo, hi = metrics["ci95"][name]
        assert lo <= metrics[name] + 1e-9 and metrics[name] <= hi + 1e-9
