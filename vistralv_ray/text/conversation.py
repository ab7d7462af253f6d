"""Conversations: normalise roles and the `<image>` tag, render with the chat template, tokenize, mask.

`ConversationEncoder.encode` is the one place where a conversation becomes `input_ids` and `labels`:
labels keep the tokens of assistant answers (and their end-of-sequence token) and mask everything
else with -100; each `<image>` token is expanded to the number of image features the model makes.

Control tokens in data are rejected, not escaped (`control_token_in_text`): a question or answer that
holds `</s>`, `<s>`, `[INST]`, `<<SYS>>`, a second `<image>` or any special token of the tokenizer would
otherwise be read as one (an end of sequence in mid-answer, a fake turn). Escaping cannot keep the
training ids equal to what `apply_chat_template` makes of the same text after export; rejecting can.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from transformers.utils.chat_template_utils import render_jinja_template

from vistralv_ray.config.schema import DEFAULT_MAX_MESSAGE_CHARS, DEFAULT_MAX_RECORD_CHARS
from vistralv_ray.errors import RecordError
from vistralv_ray.text.templates import IMAGE_TOKEN

IGNORE_INDEX = -100
# Llama/Mistral special tokens and the markers of our Vistral template: as text in a record they would
# fake a turn boundary even where the tokenizer does not know them as special (SentencePiece's [INST]).
CONTROL_STRINGS = ("<s>", "</s>", "<unk>", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")

_ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "system": "system",
}


def normalize_messages(
    turns: list[dict],
    has_image: bool,
    max_message_chars: int = DEFAULT_MAX_MESSAGE_CHARS,
    max_record_chars: int = DEFAULT_MAX_RECORD_CHARS,
) -> list[dict]:
    """LLaVA (`from`/`value`) or chat (`role`/`content`) turns -> checked `role`/`content` messages.

    The `<image>` tag is moved to the front of the first user turn (added there if the record has
    an image but no tag), as LLaVA does; roles must alternate user/assistant after an optional system.
    A message over `max_message_chars` characters, or messages over `max_record_chars` in all, is
    `text_too_long` (checked first: nothing else scans an oversized text).
    """
    if not isinstance(turns, list) or not turns:
        raise RecordError("malformed_record", "conversation is missing or empty")
    total = 0
    for i, turn in enumerate(turns):
        content = turn.get("content", turn.get("value")) if isinstance(turn, dict) else None
        if isinstance(content, str):
            if len(content) > max_message_chars:
                raise RecordError("text_too_long", f"turn {i} has {len(content):,} characters > {max_message_chars:,}")
            total += len(content)
    if total > max_record_chars:
        raise RecordError("text_too_long", f"the messages have {total:,} characters in all > {max_record_chars:,}")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError("malformed_record", f"turn {i} is not a mapping")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if not isinstance(role, str) or role not in _ROLE_ALIASES:  # a list or mapping is unhashable
            raise RecordError("malformed_record", f"turn {i} has unknown role {role!r:.80}")
        if not isinstance(content, str):
            raise RecordError("malformed_record", f"turn {i} content is not text")
        messages.append({"role": _ROLE_ALIASES[role], "content": content})
        reject_control_strings(content, CONTROL_STRINGS, f"turn {i}")

    body = messages[1:] if messages[0]["role"] == "system" else messages
    for i, msg in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if msg["role"] != expected:
            raise RecordError("roles_out_of_order", f"turn {i} is {msg['role']!r}, expected {expected!r}")
    if not any(m["role"] == "assistant" for m in body):
        raise RecordError("no_assistant_turn", "the conversation has no assistant answer")
    if body[-1]["role"] != "assistant":
        body = body[:-1]  # a trailing question without answer teaches nothing; drop the turn, not the record

    tags = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    n_images = 1 if has_image else 0
    if tags > n_images:
        raise RecordError("too_many_image_tags", f"{tags} <image> tags for {n_images} image(s)")
    for i, msg in enumerate(messages):
        if IMAGE_TOKEN in msg["content"] and msg["role"] != "user":
            raise RecordError("malformed_record", f"turn {i} ({msg['role']}) holds an {IMAGE_TOKEN} tag")
    for i, msg in enumerate(body):
        if not msg["content"].replace(IMAGE_TOKEN, "").strip():
            raise RecordError("empty_text", f"turn {i} ({msg['role']}) has no text")

    if has_image:
        # Wherever the question put it (after the text, in a later turn), the image goes first.
        for msg in body:
            if IMAGE_TOKEN in msg["content"]:
                msg["content"] = msg["content"].replace(IMAGE_TOKEN, "").strip()
        body[0]["content"] = f"{IMAGE_TOKEN}\n{body[0]['content'].strip()}"
    head = [messages[0]] if messages[0]["role"] == "system" else []
    return head + body


def reject_control_strings(text: str, controls, where: str) -> None:
    """RecordError `control_token_in_text` if `text` holds one of `controls` (case as written: `<S>` is text)."""
    for control in controls:
        if control in text:
            raise RecordError("control_token_in_text", f"{where} holds the control token {control!r} as text")


@dataclass
class EncodedConversation:
    input_ids: np.ndarray  # int32, image tokens expanded
    labels: np.ndarray  # int32, IGNORE_INDEX outside assistant answers

    @property
    def num_target_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


class ConversationEncoder:
    """Renders, tokenizes and masks conversations for one tokenizer, template and image-token count."""

    def __init__(self, tokenizer, chat_template: str, image_seq_length: int, max_length: int):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.image_seq_length = image_seq_length
        self.max_length = max_length
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {IMAGE_TOKEN} token; build it with model.assembly.prepare_tokenizer")
        self._special = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
        # Every token the tokenizer matches as a whole before tokenizing (special or added), the model's
        # own (<|im_end|>, <pad>...) too; `<image>` is counted by normalize_messages instead.
        added = [t.content for t in tokenizer.added_tokens_decoder.values()]
        self._controls = sorted({*tokenizer.all_special_tokens, *added} - {IMAGE_TOKEN}, key=len, reverse=True)
        self._has_generation = "generation" in chat_template and "endgeneration" in chat_template

    def render(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the character spans that carry loss."""
        if self._has_generation:
            rendered, spans = render_jinja_template(
                conversations=[messages],
                chat_template=self.chat_template,
                return_assistant_tokens_mask=True,
                **self._special,
            )
            return rendered[0], list(spans[0])
        return self._render_by_prefixes(messages)

    def _render_by_prefixes(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        # A template without generation blocks (a model's own): an answer's span is what rendering
        # its message adds to the rendering of the conversation before it plus the generation prompt.
        def render(msgs, prompt):
            out, _ = render_jinja_template(
                conversations=[msgs], chat_template=self.chat_template, add_generation_prompt=prompt, **self._special
            )
            return out[0]

        full = render(messages, False)
        spans = []
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            before = render(messages[:i], True)
            upto = render(messages[: i + 1], False)
            if not full.startswith(upto) or not upto.startswith(before):
                raise ValueError("the native chat template does not render conversations incrementally")
            spans.append((len(before), len(upto)))
        return full, spans

    def encode(self, messages: list[dict]) -> EncodedConversation:
        for i, message in enumerate(messages):
            if isinstance(message["content"], str):
                reject_control_strings(message["content"], self._controls, f"turn {i}")
        text, spans = self.render(messages)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], dtype=np.int32)
        supervised = np.zeros(len(ids), dtype=bool)
        span_idx = 0
        for t, (start, end) in enumerate(enc["offset_mapping"]):
            while span_idx < len(spans) and start >= spans[span_idx][1]:
                span_idx += 1
            if span_idx == len(spans):
                break
            if end > spans[span_idx][0]:
                supervised[t] = True
        labels = np.where(supervised, ids, IGNORE_INDEX).astype(np.int32)
        is_image = ids == self.image_token_id
        n_images = int(is_image.sum())
        length = len(ids) + n_images * (self.image_seq_length - 1)
        if length > self.max_length:
            raise RecordError("too_long", f"{length} tokens with image tokens expanded > max_length {self.max_length}")
        if n_images:
            repeat = np.where(is_image, self.image_seq_length, 1)
            ids = np.repeat(ids, repeat)
            labels = np.repeat(np.where(is_image, IGNORE_INDEX, labels), repeat).astype(np.int32)
        if not (labels != IGNORE_INDEX).any():
            raise RecordError("empty_text", "no answer tokens survive tokenization")
        return EncodedConversation(input_ids=ids, labels=labels)

    def encode_prompt(self, messages: list[dict]) -> np.ndarray:
        """The ids of a conversation up to where the next answer starts (the generation prompt), image
        tokens expanded: what generation in training feeds the model, as the export's processor would."""
        for i, message in enumerate(messages):
            if isinstance(message["content"], str):
                reject_control_strings(message["content"], self._controls, f"turn {i}")
        rendered, _ = render_jinja_template(
            conversations=[messages], chat_template=self.chat_template, add_generation_prompt=True, **self._special
        )
        ids = np.asarray(self.tokenizer(rendered[0], add_special_tokens=False)["input_ids"], dtype=np.int64)
        is_image = ids == self.image_token_id
        return np.repeat(ids, np.where(is_image, self.image_seq_length, 1))
