"""Architecture presets: the real Vistral-V sizes (built on the meta device, nothing downloaded) and tiny.

`vistral-7b-siglip-256` lets `plan` and the tests count parameters and memory of the real model on
any machine; `tiny` is what `make-tiny` writes to disk for tests and the demo.
"""

from __future__ import annotations

import torch
from transformers import LlavaForConditionalGeneration, MistralConfig, SiglipVisionConfig

from vistralv_ray.config.schema import ModelConfig
from vistralv_ray.model.assembly import build_llava_config

# Vistral-7B-Chat: Mistral-7B with a 38,369-token vocabulary (+1 for <image>).
VISTRAL_VOCAB = 38369


def vistral_text_config(vocab_size: int = VISTRAL_VOCAB + 1) -> MistralConfig:
    return MistralConfig(
        vocab_size=vocab_size,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=32768,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )


def siglip_b16_256_config() -> SiglipVisionConfig:
    return SiglipVisionConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        image_size=256,
        patch_size=16,
    )


def tiny_text_config(vocab_size: int) -> MistralConfig:
    return MistralConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )


def tiny_vision_config() -> SiglipVisionConfig:
    # 32 px images with 8 px patches: 16 image tokens keep sequences short on a CPU.
    return SiglipVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )


PRESETS = {
    "vistral-7b-siglip-256": (vistral_text_config, siglip_b16_256_config),
}


def build_meta_model(preset: str = "vistral-7b-siglip-256", image_token_id: int = VISTRAL_VOCAB):
    """The full-size Llava model on the meta device: real shapes, no memory, no download."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; allowed: {', '.join(PRESETS)}")
    text_fn, vision_fn = PRESETS[preset]
    config = build_llava_config(ModelConfig(), vision_fn(), text_fn(), image_token_id)
    with torch.device("meta"):
        return LlavaForConditionalGeneration(config)


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Parameter counts of the Llava parts (works on the meta device)."""
    inner = model.model
    return {
        "vision_tower": sum(p.numel() for p in inner.vision_tower.parameters()),
        "projector": sum(p.numel() for p in inner.multi_modal_projector.parameters()),
        "language_model": sum(p.numel() for p in inner.language_model.parameters())
        + sum(p.numel() for p in model.lm_head.parameters()),
    }
