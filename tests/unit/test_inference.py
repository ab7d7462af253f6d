"""Export pieces, answer matching and eval bookkeeping, without Ray or training."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from vistralv_ray.config.schema import Config
from vistralv_ray.inference.evaluate import load_eval_records, questions_of, summarize
from vistralv_ray.inference.models import answer_matches, normalize_answer


def test_answer_matching_ignores_case_and_punctuation_but_not_diacritics():
    assert normalize_answer("  Màu ĐỎ. ") == "màu đỏ"
    assert answer_matches("Màu đỏ.", "màu đỏ")
    assert answer_matches("Bên trái.", "Hình ở bên trái của ảnh.")
    assert not answer_matches("Màu đỏ.", "Mau do.")  # diacritics carry meaning in Vietnamese
    assert not answer_matches("Màu xanh lá.", "Màu xanh dương.")
    assert not answer_matches("Hai.", "Haiku")  # whole words only
    assert not answer_matches("", "anything")
    # Old and new tone placement in "oa", "oe", "uy" spell one word; elsewhere the tone is part of it.
    assert answer_matches("Hòa.", "hoà") and answer_matches("Thuỷ", "Thủy.") and answer_matches("khỏe", "Khoẻ")
    assert normalize_answer("hoàng") == "hoàng" and not answer_matches("Hòa.", "hóa")


def test_questions_of_keeps_earlier_answers_as_history():
    messages = [
        {"role": "user", "content": "<image>\nMàu gì?"},
        {"role": "assistant", "content": "Màu đỏ."},
        {"role": "user", "content": "Mấy hình?"},
        {"role": "assistant", "content": "Hai."},
    ]
    out = questions_of(messages)
    assert [(len(p), q, a) for p, q, a in out] == [(1, "Màu gì?", "Màu đỏ."), (3, "Mấy hình?", "Hai.")]


def test_summarize_counts_blank_accuracy_over_the_questions_accuracy_counts():
    rows = [
        {
            "reference": "Màu đỏ.",
            "prediction": "Màu đỏ.",
            "blank_prediction": "Màu vàng.",
            "has_image": True,
            "loss_sum": 6.0,
            "loss_tokens": 3,
        },
        {
            "reference": "Hai.",
            "prediction": "Ba.",
            "blank_prediction": "Hai.",
            "has_image": True,
            "loss_sum": 0.0,
            "loss_tokens": 0,
        },
        {
            "reference": "Hà Nội.",
            "prediction": "Hà Nội.",
            "blank_prediction": "Hà Nội.",  # no image to blank: the predictor keeps its answer
            "has_image": False,
            "loss_sum": 3.0,
            "loss_tokens": 3,
        },
        {
            "reference": "một câu trả lời dài hơn sáu từ rất nhiều",
            "prediction": "x",
            "blank_prediction": None,
            "has_image": False,
            "loss_sum": 0.0,
            "loss_tokens": 0,
        },
    ]
    m = summarize(rows, {"missing_image": 1})
    assert m["questions"] == 4 and m["short_answer_questions"] == 3
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["blank_image_questions"] == 3 and m["blank_image_replaced"] == 2
    assert m["blank_image_accuracy"] == pytest.approx(2 / 3)
    assert m["loss"] == pytest.approx(9.0 / 6) and m["perplexity"] == pytest.approx(np.exp(1.5))
    assert m["rejected"] == {"missing_image": 1}


def test_eval_records_from_llava_json_count_what_they_reject(demo_corpus, tmp_path):
    records = json.loads(demo_corpus["eval"].read_text())[:3]
    records.append({"id": "broken", "image": "missing.jpg", "conversations": records[0]["conversations"]})
    records.append({"id": "noanswer", "conversations": [{"from": "human", "value": "Xin chào"}]})
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(records, ensure_ascii=False))
    loaded, rejected = load_eval_records(str(path), str(demo_corpus["images"]))
    assert [r["id"] for r in loaded] == [r["id"] for r in records[:3]]
    assert all(r["image"][:2] == b"\xff\xd8" for r in loaded)  # JPEG bytes
    assert rejected == {"missing_image": 1, "no_assistant_turn": 1}


def test_exported_processor_reproduces_training_token_ids_and_image_tokens(tiny_model_config, tmp_path):
    from transformers import AutoProcessor

    from vistralv_ray.inference.export import build_processor
    from vistralv_ray.text.encoder import build_encoder, build_tokenizer, load_vision_config

    tokenizer, template = build_tokenizer(tiny_model_config)
    vision = load_vision_config(tiny_model_config.vision_tower)
    cfg = Config(model=tiny_model_config)
    build_processor(cfg, tokenizer, template, vision).save_pretrained(tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path)  # what a user of the export gets

    # Noise, not a flat colour: a flat image comes out the same through any resampling filter.
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8))
    chat = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Màu gì?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Màu đỏ."}]},
        {"role": "user", "content": [{"type": "text", "text": "Có mấy hình?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Một."}]},
    ]
    out = processor.apply_chat_template(
        chat, tokenize=True, return_dict=True, return_tensors="pt", return_assistant_tokens_mask=True
    )
    training = build_encoder(tiny_model_config).encode(
        [
            {"role": "user", "content": "<image>\nMàu gì?"},
            {"role": "assistant", "content": "Màu đỏ."},
            {"role": "user", "content": "Có mấy hình?"},
            {"role": "assistant", "content": "Một."},
        ]
    )
    assert out["input_ids"][0].tolist() == training.input_ids.tolist()
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert int((out["input_ids"][0] == image_id).sum()) == (vision.image_size // vision.patch_size) ** 2
    assert np.array_equal(np.asarray(out["assistant_masks"][0]).astype(bool), training.labels != -100)
    # pad aspect: the pixels of training's decode path (padded with the image mean, then resized), to
    # within 2 levels of 255; tests/unit/test_pixel_parity.py covers formats, sizes, EXIF and alpha.
    from vistralv_ray.data.images import decode_to_pixels, pixel_stats
    from vistralv_ray.training.step import normalize_pixels

    png = io.BytesIO()
    image.save(png, format="PNG")
    stats = pixel_stats(tiny_model_config.vision_tower)
    pixels = decode_to_pixels(png.getvalue(), vision.image_size, "pad", fill=stats.fill)
    training_values = normalize_pixels(torch.from_numpy(pixels.copy())[None], torch.float32, stats)
    assert out["pixel_values"].shape == training_values.shape == (1, 3, vision.image_size, vision.image_size)
    assert (out["pixel_values"] - training_values).abs().max() <= 2 / 255 / min(stats.std) + 1e-5


def test_projector_source_resolves_run_names_runs_and_checkpoints(tiny_model_config, tmp_path):
    from vistralv_ray.data.runs import mark_complete
    from vistralv_ray.model.assembly import (
        PROJECTOR_FILE,
        build_model,
        load_projector,
        resolve_projector_uri,
        save_projector,
    )

    assembled = build_model(tiny_model_config)
    run = tmp_path / "runs" / "align-seed0"
    for step in (2, 10):
        (run / f"checkpoint-{step:06d}").mkdir(parents=True)
        save_projector(assembled.model, run / f"checkpoint-{step:06d}" / PROJECTOR_FILE)
        mark_complete(str(run / f"checkpoint-{step:06d}"), step)
    newest = str(run / "checkpoint-000010" / PROJECTOR_FILE)
    assert resolve_projector_uri("align-seed0", str(tmp_path / "runs")) == newest
    assert resolve_projector_uri(str(run)) == newest
    assert resolve_projector_uri(str(run / "checkpoint-000002")).endswith("checkpoint-000002/" + PROJECTOR_FILE)
    with pytest.raises(FileNotFoundError, match="init_projector_from"):
        resolve_projector_uri("no-such-run", str(tmp_path / "runs"))

    fresh = build_model(tiny_model_config).model
    with torch.no_grad():
        fresh.model.multi_modal_projector.linear_1.weight.add_(1.0)
    load_projector(fresh, newest)
    torch.testing.assert_close(
        fresh.model.multi_modal_projector.linear_1.weight, assembled.model.model.multi_modal_projector.linear_1.weight
    )
