"""A LoRA finetune started from an earlier run's projector: export (adapters merged), eval and chat."""

from __future__ import annotations

import json
import math
from pathlib import Path
from statistics import mean

import pytest
import torch

from vistralv_ray.training.driver import train

pytestmark = pytest.mark.integration


def test_lora_run_exports_merged_evaluates_and_chats(
    ray_local, run_config, tiny_shards, demo_corpus, tmp_path, monkeypatch
):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vistralv_ray.data.runs import mark_complete
    from vistralv_ray.inference.chat import ChatSession, load_image, run_chat
    from vistralv_ray.inference.evaluate import evaluate
    from vistralv_ray.inference.export import export
    from vistralv_ray.inference.models import answer_matches, load_model
    from vistralv_ray.model.assembly import PROJECTOR_FILE, build_model, save_projector
    from vistralv_ray.training.hooks import PROBE_ENV
    from vistralv_ray.training.step import model_kwargs

    # An earlier "align run" under the same storage, whose projector the finetune starts from by name.
    base = run_config(stage="finetune")
    earlier = Path(base.run.storage) / "align-earlier" / "checkpoint-000004"
    earlier.mkdir(parents=True)
    save_projector(build_model(base.model).model, earlier / PROJECTOR_FILE)
    mark_complete(str(earlier), 4)

    monkeypatch.setenv(PROBE_ENV, str(tmp_path / "probe.pt"))
    cfg = run_config(
        "model.lora.enabled=true",
        "model.lora.r=8",
        "model.lora.alpha=16",
        "model.lora.dropout=0.0",
        "model.init_projector_from=align-earlier",
        "train.zero_stage=3",
        "train.max_steps=4",
        f"data.eval=[{tiny_shards['eval']}]",
        "run.name=lora",
        stage="finetune",
    )
    result = train(cfg)
    assert result.error is None
    resolved = (Path(result.path) / "config.yaml").read_text()
    assert str(earlier / PROJECTOR_FILE) in resolved  # the run name became that run's newest projector

    out = export(result.path, tmp_path / "export")
    with pytest.raises(FileExistsError):
        export(result.path, out)  # an existing export is never overwritten without --overwrite
    info = json.loads((out / "vistralv_export.json").read_text())
    assert info["lora_merged"] and info["stage"] == "finetune"
    # The run's newest checkpoint, named itself, exports the same weights.
    ckpt = Path(result.checkpoint.path)
    assert Path(info["source"]).name == ckpt.name and info["step"] == 4
    from_ckpt = export(str(ckpt), tmp_path / "from-checkpoint", dtype="float32", max_shard_size="100KB")
    assert json.loads((from_ckpt / "vistralv_export.json").read_text())["step"] == 4
    assert len(list(from_ckpt.glob("model-*.safetensors"))) > 1
    a = LlavaForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32).state_dict()
    b = LlavaForConditionalGeneration.from_pretrained(str(from_ckpt), dtype=torch.float32).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The real shards under a config that builds another model (a full finetune, no adapters) are refused.
    import shutil

    import yaml

    wrong = tmp_path / "wrong-config" / ckpt.name
    shutil.copytree(ckpt, wrong)
    saved = yaml.safe_load((wrong / "config.yaml").read_text())
    saved["model"]["lora"]["enabled"] = False
    (wrong / "config.yaml").write_text(yaml.safe_dump(saved, allow_unicode=True))
    with pytest.raises(ValueError, match="does not fit the model its config builds"):
        export(str(wrong), tmp_path / "wrong-export")
    assert not (tmp_path / "wrong-export").exists()
    model = LlavaForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32).eval()
    assert not any("lora" in name for name, _ in model.named_parameters())
    probe = torch.load(tmp_path / "probe.pt", weights_only=False)
    with torch.no_grad():
        logits = model(**model_kwargs(probe["batch"], torch.float32)).logits
    torch.testing.assert_close(logits, probe["logits"], rtol=1e-4, atol=1e-4)
    processor = AutoProcessor.from_pretrained(str(out))
    assert processor.tokenizer.padding_side == "left"  # batched generate in plain transformers
    assert model.generation_config.max_new_tokens >= 256
    assert model.generation_config.eos_token_id == processor.tokenizer.eos_token_id

    metrics = evaluate(out, str(demo_corpus["eval"]), tmp_path / "eval", limit=4, batch_size=2, max_new_tokens=6)
    lines = [json.loads(x) for x in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    records = json.loads(demo_corpus["eval"].read_text())[:4]
    assert len(lines) == metrics["questions"] == sum(len(r["conversations"]) // 2 for r in records)
    assert {line["id"] for line in lines} == {r["id"] for r in records}
    assert all(set(line) >= {"question", "reference", "prediction", "blank_prediction"} for line in lines)
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["blank_image_questions"] == saved["short_answer_questions"] == len(lines)
    assert 0 < saved["loss"] < 20 and saved["perplexity"] == pytest.approx(math.exp(saved["loss"]))
    # The accuracies are those of the written predictions (all demo answers are short).
    assert saved["accuracy"] == pytest.approx(mean(answer_matches(x["reference"], x["prediction"]) for x in lines))
    assert saved["blank_image_accuracy"] == pytest.approx(
        mean(answer_matches(x["reference"], x["blank_prediction"]) for x in lines)
    )

    # Shards stream through Ray Data; a record whose image is corrupt is counted, not a crash.
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = pq.read_table(next(Path(tiny_shards["eval"]).glob("*.parquet"))).slice(0, 2).to_pylist()
    rows[1] = {**rows[1], "id": "corrupt", "image": b"not an image"}
    (tmp_path / "eval_shards").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "eval_shards" / "part-00000.parquet")
    # Named as a file: a folder of shards without the manifest `prepare` writes last is refused.
    shard = str(tmp_path / "eval_shards" / "part-00000.parquet")
    metrics = evaluate(out, shard, tmp_path / "eval2", batch_size=2, max_new_tokens=4)
    assert metrics["rejected"] == {"unreadable_image": 1} and metrics["records"] == 2
    assert metrics["questions"] == sum(m["role"] == "assistant" for m in rows[0]["messages"])
    lines = [json.loads(x) for x in (tmp_path / "eval2" / "predictions.jsonl").read_text().splitlines()]
    assert {line["id"] for line in lines} == {rows[0]["id"]}

    session = ChatSession(load_model(out, "cpu"), image=load_image(demo_corpus["images"] / "eval_00000.jpg"))
    pieces: list[str] = []
    run_chat(session, "Hình trong ảnh có màu gì?", pieces.append, max_new_tokens=5)
    assert [m["role"] for m in session.messages] == ["user", "assistant"]
    assert session.messages[0]["content"].startswith("<image>\n")
    assert "".join(pieces).strip() == session.messages[1]["content"]
