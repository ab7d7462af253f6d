"""Every micro-batch runs the same modules in the same order, with or without images.

ZeRO-3 gathers parameters module by module and ZeRO-2/3 reduce gradients as they arrive, so a rank
whose micro-batch has no images must run the same forward modules and produce the same gradients in
the same order as a rank with images. The vision-first forward must also stay the computation of
transformers' own Llava forward, so the trained weights remain a plain Llava model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vistralv_ray.config.schema import LoraSettings
from vistralv_ray.data.packing import IGNORE_INDEX, layout_batch
from vistralv_ray.model.assembly import apply_stage, build_model, llava_of
from vistralv_ray.text.conversation import normalize_messages
from vistralv_ray.text.encoder import build_encoder
from vistralv_ray.training.step import forward_logits, model_kwargs, summed_token_loss

IMAGE_SHAPE = (32, 32, 3)
CONVERSATIONS = [
    ([{"from": "human", "value": "<image>\nHình có màu gì?"}, {"from": "gpt", "value": "Màu đỏ."}], True),
    ([{"from": "human", "value": "Xin chào"}, {"from": "gpt", "value": "Chào bạn, tôi có thể giúp gì?"}], False),
    ([{"from": "human", "value": "Có mấy hình?\n<image>"}, {"from": "gpt", "value": "Ba hình."}], True),
    ([{"from": "human", "value": "Một cộng một?"}, {"from": "gpt", "value": "Hai."}], False),
]


@pytest.fixture(scope="module")
def samples(tiny_assets):
    from vistralv_ray.config.schema import ModelConfig

    cfg = ModelConfig(language_model=str(tiny_assets["llm"]), vision_tower=str(tiny_assets["vision"]), max_length=256)
    encoder = build_encoder(cfg)
    rng = np.random.default_rng(0)
    out = []
    for turns, has_image in CONVERSATIONS:
        enc = encoder.encode(normalize_messages(turns, has_image))
        image = rng.integers(0, 256, size=IMAGE_SHAPE, dtype=np.uint8) if has_image else None
        out.append((enc.input_ids, enc.labels, image))
    return cfg, out


def batch_of(data, indices, pad_id, mode="pack"):
    ids, labels, images = zip(*[data[i] for i in indices], strict=True)
    return layout_batch(list(ids), list(labels), list(images), pad_id, mode, None, IMAGE_SHAPE)


def model_for(cfg, variant: str):
    assembled = build_model(cfg)
    stage = "align" if variant == "align" else "finetune"
    lora = LoraSettings(enabled=True, r=4, alpha=8) if variant == "lora" else LoraSettings()
    return apply_stage(assembled.model, stage, lora).eval(), assembled.tokenizer.pad_token_id


def record_order(model, batch):
    """(forward modules in call order, trainable parameters in gradient-arrival order) of one step."""
    llava = llava_of(model)
    inner = llava.model
    watched = {
        "vision_tower": inner.vision_tower,
        "projector": inner.multi_modal_projector,
        "embed_tokens": inner.get_input_embeddings(),
        "lm_head": llava.lm_head,
    }
    watched.update({f"layer{i}": layer for i, layer in enumerate(inner.language_model.layers)})
    forward: list[str] = []
    arrivals: list[str] = []
    handles = [m.register_forward_pre_hook(lambda _m, _a, n=n: forward.append(n)) for n, m in watched.items()]
    for name, p in model.named_parameters():
        if p.requires_grad:
            handles.append(p.register_post_accumulate_grad_hook(lambda _p, n=name: arrivals.append(n)))
    model.zero_grad(set_to_none=True)
    try:
        summed_token_loss(model, batch, torch.float32).backward()
    finally:
        for h in handles:
            h.remove()
    return forward, arrivals


@pytest.mark.parametrize("variant", ["align", "finetune", "lora"])
def test_image_and_text_only_batches_run_the_same_modules_and_gradients_in_the_same_order(samples, variant):
    cfg, data = samples
    model, pad = model_for(cfg, variant)
    image_forward, image_arrivals = record_order(model, batch_of(data, [0, 2], pad))
    text_forward, text_arrivals = record_order(model, batch_of(data, [1, 3], pad))
    n_layers = len(llava_of(model).model.language_model.layers)
    expected = ["vision_tower", "projector", "embed_tokens", *[f"layer{i}" for i in range(n_layers)], "lm_head"]
    assert text_forward == image_forward
    assert text_arrivals == image_arrivals
    assert image_forward == expected
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(image_arrivals) == trainable and len(image_arrivals) == len(trainable)


def test_text_only_batch_gives_the_plain_lm_loss_and_exactly_zero_projector_gradients(samples):
    cfg, data = samples
    model, pad = model_for(cfg, "finetune")
    llava = llava_of(model)
    batch = batch_of(data, [1, 3], pad)
    assert batch.pixel_values.shape[0] == 0
    loss = summed_token_loss(model, batch, torch.float32)
    loss.backward()
    for name, p in llava.model.multi_modal_projector.named_parameters():
        assert p.grad is not None, name  # it took part in the backward, as on an image rank
        assert torch.count_nonzero(p.grad) == 0, name
    assert any(torch.count_nonzero(p.grad) for p in llava.model.language_model.parameters())
    with torch.no_grad():
        # No cache: with one, transformers ignores packed position ids and lets samples see each other.
        hidden = llava.model.language_model(
            input_ids=batch.input_ids,
            position_ids=batch.position_ids,
            attention_mask=batch.attention_mask,
            use_cache=False,
        ).last_hidden_state
        logits = llava.lm_head(hidden)
        plain = F.cross_entropy(
            logits.view(-1, logits.shape[-1]), batch.targets.view(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
    torch.testing.assert_close(loss.detach(), plain, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["pack", "pad"])
def test_image_batches_compute_what_transformers_llava_forward_computes(samples, mode):
    cfg, data = samples
    model, pad = model_for(cfg, "finetune")
    llava = llava_of(model)
    batch = batch_of(data, [0, 1, 2, 3], pad, mode)  # two images among four samples
    assert batch.pixel_values.shape[0] == 2
    with torch.no_grad():
        ours = forward_logits(model, batch, torch.float32)
        theirs = llava(**model_kwargs(batch, torch.float32)).logits
        loss = summed_token_loss(model, batch, torch.float32)
        ref = F.cross_entropy(
            theirs.view(-1, theirs.shape[-1]), batch.targets.view(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    assert "forward" not in vars(llava), "the vision-first forward outlived its call"


def test_image_token_count_must_match_the_images(samples):
    cfg, data = samples
    model, pad = model_for(cfg, "align")
    batch = batch_of(data, [0, 2], pad)
    batch.pixel_values = batch.pixel_values[:1]  # two image placeholders, one image
    with pytest.raises(ValueError, match="image tokens and image features do not match"):
        forward_logits(model, batch, torch.float32)
