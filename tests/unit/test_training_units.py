"""LR scaling, schedule, parameter groups, the generated DeepSpeed config and `plan`."""

from __future__ import annotations

import math

import pytest

from vistralv_ray.cli.main import main
from vistralv_ray.config import config_from_dict
from vistralv_ray.config.schema import LoraSettings
from vistralv_ray.training.optim import build_param_groups, lr_lambda, warmup_steps_for
from vistralv_ray.training.scaling import lr_plan, scaled_learning_rate
from vistralv_ray.training.strategy import build_deepspeed_config


@pytest.mark.parametrize(
    "base, global_batch, reference, rule, expected",
    [
        (2e-4, 8, 128, "linear", 1.25e-5),  # Vistral-V's own LoRA finetune
        (2e-4, 128, 128, "linear", 2e-4),  # LLaVA's reference: unchanged
        (1e-3, 16, 256, "linear", 6.25e-5),
        (1e-3, 64, 256, "sqrt", 5e-4),
        (2e-5, 512, 128, "sqrt", 4e-5),
        (1e-3, 8, 256, "none", 1e-3),  # Vistral-V's unscaled pretrain, whose loss overshot
    ],
)
def test_lr_rule_table(base, global_batch, reference, rule, expected):
    assert scaled_learning_rate(base, global_batch, reference, rule) == pytest.approx(expected, rel=1e-12)


def test_lr_plan_arithmetic_and_projector_lr():
    cfg = config_from_dict(
        {},
        [
            "train.stage=finetune",
            "train.base_lr=2e-4",
            "train.projector_lr_scale=0.1",
            "scaling.workers=1",
            "data.per_device_batch=8",
        ],
    )
    plan = lr_plan(cfg)
    assert plan.global_batch == 8 and plan.reference_batch == 128
    assert plan.effective_lr == pytest.approx(1.25e-5)
    assert plan.projector_lr == pytest.approx(1.25e-6)
    assert "1 workers x 8 per device x 1 accum = 8" in plan.arithmetic()
    align = lr_plan(config_from_dict({}, ["train.projector_lr_scale=0.1", "scaling.workers=2"]))
    assert align.projector_lr == align.effective_lr  # in align the projector is the model


def test_schedule_warmup_then_cosine_to_zero():
    f = lr_lambda(total_steps=100, warmup_steps=warmup_steps_for(100, 0.03), schedule="cosine")
    assert f(0) == pytest.approx(1 / 3) and f(2) == pytest.approx(1.0)
    assert f(3) == pytest.approx(1.0)
    assert f(100) == pytest.approx(0.0, abs=1e-12)
    assert f(51) == pytest.approx(0.5 * (1 + math.cos(math.pi * 48 / 97)))
    assert lr_lambda(10, 0, "linear")(5) == pytest.approx(0.5)
    assert lr_lambda(10, 0, "constant")(9) == 1.0


def test_param_groups_split_projector_and_no_decay(tiny_model_config):
    from vistralv_ray.model.assembly import apply_stage, build_model

    model = apply_stage(build_model(tiny_model_config).model, "finetune", LoraSettings())
    groups = {g["name"]: g for g in build_param_groups(model, lr=1e-4, projector_lr=1e-5, weight_decay=0.1)}
    assert set(groups) == {"model", "model_no_decay", "projector", "projector_no_decay"}
    assert groups["projector"]["lr"] == 1e-5 and groups["model"]["lr"] == 1e-4
    assert all(n.endswith("bias") for n in groups["projector_no_decay"]["param_names"])
    assert any("norm" in n for n in groups["model_no_decay"]["param_names"])
    assert groups["model_no_decay"]["weight_decay"] == 0.0 and groups["model"]["weight_decay"] == 0.1
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for g in groups.values() for p in g["params"]) == n_trainable


def test_param_group_pattern_that_matches_nothing_is_an_error(tiny_model_config):
    from vistralv_ray.model.assembly import build_model

    model = build_model(tiny_model_config).model
    model.requires_grad_(False)
    model.model.language_model.norm.requires_grad_(True)
    with pytest.raises(ValueError, match="matches no trainable parameter"):
        build_param_groups(model, 1e-4, 1e-4, 0.0)


def test_deepspeed_config_generated_from_ours():
    cfg = config_from_dict(
        {},
        [
            "train.zero_stage=3",
            "train.offload_optimizer=true",
            "train.offload_params=true",
            "train.grad_accum=4",
            "data.per_device_batch=2",
            "train.grad_clip=0.5",
        ],
    )
    ds = build_deepspeed_config(cfg, world_size=8, on_gpu=True)
    assert ds["train_batch_size"] == 2 * 4 * 8 and ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    cpu = build_deepspeed_config(config_from_dict({}), world_size=2, on_gpu=False)
    assert not cpu["bf16"]["enabled"] and cpu["zero_optimization"]["stage"] == 2
    assert "offload_optimizer" not in cpu["zero_optimization"]
    assert zero["contiguous_gradients"] and not cpu["zero_optimization"]["contiguous_gradients"]
    with pytest.raises(ValueError, match="train.precision"):
        build_deepspeed_config(config_from_dict({}, ["train.precision=bf16"]), world_size=1, on_gpu=False)


def test_plan_prints_vistral_v_effective_lr(capsys):
    code = main(
        [
            "plan",
            "jobs/finetune.yaml",
            "--workers",
            "1",
            "--per-device-batch",
            "8",
            "--base-lr",
            "2e-4",
            "--reference-batch",
            "128",
            "--lr-rule",
            "linear",
            "--gpu-memory-gb",
            "80",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "effective_lr=1.25e-05" in out.splitlines()
    assert "global_batch=8" in out
    assert "zero2" in out and "zero3_offload" in out and "recommendation:" in out


def test_plan_align_7b_fits_one_80gb_gpu(capsys):
    main(["plan", "jobs/align.yaml", "--workers", "1", "--per-device-batch", "16", "--gpu-memory-gb", "80"])
    out = capsys.readouterr().out
    assert "recommendation: ZeRO-2 fits in 80 GB" in out


def test_flops_count_frozen_parts_right(tiny_model_config):
    """6N per token for a trained LM, 4N for a frozen one (input gradients only), 6N for LoRA
    adapters, a forward pass (2N per patch) for the frozen vision tower, 6N for the projector."""
    from vistralv_ray.model.assembly import apply_stage, build_model
    from vistralv_ray.training.metrics import FlopModel

    def counts(model):
        inner = model.model
        embed = inner.language_model.embed_tokens.weight.numel()
        lm = sum(p.numel() for p in inner.language_model.parameters()) - embed + model.lm_head.weight.numel()
        vision = sum(p.numel() for p in inner.vision_tower.parameters())
        projector = sum(p.numel() for p in inner.multi_modal_projector.parameters())
        return lm, vision, projector, model.config.image_seq_length

    align = FlopModel.of(apply_stage(build_model(tiny_model_config).model, "align", LoraSettings()))
    full = FlopModel.of(apply_stage(build_model(tiny_model_config).model, "finetune", LoraSettings()))
    lora_model = apply_stage(build_model(tiny_model_config).model, "finetune", LoraSettings(enabled=True, r=4))
    lora = FlopModel.of(lora_model)
    lm, vision, projector, patches = counts(build_model(tiny_model_config).model)
    adapters = sum(p.numel() for n, p in lora_model.named_parameters() if "lora_" in n)
    assert adapters > 0

    assert align.step_flops(100, 0, 0) == 4 * lm * 100
    assert full.step_flops(100, 0, 0) == 6 * lm * 100
    assert lora.step_flops(100, 0, 0) == 4 * lm * 100 + 6 * adapters * 100
    assert align.step_flops(0, 0, 2) == 2 * (2 * vision + 6 * projector) * patches
    text = build_model(tiny_model_config).model.config.text_config
    # Causal attention: 2 l^2 d per layer forward (QK^T and AV, half the square), x3 with backward.
    assert full.step_flops(0, 10**2 + 20**2, 0) == 6 * text.num_hidden_layers * text.hidden_size * 500


@pytest.mark.parametrize("workers", [1, 8, 64])
@pytest.mark.parametrize("lora", [False, True])
def test_plan_model_states_match_deepspeeds_estimators_at_7b(workers, lora):
    """DeepSpeed's estimators count a model that trains every parameter: applied to the parameters that
    train here (the LM and projector, or the adapters and projector), plus the frozen weights in bf16."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs, model_to_params
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from vistralv_ray.config import load_config
    from vistralv_ray.training.memory import meta_model_for, model_sizes, model_state_bytes

    cfg = load_config("jobs/finetune.yaml", [f"model.lora.enabled={str(lora).lower()}"])
    sizes = model_sizes(cfg)
    model = meta_model_for(cfg)
    vision = sum(p.numel() for p in model.model.vision_tower.parameters())
    if not lora:
        assert sizes.trainable == sum(p.numel() for p in model.parameters()) - vision  # the 7B LM + projector
    assert sizes.trainable > 1e8 and sizes.total > 7e9
    _, largest = model_to_params(model)
    _, ds_zero2 = estimate_zero2_model_states_mem_needs(sizes.trainable, workers, 1, cpu_offload=False)
    _, ds_zero3, _ = estimate_zero3_model_states_mem_needs(sizes.trainable, largest, workers, 1, cpu_offload=False)
    _, ds_offload, _ = estimate_zero3_model_states_mem_needs(sizes.trainable, largest, workers, 1)
    ours = model_state_bytes(sizes, workers)
    assert ours["zero2"] == pytest.approx(ds_zero2 + 2 * sizes.frozen, rel=0.05)
    assert ours["zero3"] == pytest.approx(ds_zero3 + 2 * sizes.frozen / workers, rel=0.05)
    assert ours["zero3_offload"] == pytest.approx(ds_offload, rel=0.05)


def test_activation_memory_counts_logits_attention_and_checkpointing():
    from vistralv_ray.config import load_config
    from vistralv_ray.training.memory import activation_bytes, model_sizes

    sizes = model_sizes(load_config("jobs/finetune.yaml"))
    tokens, h = 4096, sizes.hidden
    flash = activation_bytes(sizes, tokens, checkpointing=False, seq_len=2048, attn="flash_attention_2")
    layer = 18 * h + 4 * sizes.kv_hidden + 8 * sizes.intermediate
    assert flash == tokens * (sizes.layers * layer + 14 * sizes.vocab)
    assert sizes.vocab > 32000 and sizes.kv_hidden == 1024 and sizes.intermediate == 14336  # Mistral-7B
    ckpt = activation_bytes(sizes, tokens, checkpointing=True, seq_len=2048, attn="flash_attention_2")
    assert ckpt == tokens * (sizes.layers * 2 * h + layer + 14 * sizes.vocab)
    # sdpa on packed rows: a dense S x S mask per row; eager: bf16 scores and probabilities per head.
    sdpa = activation_bytes(sizes, tokens, checkpointing=True, seq_len=2048, attn="sdpa")
    assert sdpa - ckpt == 2 * 2048 * 2048
    eager = activation_bytes(sizes, tokens, checkpointing=False, seq_len=2048, attn="eager")
    assert eager - flash == 2 * sizes.layers * sizes.heads * 2048 * 2048 * 4
