"""Control tokens in data: a literal `</s>`, `<s>`, `[INST]`, `<<SYS>>`, a second `<image>` or any special
token of the tokenizer in a question or answer is rejected (`control_token_in_text`), never tokenized as
a special token; with the tiny byte-level BPE and a SentencePiece-style (Metaspace) tokenizer like Vistral's."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from vistralv_ray.data.prepare import PrepareOptions, prepare
from vistralv_ray.errors import RecordError
from vistralv_ray.text.conversation import ConversationEncoder, normalize_messages
from vistralv_ray.text.encoder import build_encoder
from vistralv_ray.text.templates import VISTRAL_SYSTEM_PROMPT, get_chat_template
from vistralv_ray.text.tokenizer import prepare_tokenizer

CONTROLS = ["</s>", "<s>", "<unk>", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"]
# Text that looks like a control token but is not one: kept, and tokenized as text.
LOOK_ALIKES = "<S> và < /s>, [inst] hay INST, <<SYS> hoặc <image nhé"

TEXTS = [
    "Bức ảnh cho thấy một con mèo màu cam đang ngủ trên ghế sofa. Ảnh có gì? Một chiếc ghế. Còn gì nữa?",
    "Trong ảnh có bao nhiêu người? Có ba người đang đứng cạnh chiếc xe máy.",
    "Màu của bầu trời là gì? Bầu trời màu xanh nhạt, có vài đám mây trắng.",
    "[INST] <<SYS>> <</SYS>> [/INST] <s> </s> < S > INST SYS image hay và hoặc nhé",
    VISTRAL_SYSTEM_PROMPT,
    LOOK_ALIKES,
]


def sentencepiece_style_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama/Vistral-style tokenizer built here: BPE over Metaspace pieces (`▁` marks a word start), with
    <unk>/<s>/</s> as its only special tokens, so `[INST]` and `<<SYS>>` are plain text to it, as to Vistral's."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    alphabet = sorted({c for t in TEXTS for c in t} | set("0123456789.,?!:;'\"()-\n"))
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(TEXTS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    return prepare_tokenizer(fast, get_chat_template("vistral"))


@pytest.fixture(scope="module")
def sp_encoder() -> ConversationEncoder:
    tok = sentencepiece_style_tokenizer()
    return ConversationEncoder(tok, tok.chat_template, image_seq_length=4, max_length=1024)


@pytest.fixture()
def tiny_encoder(tiny_model_config) -> ConversationEncoder:
    return build_encoder(tiny_model_config)


def chat(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def test_the_hazard_is_real_a_plain_tokenizer_call_makes_a_literal_eos_special(sp_encoder, tiny_encoder):
    # What rejecting guards against: tokenized as part of the rendered text, `</s>` is the EOS id.
    for encoder in (sp_encoder, tiny_encoder):
        tok = encoder.tokenizer
        assert tok.eos_token_id in tok("Trả lời </s> tiếp", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("control", CONTROLS + ["<image>"])
@pytest.mark.parametrize("where", ["question", "answer"])
def test_a_control_token_in_a_question_or_answer_is_rejected(control, where):
    question = "<image>\nMàu gì?"  # the record's one image tag, where it belongs
    if where == "question":
        turns = chat(f"{question} {control}", "Màu đỏ.")
    else:
        turns = chat(question, f"Màu {control} đỏ.")
    with pytest.raises(RecordError) as e:
        normalize_messages(turns, has_image=True)
    assert e.value.reason == ("control_token_in_text" if control != "<image>" else "too_many_image_tags")


@pytest.mark.parametrize("kind", ["sentencepiece-style", "tiny"])
def test_the_encoder_rejects_every_special_token_of_its_tokenizer(tiny_model_config, kind):
    tok = sentencepiece_style_tokenizer() if kind != "tiny" else build_encoder(tiny_model_config).tokenizer
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})  # another model's control token
    encoder = ConversationEncoder(tok, tok.chat_template, 4, 1024)
    for control in ["</s>", "<s>", "<unk>", "<|im_end|>"]:
        with pytest.raises(RecordError, match="control_token_in_text"):
            encoder.encode(chat("Màu gì?", f"Màu {control} đỏ."))


@pytest.mark.parametrize("encoder_name", ["sp_encoder", "tiny_encoder"])
def test_look_alikes_stay_text_and_special_ids_are_only_where_the_template_puts_them(request, encoder_name):
    encoder = request.getfixturevalue(encoder_name)
    tok = encoder.tokenizer
    turns = [
        {"from": "human", "value": f"<image>\nẢnh có gì? {LOOK_ALIKES}"},
        {"from": "gpt", "value": f"Một con mèo. {LOOK_ALIKES}"},
        {"from": "human", "value": "Còn gì nữa?"},
        {"from": "gpt", "value": "Một chiếc ghế."},
    ]
    encoded = encoder.encode(normalize_messages(turns, has_image=True))
    ids = encoded.input_ids
    special = {tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, encoder.image_token_id}
    where = {i: int(t) for i, t in enumerate(ids) if int(t) in special}
    assert [t for t in where.values() if t == tok.bos_token_id] == [tok.bos_token_id] and ids[0] == tok.bos_token_id
    assert sum(t == tok.eos_token_id for t in where.values()) == 2  # one per answer
    assert sum(t == encoder.image_token_id for t in where.values()) == encoder.image_seq_length
    assert tok.unk_token_id not in where.values()
    # Each EOS closes an answer: it carries loss, and it is the last supervised token of its span.
    eos_at = np.flatnonzero(ids == tok.eos_token_id)
    assert (encoded.labels[eos_at] == tok.eos_token_id).all()
    text = tok.decode(ids[ids != encoder.image_token_id])
    assert text.count(LOOK_ALIKES) == 2  # the look-alikes survive as the text they were


def test_prepare_counts_control_token_rejections_in_the_manifest(tmp_path, tiny_model_config):
    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (16, 16), (0, 90, 200)).save(root / "a.jpg")
    records = [{"id": "ok", "image": "a.jpg", "conversations": [{"from": "human", "value": f"<image>\n{LOOK_ALIKES}"},
                                                                 {"from": "gpt", "value": "Xanh."}]}]  # fmt: skip
    for n, control in enumerate(CONTROLS):
        records.append(
            {"id": f"c{n}", "conversations": [{"from": "human", "value": "Hỏi"}, {"from": "gpt", "value": control}]}
        )
    src = tmp_path / "data.json"
    src.write_text(json.dumps(records, ensure_ascii=False))
    opts = PrepareOptions(str(root), str(tmp_path / "out"), model=tiny_model_config)
    manifest = prepare(src, opts, parallel=False, progress=False)
    assert manifest["records_out"] == 1 and manifest["rejected"] == {"control_token_in_text": len(CONTROLS)}
