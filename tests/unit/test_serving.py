"""The export as a user of plain transformers gets it, and our chat and eval on top of it, without Ray.

The exports here are written by `save_export` (what `vistralv-ray export` writes after gathering the
checkpoint) from a freshly assembled tiny model whose weights are spread wide enough that the answer
depends on the prompt: two ways of generating that should agree can then be told apart when they do not.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from vistralv_ray.config.schema import Config, ModelConfig
from vistralv_ray.data.images import decode_to_pixels
from vistralv_ray.inference.evaluate import EvalPredictor, load_eval_records, summarize
from vistralv_ray.inference.export import DEFAULT_MAX_NEW_TOKENS, build_generation_config, save_export

# A language model's own template (ChatML-like, with a generation prompt): the `native` case.
NATIVE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
QUESTIONS = ["Màu gì?", "Trong ảnh có bao nhiêu hình tròn màu đỏ và xanh?", "Hình ở bên trái hay bên phải?", "Có?"]
LONG_ANSWER = "Bức ảnh có ba hình tròn màu đỏ trên nền trắng."  # too long to count towards accuracy
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]


@pytest.fixture(scope="module")
def make_export(tiny_assets, tmp_path_factory, spread_weights):
    """make_export(template) -> (export directory, its ModelConfig); one export per template."""
    from transformers import AutoTokenizer

    from vistralv_ray.model.assembly import build_model

    made = {}

    def make(template: str = "vistral"):
        if template not in made:
            llm = tiny_assets["llm"]
            if template == "native":
                llm = tmp_path_factory.mktemp("native-llm")
                shutil.copytree(tiny_assets["llm"], llm, dirs_exist_ok=True)
                tokenizer = AutoTokenizer.from_pretrained(llm)
                tokenizer.chat_template = NATIVE_TEMPLATE
                tokenizer.save_pretrained(llm)
            mc = ModelConfig(
                language_model=str(llm), vision_tower=str(tiny_assets["vision"]), max_length=512, template=template
            )
            assembled = build_model(mc)
            spread_weights(assembled.model)
            out = tmp_path_factory.mktemp(f"export-{template}")
            save_export(assembled.model, assembled.tokenizer, assembled.chat_template, Config(model=mc), out)
            made[template] = out, mc
        return made[template]

    return make


@pytest.fixture(scope="module")
def plain(make_export):
    """The vistral export loaded the way a user loads it: plain transformers, nothing of ours."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    out, _ = make_export("vistral")
    model = LlavaForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(str(out))


def image_question(image: Image.Image, question: str) -> dict:
    return {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}


def plain_generate(model, processor, conversations: list[list[dict]], max_new_tokens: int) -> tuple[list, dict]:
    """(new token ids of each conversation, the inputs) by the documented transformers recipe."""
    inputs = processor.apply_chat_template(
        conversations,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"padding": True},
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[:, inputs["input_ids"].shape[1] :].tolist(), inputs


def test_export_pads_left_and_generates_with_the_language_models_settings(make_export):
    from transformers import AutoProcessor, AutoTokenizer, GenerationConfig, LlavaForConditionalGeneration

    out, _ = make_export("vistral")
    assert json.loads((out / "tokenizer_config.json").read_text())["padding_side"] == "left"
    assert AutoProcessor.from_pretrained(str(out)).tokenizer.padding_side == "left"
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.padding_side == "left"
    saved = GenerationConfig.from_pretrained(str(out))
    assert saved.max_new_tokens == DEFAULT_MAX_NEW_TOKENS >= 256  # a whole answer, not 20 tokens
    assert (saved.eos_token_id, saved.pad_token_id, saved.bos_token_id) == (
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        tokenizer.bos_token_id,
    )
    model = LlavaForConditionalGeneration.from_pretrained(str(out))
    assert model.generation_config.max_new_tokens == DEFAULT_MAX_NEW_TOKENS


def test_generation_config_keeps_the_language_models_settings_and_stop_ids(tiny_assets, tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny_assets["llm"])
    GenerationConfig(
        do_sample=True, temperature=0.6, top_p=0.95, eos_token_id=[7, tokenizer.eos_token_id]
    ).save_pretrained(tmp_path / "lm")
    config = build_generation_config(str(tmp_path / "lm"), tokenizer)
    assert (config.do_sample, config.temperature, config.top_p) == (True, 0.6, 0.95)
    assert config.eos_token_id == [tokenizer.eos_token_id, 7]  # ours first, the model's own kept
    assert config.max_new_tokens == DEFAULT_MAX_NEW_TOKENS
    GenerationConfig(max_new_tokens=64).save_pretrained(tmp_path / "long")
    assert build_generation_config(str(tmp_path / "long"), tokenizer).max_new_tokens == 64
    (tmp_path / "none").mkdir()
    config = build_generation_config(str(tmp_path / "none"), tokenizer)
    assert (config.max_new_tokens, config.eos_token_id) == (DEFAULT_MAX_NEW_TOKENS, tokenizer.eos_token_id)


def test_batched_greedy_generate_in_plain_transformers_matches_one_at_a_time(plain):
    model, processor = plain
    conversations = [
        [image_question(Image.new("RGB", (40 + 10 * i, 32), colour), question)]
        for i, (question, colour) in enumerate(zip(QUESTIONS, COLOURS))
    ]
    batched, inputs = plain_generate(model, processor, conversations, max_new_tokens=8)
    assert len(set(inputs["attention_mask"].sum(1).tolist())) == len(conversations)  # padding really happens
    one_by_one = [plain_generate(model, processor, [c], max_new_tokens=8)[0][0] for c in conversations]
    assert batched == one_by_one
    assert len({tuple(t) for t in batched}) > 1  # the answers depend on the prompt


@pytest.mark.parametrize("template", ["vistral", "plain", "native"])
def test_processor_token_ids_are_the_training_encoders(make_export, template):
    from transformers import AutoProcessor

    from vistralv_ray.text.encoder import build_encoder

    out, mc = make_export(template)
    processor = AutoProcessor.from_pretrained(str(out))
    image = Image.new("RGB", (48, 32), (200, 30, 30))
    if template == "native":  # our records' form: the image tag inside the text
        conversation = [
            {"role": "user", "content": "Có mấy hình?"},
            {"role": "assistant", "content": "Một."},
            {"role": "user", "content": "Màu gì?"},
            {"role": "assistant", "content": "Màu đỏ."},
        ]
        ours = conversation
    else:
        conversation = [
            image_question(image, "Màu gì?"),
            {"role": "assistant", "content": [{"type": "text", "text": "Màu đỏ."}]},
            {"role": "user", "content": [{"type": "text", "text": "Có mấy hình?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Một."}]},
        ]
        ours = [
            {"role": "user", "content": "<image>\nMàu gì?"},
            {"role": "assistant", "content": "Màu đỏ."},
            {"role": "user", "content": "Có mấy hình?"},
            {"role": "assistant", "content": "Một."},
        ]
    ids = processor.apply_chat_template(conversation, tokenize=True, return_dict=True, return_tensors="pt")
    training = build_encoder(mc).encode(ours)
    assert ids["input_ids"][0].tolist() == training.input_ids.tolist()


def eval_records(demo_corpus) -> list[dict]:
    """Four demo records (two short questions each), a text-only one and one with a long answer."""
    records, _ = load_eval_records(str(demo_corpus["eval"]), str(demo_corpus["images"]))
    text_only = [{"role": "user", "content": "Thủ đô của Việt Nam là gì?"}, {"role": "assistant", "content": "Hà Nội."}]
    long_answer = [
        {"role": "user", "content": "<image>\nHãy tả bức ảnh."},
        {"role": "assistant", "content": LONG_ANSWER},
        {"role": "user", "content": "Màu gì?"},
        {"role": "assistant", "content": "Màu đỏ."},
    ]
    return records[:4] + [
        {"id": "text-only", "image": None, "messages": json.dumps(text_only, ensure_ascii=False)},
        {"id": "long-answer", "image": records[4]["image"], "messages": json.dumps(long_answer, ensure_ascii=False)},
    ]


def as_batch(records: list[dict]) -> dict[str, np.ndarray]:
    batch = {k: np.empty(len(records), dtype=object) for k in ("id", "image", "messages")}
    for i, r in enumerate(records):
        for k in batch:
            batch[k][i] = r[k]
    return batch


def run_predictor(predictor: EvalPredictor, records: list[dict], batch_size: int) -> list[dict]:
    rows = []
    for start in range(0, len(records), batch_size):
        out = predictor(as_batch(records[start : start + batch_size]))
        rows += [dict(zip(out, values)) for values in zip(*out.values())]
    return rows


@pytest.mark.parametrize("template", ["vistral", "plain", "native"])
def test_eval_prompts_end_where_training_starts_the_answer(make_export, demo_corpus, template, monkeypatch):
    from vistralv_ray.text.conversation import normalize_messages
    from vistralv_ray.text.encoder import build_encoder

    out, mc = make_export(template)
    predictor = EvalPredictor(str(out), max_new_tokens=2, device="cpu")
    asked = []
    answer = predictor.answer
    monkeypatch.setattr(predictor, "answer", lambda prompts, images: asked.append(prompts) or answer(prompts, images))
    records = eval_records(demo_corpus)[:2]
    run_predictor(predictor, records, batch_size=2)
    encoder = build_encoder(mc)
    expected = []
    for r in records:
        messages = normalize_messages(json.loads(r["messages"]), has_image=True)
        for i in (1, 3):  # the assistant turns
            text, spans = encoder.render(messages[: i + 1])
            expected.append(text[: spans[-1][0]])  # everything before the answer's supervised span
    assert asked[0] == expected


def test_eval_predictions_do_not_depend_on_the_batch_size(make_export, demo_corpus):
    out, _ = make_export("vistral")
    predictor = EvalPredictor(str(out), max_new_tokens=6, device="cpu")
    records = eval_records(demo_corpus)
    ones = run_predictor(predictor, records, batch_size=1)
    fours = run_predictor(predictor, records, batch_size=4)
    assert len(ones) == len(fours) == 4 * 2 + 1 + 2
    assert [(r["id"], r["turn"]) for r in ones] == [(r["id"], r["turn"]) for r in fours]
    assert [r["prediction"] for r in ones] == [r["prediction"] for r in fours]
    assert [r["blank_prediction"] for r in ones] == [r["blank_prediction"] for r in fours]
    assert all(r["prediction"].strip() for r in ones)


def test_blank_control_asks_exactly_the_questions_accuracy_counts(make_export, demo_corpus, monkeypatch):
    out, _ = make_export("vistral")
    predictor = EvalPredictor(str(out), max_new_tokens=4, device="cpu")
    calls = []
    answer = predictor.answer
    monkeypatch.setattr(
        predictor, "answer", lambda prompts, images: calls.append((prompts, images)) or answer(prompts, images)
    )
    rows = run_predictor(predictor, eval_records(demo_corpus), batch_size=6)
    (prompts, images), (blank_prompts, blank_images) = calls
    assert len(prompts) == len(rows)  # one prompt per question, in the order of the rows
    # The control: every short-answer question with an image, its own prompt, and an all-white image.
    expected = [p for p, im, r in zip(prompts, images, rows) if im is not None and r["reference"] != LONG_ANSWER]
    assert blank_prompts == expected and len(expected) == 4 * 2 + 1
    assert all(np.asarray(im).min() == 255 for im in blank_images)

    long_answer = [r for r in rows if r["id"] == "long-answer"]
    assert long_answer[0]["blank_prediction"] is None and long_answer[1]["blank_prediction"] is not None
    text_only = next(r for r in rows if r["id"] == "text-only")
    assert text_only["blank_prediction"] == text_only["prediction"]  # nothing to blank

    metrics = summarize(rows, {})
    assert metrics["short_answer_questions"] == metrics["blank_image_questions"] == 4 * 2 + 1 + 1
    assert metrics["blank_image_replaced"] == 4 * 2 + 1


def rotated_jpeg() -> tuple[bytes, Image.Image]:
    """A JPEG stored sideways with EXIF "rotate 90 clockwise", and the upright image it shows."""
    upright = Image.new("RGB", (32, 32), (255, 255, 255))
    upright.paste((220, 20, 20), (0, 0, 32, 16))  # red on top
    upright.paste((20, 20, 220), (0, 16, 16, 32))  # blue bottom left
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 clockwise to display
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", quality=95, exif=exif)
    return buf.getvalue(), upright


def shows(image: Image.Image, expected: Image.Image) -> bool:
    # JPEG blurs the colour edges; a sideways image differs by half its area.
    return float(np.abs(np.asarray(image, dtype=float) - np.asarray(expected, dtype=float)).mean()) < 4


def normalised(pixels: np.ndarray, processor) -> torch.Tensor:
    mean = torch.tensor(processor.image_processor.image_mean)[:, None, None]
    std = torch.tensor(processor.image_processor.image_std)[:, None, None]
    return (torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255 - mean) / std


def test_chat_images_reach_the_model_as_training_decodes_them(plain, tmp_path):
    from vistralv_ray.inference.chat import load_image

    _, processor = plain
    data, upright = rotated_jpeg()
    (tmp_path / "photo.jpg").write_bytes(data)
    transparent = Image.new("RGBA", (32, 32), (0, 0, 0, 0))  # left half transparent black
    transparent.paste((200, 30, 30, 255), (16, 0, 32, 32))
    transparent.save(tmp_path / "logo.png")
    for name in ("photo.jpg", "logo.png"):
        chat_pixels = processor.image_processor(images=[load_image(tmp_path / name)], return_tensors="pt")
        training = decode_to_pixels((tmp_path / name).read_bytes(), 32, "resize")
        torch.testing.assert_close(chat_pixels["pixel_values"][0], normalised(training, processor), atol=1e-5, rtol=0)
    assert shows(load_image(tmp_path / "photo.jpg"), upright)
    assert not shows(Image.open(tmp_path / "photo.jpg").convert("RGB"), upright)  # the photo is stored sideways
    assert (np.asarray(load_image(tmp_path / "logo.png"))[:, :16] == 255).all()  # transparency over white


def test_chat_command_loads_the_image_as_training_does(make_export, tmp_path, monkeypatch, capsys):
    from vistralv_ray.cli import infer
    from vistralv_ray.inference import chat as chat_module

    seen = []

    class RecordingSession(chat_module.ChatSession):
        def __init__(self, loaded, image=None, system=None):
            seen.append(image)
            super().__init__(loaded, image=image, system=system)

    monkeypatch.setattr(chat_module, "ChatSession", RecordingSession)
    data, upright = rotated_jpeg()
    (tmp_path / "photo.jpg").write_bytes(data)
    out, _ = make_export("vistral")
    args = argparse.Namespace(
        model=str(out),
        image=tmp_path / "photo.jpg",
        prompt="Màu gì?",
        system=None,
        max_new_tokens=3,
        temperature=0.0,
        top_p=0.9,
        device="cpu",
    )
    assert infer.chat(args) == 0
    assert np.array_equal(np.asarray(seen[0]), np.asarray(chat_module.load_image(tmp_path / "photo.jpg")))
    assert shows(seen[0], upright)
    assert capsys.readouterr().out.endswith("\n")


def test_streamed_chat_is_plain_greedy_generate_and_keeps_the_history(make_export, plain, monkeypatch):
    from vistralv_ray.inference.chat import ChatSession
    from vistralv_ray.inference.models import load_model

    model, processor = plain
    out, _ = make_export("vistral")
    loaded = load_model(out, "cpu")
    prompts = []
    generate = loaded.model.generate
    monkeypatch.setattr(loaded.model, "generate", lambda **kw: prompts.append(kw["input_ids"]) or generate(**kw))
    image = Image.new("RGB", (48, 32), (30, 200, 30))
    session = ChatSession(loaded, image=image)

    first = list(session.ask("Màu gì?", max_new_tokens=8))
    assert len(first) > 1  # streamed in pieces
    history = [image_question(image, "Màu gì?")]
    ids, _ = plain_generate(model, processor, [history], max_new_tokens=8)
    assert "".join(first).strip() == processor.tokenizer.decode(ids[0], skip_special_tokens=True).strip()

    second = "".join(session.ask("Có mấy hình?", max_new_tokens=8))
    history += [
        {"role": "assistant", "content": [{"type": "text", "text": session.messages[1]["content"]}]},
        {"role": "user", "content": [{"type": "text", "text": "Có mấy hình?"}]},
    ]
    ids, inputs = plain_generate(model, processor, [history], max_new_tokens=8)
    assert prompts[1].tolist() == inputs["input_ids"].tolist()  # the second turn was asked with the first
    assert second.strip() == processor.tokenizer.decode(ids[0], skip_special_tokens=True).strip()
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]


def test_older_exports_that_pad_right_are_loaded_padding_left(make_export, tmp_path):
    from vistralv_ray.inference.models import load_model

    out, _ = make_export("vistral")
    old = tmp_path / "old"
    shutil.copytree(out, old)
    config = json.loads((old / "tokenizer_config.json").read_text())
    (old / "tokenizer_config.json").write_text(json.dumps({**config, "padding_side": "right"}))
    assert load_model(old, "cpu").tokenizer.padding_side == "left"
