"""The conversation encoder of a model config: its tokenizer, chat template and image token count.

Built from the config alone (tokenizer files and the vision tower's config, no weights), so the data
path can encode records exactly as the model will see them without importing the model layer.
"""

from __future__ import annotations

from vistralv_ray.config.schema import ModelConfig
from vistralv_ray.text.conversation import ConversationEncoder
from vistralv_ray.text.templates import chat_template_for
from vistralv_ray.text.tokenizer import load_tokenizer, prepare_tokenizer


def image_seq_length(vision_config, strategy: str) -> int:
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    # "default" drops the first feature (CLIP's CLS token); SigLIP has none, so "full" is right for it.
    return patches if strategy == "full" else patches - 1


def build_tokenizer(model_cfg: ModelConfig):
    tokenizer = load_tokenizer(model_cfg.language_model)
    template = chat_template_for(model_cfg, native=getattr(tokenizer, "chat_template", None))
    return prepare_tokenizer(tokenizer, template), template


def load_vision_config(path: str):
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig.from_pretrained(path)


def build_encoder(model_cfg: ModelConfig):
    """The conversation encoder of this model (tokenizer + template + image tokens), without weights."""
    tokenizer, template = build_tokenizer(model_cfg)
    vision_config = load_vision_config(model_cfg.vision_tower)
    n_image = image_seq_length(vision_config, model_cfg.vision_feature_select_strategy)
    return ConversationEncoder(tokenizer, template, n_image, model_cfg.max_length)
