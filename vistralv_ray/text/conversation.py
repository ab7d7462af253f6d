"""Conversations: normalise roles and the `<image>` tag, render with the chat template, tokenize, mask.

`ConversationEncoder.encode` is the one place where a conversation becomes `input_ids` and `labels`:
labels keep the tokens of assistant answers (and their end-of-sequence token) and mask everything
else with -100; each `<image>` token is expanded to the number of image features the model makes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from transformers.utils.chat_template_utils import render_jinja_template

from vistralv_ray.errors import RecordError
from vistralv_ray.text.templates import IMAGE_TOKEN

IGNORE_INDEX = -100

_ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "system": "system",
}


def normalize_messages(turns: list[dict], has_image: bool) -> list[dict]:
    """LLaVA (`from`/`value`) or chat (`role`/`content`) turns -> checked `role`/`content` messages.

    The `<image>` tag is moved to the front of the first user turn (added there if the record has
    an image but no tag), as LLaVA does; roles must alternate user/assistant after an optional system.
    """
    if not isinstance(turns, list) or not turns:
        raise RecordError("malformed_record", "conversation is missing or empty")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError("malformed_record", f"turn {i} is not a mapping")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role not in _ROLE_ALIASES:
            raise RecordError("malformed_record", f"turn {i} has unknown role {role!r}")
        if not isinstance(content, str):
            raise RecordError("malformed_record", f"turn {i} content is not text")
        messages.append({"role": _ROLE_ALIASES[role], "content": content})

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
