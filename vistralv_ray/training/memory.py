"""Per-GPU memory estimates of a run under ZeRO-2, ZeRO-3 and ZeRO-3 + CPU offload.

Parameter counts come from the configured model's architecture, built on the meta device (config
files only; the real Vistral-V sizes come from a preset when its hub id cannot be read offline).
The model of memory, per GPU, in bytes:
  weights       2 P (bf16), or 2 P / W when ZeRO-3 partitions them, plus the gathered layers
  gradients     2 T / W (trainable parameters T, partitioned by ZeRO 2 and 3)
  optimizer     12 T / W (fp32 master weights, Adam m and v), 0 when offloaded to the CPU
  activations   per token per layer 34 h bytes (2 h with gradient checkpointing, plus one layer's
                34 h to recompute), plus fp32 logits and their gradient (8 V bytes per token)
  overhead      ~2.5 GB of CUDA context, buffers and fragmentation
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vistralv_ray.config.schema import VISTRAL_LM, Config

GB = 1024**3
OVERHEAD_BYTES = 2.5 * GB


@dataclass
class ModelSizes:
    total: int
    trainable: int
    vision: int
    projector: int
    language_model: int
    lora: int
    layers: int
    hidden: int
    vocab: int
    largest_layer: int


def lora_parameter_count(language_model: torch.nn.Module, r: int, targets: list[str]) -> int:
    count = 0
    for name, module in language_model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            count += r * (module.in_features + module.out_features)
    return count


def meta_model_for(cfg: Config):
    """The configured architecture on the meta device: local config files, else a known preset."""
    from transformers import AutoConfig, LlavaForConditionalGeneration

    from vistralv_ray.model.assembly import build_llava_config, load_vision_config
    from vistralv_ray.model.presets import build_meta_model

    if cfg.model.language_model == VISTRAL_LM and not Path(VISTRAL_LM).is_dir():
        return build_meta_model("vistral-7b-siglip-256")  # the real sizes, without asking the hub
    text_config = AutoConfig.from_pretrained(cfg.model.language_model)
    vision_config = load_vision_config(cfg.model.vision_tower)
    text_config.vocab_size += 1  # the <image> token
    config = build_llava_config(cfg.model, vision_config, text_config, text_config.vocab_size - 1)
    with torch.device("meta"):
        return LlavaForConditionalGeneration(config)


def model_sizes(cfg: Config) -> ModelSizes:
    model = meta_model_for(cfg)
    inner = model.model
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    vision, projector = count(inner.vision_tower), count(inner.multi_modal_projector)
    lm = count(inner.language_model) + count(model.lm_head)
    lora = 0
    trainable = projector
    if cfg.train.stage == "finetune":
        if cfg.model.lora.enabled:
            lora = lora_parameter_count(inner.language_model, cfg.model.lora.r, cfg.model.lora.target_modules)
            trainable += lora
        else:
            trainable += lm
    text = model.config.text_config
    largest = max(count(layer) for layer in inner.language_model.layers)
    return ModelSizes(
        total=vision + projector + lm + lora,
        trainable=trainable,
        vision=vision,
        projector=projector,
        language_model=lm,
        lora=lora,
        layers=text.num_hidden_layers,
        hidden=text.hidden_size,
        vocab=text.vocab_size,
        largest_layer=largest,
    )


def activation_bytes(sizes: ModelSizes, tokens: int, checkpointing: bool) -> float:
    per_token_layer = 2 * sizes.hidden if checkpointing else 34 * sizes.hidden
    acts = tokens * sizes.layers * per_token_layer
    if checkpointing:
        acts += tokens * 34 * sizes.hidden
    return acts + tokens * sizes.vocab * 8


def estimate(cfg: Config, sizes: ModelSizes, workers: int) -> dict[str, float]:
    """GB per GPU for each ZeRO setting."""
    w = max(1, workers)
    tokens = cfg.data.per_device_batch * cfg.model.max_length
    acts = activation_bytes(sizes, tokens, cfg.train.gradient_checkpointing)
    grads = 2 * sizes.trainable / w
    optim = 12 * sizes.trainable / w
    gathered = 2 * 2 * sizes.largest_layer  # ZeRO-3 keeps about two layers gathered (prefetch)
    zero2 = 2 * sizes.total + grads + optim + acts + OVERHEAD_BYTES
    zero3 = 2 * sizes.total / w + gathered + grads + optim + acts + OVERHEAD_BYTES
    zero3_offload = gathered + grads + acts + OVERHEAD_BYTES
    return {"zero2": zero2 / GB, "zero3": zero3 / GB, "zero3_offload": zero3_offload / GB}


def recommend(estimates: dict[str, float], gpu_memory_gb: float) -> str:
    budget = 0.9 * gpu_memory_gb
    labels = {"zero2": "ZeRO-2", "zero3": "ZeRO-3", "zero3_offload": "ZeRO-3 + CPU offload (optimizer and parameters)"}
    for key in ("zero2", "zero3", "zero3_offload"):
        if estimates[key] <= budget:
            return f"{labels[key]} fits in {gpu_memory_gb:g} GB ({estimates[key]:.1f} GB estimated, 10% headroom)"
    return (
        f"nothing fits in {gpu_memory_gb:g} GB: use LoRA, more workers, a smaller per-device batch with "
        "gradient accumulation, or gradient checkpointing"
    )
