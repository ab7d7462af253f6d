"""Assemble Vistral-V as transformers' `LlavaForConditionalGeneration` and freeze it by stage.

The language model (Mistral family) and the SigLIP vision tower are loaded with their own
`from_pretrained` (hub id or local path) and placed into a Llava shell built on the meta device, so
no second random copy of a 7B model is ever initialised. Only the projector is created fresh.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionModel

from vistralv_ray.config.schema import RANDOM_PROJECTOR, LoraSettings, ModelConfig
from vistralv_ray.data.runs import PROJECTOR_FILE
from vistralv_ray.logging import get_logger
from vistralv_ray.text.encoder import build_tokenizer, image_seq_length
from vistralv_ray.text.templates import IMAGE_TOKEN

log = get_logger(__name__)


@dataclass
class AssembledModel:
    model: torch.nn.Module  # LlavaForConditionalGeneration, or a peft wrapper of it
    tokenizer: object
    chat_template: str
    image_size: int
    image_seq_length: int


def build_llava_config(model_cfg: ModelConfig, vision_config, text_config, image_token_id: int) -> LlavaConfig:
    if model_cfg.projector != "mlp2x_gelu":
        raise ValueError(f"model.projector: unknown projector {model_cfg.projector!r}; allowed: mlp2x_gelu")
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_token_id,
        image_seq_length=image_seq_length(vision_config, model_cfg.vision_feature_select_strategy),
        projector_hidden_act="gelu",
        vision_feature_layer=model_cfg.vision_feature_layer,
        vision_feature_select_strategy=model_cfg.vision_feature_select_strategy,
        multimodal_projector_bias=True,
        tie_word_embeddings=getattr(text_config, "tie_word_embeddings", False),
    )


def resolve_attn_implementation(requested: str, on_gpu: bool) -> str:
    if requested != "auto":
        return requested
    if on_gpu:
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            return "sdpa"
    return "sdpa"


def build_model(
    model_cfg: ModelConfig, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa", seed: int = 0
) -> AssembledModel:
    """Load the language model and vision tower and join them with a fresh mlp2x_gelu projector.

    `seed` (the run's train.seed) initialises the fresh projector: the same on every rank and every
    rebuild with that seed, and another projector for another seed."""
    tokenizer, template = build_tokenizer(model_cfg)
    lm = AutoModelForCausalLM.from_pretrained(
        model_cfg.language_model, dtype=dtype, attn_implementation=attn_implementation
    )
    old_vocab = lm.get_input_embeddings().num_embeddings
    if old_vocab < len(tokenizer):
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        # New rows (<image>) start at the mean of the old ones, as LLaVA does: deterministic, so
        # every rank and every rebuild of the model (export, eval, parity checks) agrees.
        with torch.no_grad():
            for matrix in (lm.get_input_embeddings().weight, lm.get_output_embeddings().weight):
                matrix[old_vocab:] = matrix[:old_vocab].mean(dim=0, keepdim=True)
    vision = SiglipVisionModel.from_pretrained(
        model_cfg.vision_tower, dtype=dtype, attn_implementation=attn_implementation
    )
    if model_cfg.image_size is not None and model_cfg.image_size != vision.config.image_size:
        raise ValueError(
            f"model.image_size: {model_cfg.image_size} differs from the vision tower's {vision.config.image_size}"
        )
    config = build_llava_config(model_cfg, vision.config, lm.config, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    config._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = vision
    model.model.language_model = lm.model
    model.lm_head = lm.lm_head
    projector = model.model.multi_modal_projector.to_empty(device="cpu")
    torch.manual_seed(seed)  # the fresh projector is the same on every rank and every rebuild
    for layer in (projector.linear_1, projector.linear_2):
        layer.reset_parameters()
    projector.to(dtype)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if model_cfg.init_projector_from and model_cfg.init_projector_from != RANDOM_PROJECTOR:
        load_projector(model, model_cfg.init_projector_from)
    elif model_cfg.init_projector_from == RANDOM_PROJECTOR:
        log.warning("model.init_projector_from=%s: the projector starts freshly initialised", RANDOM_PROJECTOR)
    return AssembledModel(
        model=model,
        tokenizer=tokenizer,
        chat_template=template,
        image_size=vision.config.image_size,
        image_seq_length=config.image_seq_length,
    )


def llava_of(model: torch.nn.Module) -> LlavaForConditionalGeneration:
    """The Llava model inside a DeepSpeed engine and/or a peft wrapper, or the model itself."""
    if hasattr(model, "module") and not isinstance(model, LlavaForConditionalGeneration):
        model = model.module
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def projector_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The projector's full weights on the CPU. Under ZeRO-3 they are gathered from every rank
    first, so every rank must call this (a collective), even if only one of them saves."""
    proj = llava_of(model).model.multi_modal_projector
    params = list(proj.parameters())
    gathered = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for p in params):  # partitioned by ZeRO-3
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    with gathered:
        return {k: v.detach().cpu().clone().contiguous() for k, v in proj.state_dict().items()}


def save_projector(model: torch.nn.Module, path: str | Path, state: dict[str, torch.Tensor] | None = None) -> None:
    from safetensors.torch import save_file

    save_file(state if state is not None else projector_state(model), str(path))


def resolve_projector_uri(source: str, storage_root: str | None = None) -> str:
    """The projector file of `source`: a projector file, a checkpoint, a run directory (its newest
    complete checkpoint), local or s3://, or the name of a run under `storage_root`."""
    from vistralv_ray.data import storage
    from vistralv_ray.data.runs import COMPLETE_FILE, STATE_FILE, IncompleteCheckpointError, latest_checkpoint_uri

    source = str(source)
    if not storage.is_s3(source):
        local = Path(source).expanduser()
        if not local.exists() and storage_root and not local.is_absolute():
            source = storage.join(storage_root, source)  # a run name
            if not storage.is_s3(source):
                local = Path(source).expanduser()
        if not storage.is_s3(source):
            if not local.exists():
                raise FileNotFoundError(
                    f"model.init_projector_from: {local} does not exist (nor as a run name under {storage_root})"
                )
            source = str(local.resolve())
    if source.endswith(".safetensors"):
        return source
    is_checkpoint = any(storage.exists(storage.join(source, f)) for f in (STATE_FILE, COMPLETE_FILE))
    if not is_checkpoint and storage.exists(storage.join(source, PROJECTOR_FILE)):
        return storage.join(source, PROJECTOR_FILE)  # a folder holding a projector file
    try:
        checkpoint = latest_checkpoint_uri(source)
    except IncompleteCheckpointError:
        raise
    except FileNotFoundError as e:
        raise FileNotFoundError(f"model.init_projector_from: no {PROJECTOR_FILE} at or under {source}") from e
    return storage.join(checkpoint, PROJECTOR_FILE)


def load_projector(model: torch.nn.Module, source: str | Path) -> str:
    from safetensors.torch import load

    from vistralv_ray.data import storage

    uri = resolve_projector_uri(str(source))
    state = load(storage.read_bytes(uri))
    proj = llava_of(model).model.multi_modal_projector
    missing, unexpected = proj.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{uri}: projector weights do not fit (missing {missing}, unexpected {unexpected})")
    log.info("projector initialised from %s", uri)
    return uri


def apply_stage(model: LlavaForConditionalGeneration, stage: str, lora: LoraSettings) -> torch.nn.Module:
    """Freeze by stage; returns the model to train (a peft wrapper when LoRA is on)."""
    if stage not in ("align", "finetune"):
        raise ValueError(f"train.stage: unknown stage {stage!r}; allowed: align, finetune")
    model.requires_grad_(False)
    if stage == "finetune":
        if lora.enabled:
            from peft import LoraConfig, get_peft_model

            targets = "|".join(lora.target_modules)
            peft_cfg = LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                # Adapters only on the language model's linear layers, never the vision tower.
                target_modules=rf".*language_model.*\.({targets})",
                bias="none",
            )
            model = get_peft_model(model, peft_cfg)
        else:
            model.model.language_model.requires_grad_(True)
            model.lm_head.requires_grad_(True)
    llava_of(model).model.multi_modal_projector.requires_grad_(True)
    for line in describe_trainable(model):
        log.info(line)
    return model


def describe_trainable(model: torch.nn.Module) -> list[str]:
    """One line per top-level module: trainable or frozen, with parameter counts."""
    base = llava_of(model)
    parts = {
        "vision_tower": base.model.vision_tower,
        "multi_modal_projector": base.model.multi_modal_projector,
        "language_model": base.model.language_model,
        "lm_head": base.lm_head,
    }
    lines = []
    for name, module in parts.items():
        total = sum(p.numel() for p in module.parameters())
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        state = "frozen" if trainable == 0 else ("trainable" if trainable == total else "partly trainable (LoRA)")
        lines.append(f"{name}: {state}, {trainable:,} of {total:,} parameters train")
    return lines
