"""Per-GPU memory estimates of a run under ZeRO-2, ZeRO-3 and ZeRO-3 + CPU offload.

Parameter counts come from the configured model's architecture, built on the meta device (config
files only; the real Vistral-V sizes come from a preset when its hub id cannot be read offline).
P parameters in all, T of them trainable, F = P - T frozen (the vision tower; the LM in align or
LoRA), W workers, L the largest layer. Per GPU, in bytes:

  model states (DeepSpeed's own estimators, `estimate_zero{2,3}_model_states_mem_needs`, applied to the
  trainable parameters, plus the frozen weights in bf16):
    ZeRO-2           2 P + 18 T / W    (bf16 weights and gradients of every trained parameter; fp32
                                        master weights, gradients, Adam m and v partitioned)
    ZeRO-3           4 L + 18 T / W + 2 F / W   (everything partitioned; the largest layer gathered)
    ZeRO-3 offload   4 L               (parameters and optimizer states in CPU memory)
  activations, per token (bf16, saved for the backward pass):
    one decoder layer   A = 18 h + 4 h_kv + 8 I   (h hidden, h_kv = key/value width, I MLP width:
                        RMSNorm inputs in bf16 and fp32, q, k, v, attention output, gate, up, act, product)
    all layers          layers x A, or with gradient checkpointing layers x 2 h (each layer's input)
                        + A (the one layer being recomputed)
    logits              14 V: bf16 logits (2 V), their fp32 upcast (4 V), the fp32 log-softmax kept for
                        the backward (4 V) and its fp32 gradient (4 V)
    attention scores    eager: 4 heads x S bytes per token of a sequence of S (scores and probabilities,
                        bf16), per layer kept (one layer with checkpointing); sdpa: a dense S x S mask of
                        the packed rows (1 byte per cell); flash_attention_2: nothing beyond O(S)
  overhead          ~2.5 GB of CUDA context, communication buffers and fragmentation
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
    kv_hidden: int = 0  # key/value width (GQA: fewer KV heads than query heads)
    intermediate: int = 0  # MLP width
    heads: int = 0

    @property
    def frozen(self) -> int:
        return self.total - self.trainable


def lora_parameter_count(language_model: torch.nn.Module, r: int, targets: list[str]) -> int:
    count = 0
    for name, module in language_model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            count += r * (module.in_features + module.out_features)
    return count


def meta_model_for(cfg: Config):
    """The configured architecture on the meta device: local config files, else a known preset."""
    from transformers import AutoConfig, LlavaForConditionalGeneration

    from vistralv_ray.model.assembly import build_llava_config
    from vistralv_ray.model.presets import build_meta_model
    from vistralv_ray.text.encoder import load_vision_config

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
    # ZeRO-3 gathers a module's own parameters at a time: the largest such set, as DeepSpeed counts it.
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
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
        kv_hidden=kv_heads * head_dim,
        intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size),
        heads=heads,
    )


def layer_activation_bytes(sizes: ModelSizes) -> int:
    """Bytes per token one decoder layer keeps for its backward pass (see the module docstring)."""
    return 18 * sizes.hidden + 4 * sizes.kv_hidden + 8 * sizes.intermediate


def logits_bytes(sizes: ModelSizes) -> int:
    """Bytes per token of the logits at the loss: bf16, fp32 upcast, fp32 log-softmax, its gradient."""
    return 14 * sizes.vocab


def attention_bytes(sizes: ModelSizes, tokens: int, seq_len: int, attn: str, checkpointing: bool) -> float:
    """What the attention kernel holds beyond O(tokens): eager's score matrices, sdpa's dense mask."""
    rows = tokens / seq_len
    if attn == "eager":
        kept_layers = 1 if checkpointing else sizes.layers
        return rows * kept_layers * sizes.heads * seq_len * seq_len * 4
    if attn == "sdpa":
        return rows * seq_len * seq_len  # one boolean S x S mask per packed row, shared by the layers
    return 0.0


def activation_bytes(
    sizes: ModelSizes, tokens: int, checkpointing: bool, seq_len: int | None = None, attn: str = "flash_attention_2"
) -> float:
    per_layer = layer_activation_bytes(sizes)
    if checkpointing:
        acts = tokens * (sizes.layers * 2 * sizes.hidden + per_layer)
    else:
        acts = tokens * sizes.layers * per_layer
    acts += tokens * logits_bytes(sizes)
    return acts + attention_bytes(sizes, tokens, seq_len or tokens, attn, checkpointing)


def model_state_bytes(sizes: ModelSizes, workers: int) -> dict[str, float]:
    """Weights, gradients and optimizer states per GPU, as DeepSpeed's estimators count them."""
    w = max(1, workers)
    t, f = sizes.trainable, sizes.frozen
    largest = 4 * sizes.largest_layer
    return {
        "zero2": 2 * (t + f) + 18 * t / w,
        "zero3": largest + 18 * t / w + 2 * f / w,
        "zero3_offload": largest,
    }


def estimate(cfg: Config, sizes: ModelSizes, workers: int, on_gpu: bool = True) -> dict[str, float]:
    """GB per GPU for each ZeRO setting."""
    from vistralv_ray.model.assembly import resolve_attn_implementation

    tokens = cfg.data.per_device_batch * cfg.model.max_length
    seq_len = cfg.data.pack_length or tokens  # without pack_length, a micro-batch is one packed row
    attn = resolve_attn_implementation(cfg.model.attn_implementation, on_gpu)
    acts = activation_bytes(sizes, tokens, cfg.train.gradient_checkpointing, seq_len, attn)
    states = model_state_bytes(sizes, workers)
    return {key: (value + acts + OVERHEAD_BYTES) / GB for key, value in states.items()}


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
