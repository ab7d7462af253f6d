"""The Llava forward with the vision path first: the same modules, in the same order, for every micro-batch.

ZeRO-3 gathers each module's parameters with collectives as the module runs, and ZeRO-2/3 reduce
gradients in the order they arrive in the backward pass. Every rank must therefore run the same
modules in the same order whatever its micro-batch holds, or the ranks issue different collectives
(gloo errors, NCCL hangs or mixed-up gradients). transformers' Llava embeds the tokens before it
runs the vision tower, and a batch without images skips the vision path altogether.

Here every micro-batch runs vision tower -> projector -> token embedding -> merge -> language model
-> LM head. A batch without images runs the vision path on one blank image whose features are
merged at no position (an all-false mask), so they enter with zero weight: the loss is the plain
LM loss, the projector's gradient is exactly zero, and the autograd graph has the same shape as for
an image batch. For image batches the result equals `LlavaForConditionalGeneration.forward`, so the
trained weights stay a plain Llava model.
"""

from __future__ import annotations

import contextlib
import types

import torch
from transformers import LlavaForConditionalGeneration
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast


def vision_first_forward(
    llava: LlavaForConditionalGeneration,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
) -> LlavaCausalLMOutputWithPast:
    """Logits of `llava` for a batch with or without images (normalised `pixel_values` or None)."""
    inner, cfg = llava.model, llava.config
    blank = pixel_values is None
    if blank:
        size = inner.vision_tower.config.image_size
        pixel_values = torch.zeros(1, 3, size, size, dtype=inner.vision_tower.dtype, device=input_ids.device)
    features = inner.get_image_features(
        pixel_values=pixel_values,
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        return_dict=True,
    ).pooler_output
    embeds = inner.get_input_embeddings()(input_ids)
    features = torch.cat(list(features), dim=0).to(embeds.device, embeds.dtype)
    slots = input_ids == cfg.image_token_id
    expected = 0 if blank else features.shape[0]
    if int(slots.sum()) != expected:
        raise ValueError(
            f"image tokens and image features do not match: {int(slots.sum())} tokens, {expected} features"
        )
    # The blank image's features are scattered to no position: same graph, zero weight.
    embeds = embeds.masked_scatter(slots.unsqueeze(-1), features)
    rows, length = embeds.shape[:2]
    flatten = flattens_packed_rows(attention_implementation(llava), rows, attention_mask, position_ids)
    if flatten:
        # FlashAttention reads sample boundaries from position ids only in a batch of one row: packed
        # rows become one row (their order and the summed loss are unchanged).
        embeds, position_ids = embeds.reshape(1, rows * length, -1), position_ids.reshape(1, rows * length)
    outputs = inner.language_model(
        inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, **kwargs
    )
    hidden = outputs.last_hidden_state
    if flatten:
        hidden = hidden.reshape(rows, length, -1)
    return LlavaCausalLMOutputWithPast(logits=llava.lm_head(hidden))


def attention_implementation(llava: LlavaForConditionalGeneration) -> str:
    text = llava.config.text_config
    return getattr(text, "_attn_implementation", None) or llava.config._attn_implementation or "eager"


# Kernels that keep packed samples apart on their own, in any number of rows: transformers builds a
# block-diagonal mask from the restarting position ids (eager, sdpa: a dense S x S mask; flex: a block
# mask that skips cross-sample blocks). FlashAttention kernels do it only for a single row.
PACKING_EXACT = ("eager", "sdpa", "flex_attention")
PACKING_FLATTENED = ("flash_attention_2", "flash_attention_3")


def flattens_packed_rows(
    implementation: str, rows: int, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None
) -> bool:
    """Whether packed rows (no attention mask, restarting position ids) go through as one row."""
    if attention_mask is not None or position_ids is None or rows <= 1:
        return False
    if implementation in PACKING_EXACT:
        return False
    if implementation in PACKING_FLATTENED:
        return True
    raise ValueError(
        f"model.attn_implementation {implementation!r}: packed rows (data.batching=pack) are kept apart only "
        f"on {', '.join(PACKING_EXACT + PACKING_FLATTENED)}; use one of them, or data.batching=pad"
    )


@contextlib.contextmanager
def vision_first(llava: LlavaForConditionalGeneration):
    """Within the block, calling the model (or a DeepSpeed engine or peft wrapper around it) runs
    `vision_first_forward`. The call still goes through the outer modules' `__call__`, so DeepSpeed's
    engine forward and its ZeRO-3 hooks on the root module see one ordinary forward."""
    previous = llava.__dict__.get("forward")
    llava.forward = types.MethodType(vision_first_forward, llava)
    try:
        yield llava
    finally:
        if previous is None:
            del llava.forward
        else:
            llava.forward = previous
