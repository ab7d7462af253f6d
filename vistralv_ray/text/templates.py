"""Conversation templates as Jinja chat templates, the one source of truth for training and export.

Training renders conversations with the same Jinja source that is stored as the tokenizer's and
processor's `chat_template`, so `apply_chat_template` after export yields the training token ids by
construction. Assistant turns sit in `{% generation %}` blocks: their character spans are the tokens
that carry loss.
"""

from __future__ import annotations

import json

from vistralv_ray.config.schema import ModelConfig

IMAGE_TOKEN = "<image>"

# Vistral-V's system prompt: two sentences that the original joined without a space (REFERENCE.md).
VISTRAL_SYSTEM_SENTENCES = (
    "Cuộc trò chuyện giữa một người dùng tò mò và trợ lý trí tuệ nhân tạo.",
    "Trợ lý đưa ra câu trả lời hữu ích, chi tiết và lịch sự cho các câu hỏi của người dùng.",
)
VISTRAL_SYSTEM_PROMPT = " ".join(VISTRAL_SYSTEM_SENTENCES)

# A user turn's content is either a string (our records: "<image>\n" already in front) or a list of
# {"type": "image"} / {"type": "text"} items (what processors and chat UIs send); both render alike.
_CONTENT = (
    "{%- macro render_content(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if item['type'] == 'image' -%}{{- '<image>\\n' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)

_VISTRAL = (
    _CONTENT + "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system = render_content(messages[0]['content']) -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = __SYSTEM__ -%}{%- set turns = messages -%}{%- endif -%}"
    "{{- bos_token -}}"
    "{%- for message in turns -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- '[INST] ' -}}"
    "{%- if loop.first -%}{{- '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' -}}{%- endif -%}"
    "{{- render_content(message['content']) + ' [/INST]' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- ' ' + render_content(message['content']) + ' ' + eos_token -}}{%- endgeneration -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# LLaVA's "plain" alignment format: the image, then the caption; the question text is not used.
_PLAIN = (
    _CONTENT + "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if '<image>' in render_content(message['content']) -%}{{- '<image>' -}}{%- endif -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- render_content(message['content']) + '\\n' -}}{%- endgeneration -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

TEMPLATE_NAMES = ("vistral", "plain", "native")


def get_chat_template(name: str, system_prompt: str | None = None, native: str | None = None) -> str:
    """The Jinja source of template `name`. `native` is the language model's own template."""
    if name == "vistral":
        system = VISTRAL_SYSTEM_PROMPT if system_prompt is None else system_prompt
        return _VISTRAL.replace("__SYSTEM__", json.dumps(system, ensure_ascii=False))
    if name == "plain":
        return _PLAIN
    if name == "native":
        if not native:
            raise ValueError("model.template=native: the language model's tokenizer has no chat_template")
        return native
    raise ValueError(f"unknown template {name!r}; allowed: {', '.join(TEMPLATE_NAMES)}")


def chat_template_for(model: ModelConfig, native: str | None = None) -> str:
    return get_chat_template(model.template, model.system_prompt, native)
