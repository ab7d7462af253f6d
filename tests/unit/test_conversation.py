"""Templates, tokenization and label masking, checked against hand-built token sequences."""

from __future__ import annotations

import numpy as np
import pytest

from vistralv_ray.errors import RecordError
from vistralv_ray.text.conversation import IGNORE_INDEX, ConversationEncoder, normalize_messages
from vistralv_ray.text.templates import VISTRAL_SYSTEM_PROMPT, get_chat_template
from vistralv_ray.text.tokenizer import load_tokenizer, prepare_tokenizer

IMAGE_TOKENS = 16

TWO_TURNS = [
    {"from": "human", "value": "Hình này màu gì?\n<image>"},
    {"from": "gpt", "value": "Màu đỏ."},
    {"from": "human", "value": "Có mấy hình?"},
    {"from": "gpt", "value": "Hai."},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_assets):
    return load_tokenizer(str(tiny_assets["llm"]))


def encoder_for(tokenizer, name, system=None, max_length=512):
    template = get_chat_template(name, system)
    tok = prepare_tokenizer(tokenizer, template)
    return ConversationEncoder(tok, template, IMAGE_TOKENS, max_length)


def segment_ids(tokenizer, segments):
    """Token ids and labels built by hand: each (text, supervised) segment tokenized on its own."""
    ids, labels = [], []
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    for text, supervised in segments:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        if piece == [image_id]:
            piece = piece * IMAGE_TOKENS
        ids += piece
        labels += piece if supervised else [IGNORE_INDEX] * len(piece)
    return np.array(ids), np.array(labels)


def test_vistral_renders_reference_string(tokenizer):
    enc = encoder_for(tokenizer, "vistral", system="{system}")
    messages = [
        {"role": "user", "content": "<image>\n{q1}"},
        {"role": "assistant", "content": "{a1}"},
        {"role": "user", "content": "{q2}"},
        {"role": "assistant", "content": "{a2}"},
    ]
    text, _ = enc.render(messages)
    expected = "<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n<image>\n{q1} [/INST] {a1} </s>[INST] {q2} [/INST] {a2} </s>"
    assert text == expected


def test_default_system_prompt_is_vistral_v(tokenizer):
    enc = encoder_for(tokenizer, "vistral")
    text, _ = enc.render(normalize_messages(TWO_TURNS, has_image=True))
    assert f"<<SYS>>\n{VISTRAL_SYSTEM_PROMPT}\n<</SYS>>" in text
    assert "tò mò" in text and "lịch sự" in text


def test_multi_turn_labels_mask_exactly_non_answers_and_image_tag_moves_to_front(tokenizer):
    enc = encoder_for(tokenizer, "vistral", system="Hệ thống.")
    out = enc.encode(normalize_messages(TWO_TURNS, has_image=True))
    ids, labels = segment_ids(
        tokenizer,
        [
            ("<s>", False),
            ("[INST] <<SYS>>\nHệ thống.\n<</SYS>>\n\n", False),
            ("<image>", False),
            ("\nHình này màu gì? [/INST]", False),
            (" Màu đỏ. </s>", True),
            ("[INST] Có mấy hình? [/INST]", False),
            (" Hai. </s>", True),
        ],
    )
    np.testing.assert_array_equal(out.input_ids, ids)
    np.testing.assert_array_equal(out.labels, labels)
    assert tokenizer.decode(out.labels[out.labels != IGNORE_INDEX]) == " Màu đỏ. </s> Hai. </s>"
    assert (out.input_ids == tokenizer.convert_tokens_to_ids("<image>")).sum() == IMAGE_TOKENS


def test_text_only_record(tokenizer):
    enc = encoder_for(tokenizer, "vistral", system="S")
    messages = normalize_messages(
        [{"from": "human", "value": "Xin chào"}, {"from": "gpt", "value": "Chào bạn."}], has_image=False
    )
    out = enc.encode(messages)
    ids, labels = segment_ids(
        tokenizer,
        [("<s>", False), ("[INST] <<SYS>>\nS\n<</SYS>>\n\nXin chào [/INST]", False), (" Chào bạn. </s>", True)],
    )
    np.testing.assert_array_equal(out.input_ids, ids)
    np.testing.assert_array_equal(out.labels, labels)


def test_plain_alignment_template(tokenizer):
    enc = encoder_for(tokenizer, "plain")
    messages = normalize_messages(
        [{"from": "human", "value": "Mô tả ảnh.\n<image>"}, {"from": "gpt", "value": "Một hình tròn màu đỏ."}], True
    )
    text, _ = enc.render(messages)
    assert text == "<s><image>Một hình tròn màu đỏ.\n"
    out = enc.encode(messages)
    ids, labels = segment_ids(tokenizer, [("<s>", False), ("<image>", False), ("Một hình tròn màu đỏ.\n", True)])
    np.testing.assert_array_equal(out.input_ids, ids)
    np.testing.assert_array_equal(out.labels, labels)


@pytest.mark.parametrize("name", ["vistral", "plain"])
def test_stored_template_reproduces_training_ids(tokenizer, name):
    enc = encoder_for(tokenizer, name)
    messages = normalize_messages(TWO_TURNS, has_image=True)
    trained = enc.encode(messages)
    # What an exported tokenizer / processor does: apply the stored chat template, expand <image>.
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    for conversation in (
        messages,
        [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hình này màu gì?"}]},
            *messages[1:],
        ],
    ):
        ids = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"]
        expanded = np.repeat(ids, np.where(np.array(ids) == image_id, IMAGE_TOKENS, 1))
        np.testing.assert_array_equal(expanded, trained.input_ids)


def test_native_template_masks_by_prefixes(tokenizer):
    native = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{% endif %}"
    )
    tok = prepare_tokenizer(tokenizer, native)
    enc = ConversationEncoder(tok, native, IMAGE_TOKENS, 512)
    out = enc.encode(normalize_messages(TWO_TURNS, has_image=True))
    assert tokenizer.decode(out.labels[out.labels != IGNORE_INDEX]) == " Màu đỏ.</s> Hai.</s>"


@pytest.mark.parametrize(
    "turns, has_image, reason",
    [
        ([{"from": "human", "value": "chỉ hỏi"}], False, "no_assistant_turn"),
        ([{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}], False, "roles_out_of_order"),
        ([{"from": "human", "value": "<image> <image> q"}, {"from": "gpt", "value": "a"}], True, "too_many_image_tags"),
        ([{"from": "human", "value": "<image> q"}, {"from": "gpt", "value": "a"}], False, "too_many_image_tags"),
        ([{"from": "human", "value": "q"}, {"from": "gpt", "value": "   "}], False, "empty_text"),
        ([{"from": "robot", "value": "q"}], False, "malformed_record"),
        ([{"from": "human", "value": "q"}, {"from": "gpt", "value": "<image> a"}], True, "malformed_record"),
        (
            [{"from": "system", "value": "<image>"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
            True,
            "malformed_record",
        ),
        (
            [
                {"from": "human", "value": "<image> q"},
                {"from": "gpt", "value": "a"},
                {"from": "human", "value": "<image>"},
                {"from": "gpt", "value": "b"},
            ],
            True,
            "too_many_image_tags",
        ),
    ],
)
def test_bad_conversations_are_rejected_with_reason(turns, has_image, reason):
    with pytest.raises(RecordError) as err:
        normalize_messages(turns, has_image)
    assert err.value.reason == reason


def test_too_long_after_image_expansion(tokenizer):
    messages = normalize_messages(TWO_TURNS, has_image=True)
    full = encoder_for(tokenizer, "vistral").encode(messages).input_ids
    length, image_id = full.size, tokenizer.convert_tokens_to_ids("<image>")
    text, _ = encoder_for(tokenizer, "vistral").render(messages)
    unexpanded = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert (full == image_id).sum() == IMAGE_TOKENS and length == unexpanded + IMAGE_TOKENS - 1
    # Exactly max_length fits, whole; one token less is too long, and so is the length of the text
    # before its <image> is expanded (a check before expansion would let it through).
    fits = encoder_for(tokenizer, "vistral", max_length=length).encode(messages)
    np.testing.assert_array_equal(fits.input_ids, full)
    for max_length in (length - 1, unexpanded):
        with pytest.raises(RecordError) as err:
            encoder_for(tokenizer, "vistral", max_length=max_length).encode(messages)
        assert err.value.reason == "too_long"
        assert f"{length} tokens" in str(err.value) and f"max_length {max_length}" in str(err.value)


def test_image_tag_in_a_later_turn_moves_to_the_front_once(tokenizer):
    # One image, its tag in the second question: one block of image tokens, before the first question.
    enc = encoder_for(tokenizer, "vistral", system="S")
    turns = [dict(t) for t in TWO_TURNS]
    turns[0] = {"from": "human", "value": "Hình này màu gì?"}
    turns[2] = {"from": "human", "value": "Có mấy hình? <image>"}
    messages = normalize_messages(turns, has_image=True)
    assert messages[0]["content"] == "<image>\nHình này màu gì?" and messages[2]["content"] == "Có mấy hình?"
    expected = enc.encode(normalize_messages(TWO_TURNS, has_image=True))
    np.testing.assert_array_equal(enc.encode(messages).input_ids, expected.input_ids)
