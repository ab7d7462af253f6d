"""Packing changes the layout, not the loss: packed == unpacked, and per-sample attention holds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vistralv_ray.config.schema import LoraSettings
from vistralv_ray.data.packing import layout_batch
from vistralv_ray.model.assembly import apply_stage, build_model
from vistralv_ray.text.conversation import normalize_messages
from vistralv_ray.text.templates import get_chat_template
from vistralv_ray.training.step import summed_token_loss


@pytest.fixture(scope="module")
def samples(tiny_assets):
    from vistralv_ray.config.schema import ModelConfig
    from vistralv_ray.text.encoder import build_encoder

    cfg = ModelConfig(language_model=str(tiny_assets["llm"]), vision_tower=str(tiny_assets["vision"]), max_length=256)
    encoder = build_encoder(cfg)
    assert encoder.chat_template == get_chat_template("vistral")
    rng = np.random.default_rng(0)
    convs = [
        ([{"from": "human", "value": "<image>\nHình có màu gì?"}, {"from": "gpt", "value": "Màu đỏ."}], True),
        ([{"from": "human", "value": "Xin chào"}, {"from": "gpt", "value": "Chào bạn, tôi có thể giúp gì?"}], False),
        (
            [
                {"from": "human", "value": "Có mấy hình?\n<image>"},
                {"from": "gpt", "value": "Ba."},
                {"from": "human", "value": "Màu gì?"},
                {"from": "gpt", "value": "Màu xanh dương."},
            ],
            True,
        ),
    ]
    out = []
    for turns, has_image in convs:
        enc = encoder.encode(normalize_messages(turns, has_image))
        image = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8) if has_image else None
        out.append((enc.input_ids, enc.labels, image))
    return cfg, out


def test_packed_loss_equals_unpacked(samples):
    cfg, data = samples
    torch.manual_seed(0)
    assembled = build_model(cfg)
    model = apply_stage(assembled.model, "align", LoraSettings()).eval()
    pad = assembled.tokenizer.pad_token_id
    ids, labels, images = zip(*data, strict=True)
    packed = layout_batch(list(ids), list(labels), list(images), pad, "pack", None, (32, 32, 3))
    padded = layout_batch(list(ids), list(labels), list(images), pad, "pad", None, (32, 32, 3))
    assert packed.input_ids.shape[0] == 1 and padded.input_ids.shape[0] == 3
    assert packed.nonpad_fraction > padded.nonpad_fraction
    assert packed.num_target_tokens == padded.num_target_tokens
    with torch.no_grad():
        loss_packed = summed_token_loss(model, packed, torch.float32) / packed.num_target_tokens
        loss_padded = summed_token_loss(model, padded, torch.float32) / padded.num_target_tokens
        separate = (
            sum(
                summed_token_loss(model, layout_batch([i], [lab], [im], pad, "pad", None, (32, 32, 3)), torch.float32)
                for i, lab, im in data
            )
            / packed.num_target_tokens
        )
    assert abs(loss_packed.item() - loss_padded.item()) < 1e-5
    assert abs(loss_packed.item() - separate.item()) < 1e-5


def test_packing_without_position_reset_would_differ(samples):
    """The equivalence above is not vacuous: attending across samples changes the loss."""
    cfg, data = samples
    torch.manual_seed(0)
    assembled = build_model(cfg)
    model = apply_stage(assembled.model, "align", LoraSettings()).eval()
    pad = assembled.tokenizer.pad_token_id
    ids, labels, images = zip(*data, strict=True)
    packed = layout_batch(list(ids), list(labels), list(images), pad, "pack", None, (32, 32, 3))
    leaky = layout_batch(list(ids), list(labels), list(images), pad, "pack", None, (32, 32, 3))
    leaky.position_ids = torch.arange(leaky.input_ids.shape[1]).unsqueeze(0)
    with torch.no_grad():
        a = summed_token_loss(model, packed, torch.float32)
        b = summed_token_loss(model, leaky, torch.float32)
    assert abs(a.item() - b.item()) > 1e-3


def _losses_by_layout(cfg, data, attn: str, device: str = "cpu", dtype=torch.float32):
    """Summed loss of the samples packed into several rows, padded, and one by one."""
    torch.manual_seed(0)
    assembled = build_model(cfg, dtype=dtype, attn_implementation=attn)
    model = apply_stage(assembled.model, "align", LoraSettings()).eval().to(device)
    pad = assembled.tokenizer.pad_token_id
    ids, labels, images = zip(*data, strict=True)
    longest = max(len(i) for i in ids)
    packed = layout_batch(list(ids) * 2, list(labels) * 2, list(images) * 2, pad, "pack", 2 * longest + 4, (32, 32, 3))
    with torch.no_grad():
        multi_row = summed_token_loss(model, packed.to(device), dtype).item()
        separate = sum(
            summed_token_loss(model, layout_batch([i], [lab], [im], pad, "pad", None, (32, 32, 3)).to(device), dtype)
            for i, lab, im in data
        ).item()
    return packed, multi_row, 2 * separate


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_several_packed_rows_give_the_unpacked_loss(samples, attn):
    cfg, data = samples
    packed, multi_row, separate = _losses_by_layout(cfg, data, attn)
    assert packed.input_ids.shape[0] >= 3  # several packed rows, several samples in some of them
    assert packed.num_samples > packed.input_ids.shape[0]
    assert multi_row == pytest.approx(separate, rel=1e-5)


def test_flattening_packed_rows_keeps_the_loss(samples, monkeypatch):
    """The FlashAttention path (packed rows as one row) computes what the rows compute, here on sdpa."""
    from vistralv_ray.model import forward

    cfg, data = samples
    packed, rows_loss, separate = _losses_by_layout(cfg, data, "sdpa")
    monkeypatch.setattr(forward, "PACKING_EXACT", ())
    monkeypatch.setattr(forward, "PACKING_FLATTENED", ("sdpa",))
    calls = []
    original = forward.flattens_packed_rows
    monkeypatch.setattr(forward, "flattens_packed_rows", lambda *a: calls.append(original(*a)) or calls[-1])
    _, flat_loss, _ = _losses_by_layout(cfg, data, "sdpa")
    assert True in calls, "the flattened path was not taken"
    assert flat_loss == pytest.approx(rows_loss, rel=1e-5) and flat_loss == pytest.approx(separate, rel=1e-5)


def test_which_kernels_flatten_packed_rows():
    from vistralv_ray.model.forward import flattens_packed_rows

    positions = torch.tensor([[0, 1, 0, 1], [0, 1, 2, 0]])
    assert flattens_packed_rows("flash_attention_2", 2, None, positions)
    assert not flattens_packed_rows("flash_attention_2", 1, None, positions[:1])  # one row: FA2 sees the ids
    assert not flattens_packed_rows("flash_attention_2", 2, torch.ones(2, 4), positions)  # padded rows
    assert not flattens_packed_rows("sdpa", 2, None, positions) and not flattens_packed_rows(
        "eager", 2, None, positions
    )
    with pytest.raises(ValueError, match="model.attn_implementation 'paged_attention'.*data.batching=pad"):
        flattens_packed_rows("paged_attention", 2, None, positions)


def _flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(not _flash_attn_available(), reason="needs CUDA and flash-attn")
def test_several_packed_rows_give_the_unpacked_loss_on_flash_attention_2(samples):
    cfg, data = samples
    _, multi_row, separate = _losses_by_layout(cfg, data, "flash_attention_2", "cuda", torch.bfloat16)
    assert multi_row == pytest.approx(separate, rel=2e-2)
