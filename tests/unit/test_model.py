"""Model assembly: the Llava layout Vistral-V uses, freezing by stage, gradients, the 7B meta model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from vistralv_ray.config.schema import LoraSettings
from vistralv_ray.model.assembly import apply_stage, build_model, load_projector, save_projector
from vistralv_ray.model.presets import build_meta_model, parameter_counts


def trainable_names(model):
    return [n for n, p in model.named_parameters() if p.requires_grad]


def test_llava_config_matches_vistral_v(tiny_model_config):
    assembled = build_model(tiny_model_config)
    cfg = assembled.model.config
    assert cfg.vision_feature_layer == -2
    assert cfg.vision_feature_select_strategy == "full"
    assert cfg.image_seq_length == (32 // 8) ** 2  # all patches: no CLS-style drop
    assert cfg.image_token_index == assembled.tokenizer.convert_tokens_to_ids("<image>")
    emb = assembled.model.get_input_embeddings()
    assert emb.num_embeddings == len(assembled.tokenizer)


def test_align_trains_projector_only(tiny_model_config):
    model = apply_stage(build_model(tiny_model_config).model, "align", LoraSettings())
    names = trainable_names(model)
    assert names and all("multi_modal_projector" in n for n in names)


def test_full_finetune_trains_every_parameter_outside_the_vision_tower(tiny_model_config):
    model = apply_stage(build_model(tiny_model_config).model, "finetune", LoraSettings())
    params = dict(model.named_parameters())  # a tied lm_head appears once, as its embedding
    frozen = sorted(n for n, p in params.items() if not p.requires_grad)
    assert frozen and all(n.startswith("model.vision_tower.") for n in frozen), frozen
    vision = {n for n in params if n.startswith("model.vision_tower.")}
    assert set(frozen) == vision  # the whole tower, and nothing else: embeddings, norms and lm_head train too
    trainable = set(trainable_names(model))
    assert trainable == set(params) - vision
    for prefix in ("model.multi_modal_projector.", "model.language_model.embed_tokens.", "model.language_model.norm."):
        assert any(n.startswith(prefix) for n in trainable), prefix
    assert model.get_output_embeddings().weight.requires_grad


def test_lora_finetune_trains_adapters_and_projector(tiny_model_config):
    model = apply_stage(build_model(tiny_model_config).model, "finetune", LoraSettings(enabled=True, r=4, alpha=8))
    names = trainable_names(model)
    assert any("multi_modal_projector" in n for n in names)
    assert {n for n in names if "multi_modal_projector" not in n}, "no LoRA adapters"
    for n in names:
        assert "multi_modal_projector" in n or ("lora_" in n and "language_model" in n), n


def test_forward_with_image_gives_finite_loss_and_projector_gradients(tiny_model_config):
    assembled = build_model(tiny_model_config)
    model = apply_stage(assembled.model, "align", LoraSettings())
    tok = assembled.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    text = tok("Màu đỏ.", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[tok.bos_token_id] + [image_id] * assembled.image_seq_length + text])
    labels = ids.clone()
    labels[:, : 1 + assembled.image_seq_length] = -100
    pixels = torch.rand(1, 3, assembled.image_size, assembled.image_size) * 2 - 1
    out = model(input_ids=ids, pixel_values=pixels, labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    proj = model.model.multi_modal_projector
    assert proj.linear_1.weight.grad is not None and proj.linear_1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.model.vision_tower.parameters())


def test_projector_round_trip(tiny_model_config, tmp_path):
    first = build_model(tiny_model_config).model
    with torch.no_grad():
        first.model.multi_modal_projector.linear_2.weight.add_(1.0)
    save_projector(first, tmp_path / "projector.safetensors")
    second = build_model(tiny_model_config).model
    load_projector(second, tmp_path)
    torch.testing.assert_close(
        second.model.multi_modal_projector.linear_2.weight, first.model.multi_modal_projector.linear_2.weight
    )


def test_meta_7b_parameter_count():
    counts = parameter_counts(build_meta_model("vistral-7b-siglip-256"))
    h, inter, layers, vocab, kv = 4096, 14336, 32, 38369 + 1, 1024
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * inter + 2 * h
    assert counts["language_model"] == layers * per_layer + h + 2 * vocab * h
    assert counts["projector"] == (768 * h + h) + (h * h + h)
    v, vi = 768, 3072
    vision_layer = 4 * (v * v + v) + 2 * 2 * v + (v * vi + vi) + (vi * v + v)
    embeddings = 3 * 16 * 16 * v + v + 256 * v
    head = v + (3 * v * v + 3 * v) + (v * v + v) + 2 * v + (v * vi + vi) + (vi * v + v)
    assert counts["vision_tower"] == embeddings + 12 * vision_layer + 2 * v + head
    assert 7.2e9 < sum(counts.values()) < 7.5e9


def test_tiny_assets_load_with_plain_transformers(tiny_assets):
    script = f"""
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer, SiglipVisionModel
lm = AutoModelForCausalLM.from_pretrained({str(tiny_assets["llm"])!r})
tok = AutoTokenizer.from_pretrained({str(tiny_assets["llm"])!r})
vision = SiglipVisionModel.from_pretrained({str(tiny_assets["vision"])!r})
text = "Trợ lý đưa ra câu trả lời hữu ích, chi tiết và lịch sự."
print(json.dumps({{"lm": type(lm).__name__, "vision": type(vision).__name__,
                  "round_trip": tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text,
                  "ours_imported": any(m.startswith("vistralv_ray") for m in sys.modules)}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {
        "lm": "MistralForCausalLM",
        "vision": "SiglipVisionModel",
        "round_trip": True,
        "ours_imported": False,
    }


def test_unknown_stage_is_an_error(tiny_model_config):
    with pytest.raises(ValueError, match="train.stage"):
        apply_stage(build_model(tiny_model_config).model, "pretrain", LoraSettings())
