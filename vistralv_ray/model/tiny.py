"""Tiny assets of the real architecture: a Mistral LM, a SigLIP vision tower and a Vietnamese tokenizer.

Written with `save_pretrained` so tests and the demo load them by path through the same
`from_pretrained` code that loads Vistral-7B-Chat and SigLIP in the real recipes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import MistralForCausalLM, SiglipImageProcessor, SiglipVisionModel

from vistralv_ray.data.demo import vietnamese_corpus
from vistralv_ray.model.presets import tiny_text_config, tiny_vision_config
from vistralv_ray.text.tokenizer import train_tiny_tokenizer


def make_tiny(out: str | Path, seed: int = 0, vocab_size: int = 1024) -> dict[str, Path]:
    """Write OUT/llm (model + tokenizer) and OUT/vision (tower + image processor)."""
    out = Path(out)
    torch.manual_seed(seed)
    tokenizer = train_tiny_tokenizer(vietnamese_corpus(seed), vocab_size=vocab_size)
    lm = MistralForCausalLM(tiny_text_config(len(tokenizer)))
    lm.generation_config.bos_token_id = tokenizer.bos_token_id
    lm.generation_config.eos_token_id = tokenizer.eos_token_id
    lm.config.bos_token_id = tokenizer.bos_token_id
    lm.config.eos_token_id = tokenizer.eos_token_id
    vision_cfg = tiny_vision_config()
    vision = SiglipVisionModel(vision_cfg)
    paths = {"llm": out / "llm", "vision": out / "vision"}
    lm.save_pretrained(paths["llm"])
    tokenizer.save_pretrained(paths["llm"])
    vision.save_pretrained(paths["vision"])
    SiglipImageProcessor(
        size={"height": vision_cfg.image_size, "width": vision_cfg.image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    ).save_pretrained(paths["vision"])
    return paths
