"""`export`'s options without a training run: dtype, shard size, overwrite, a run or one of its
checkpoints as the source, and an `aspect: resize` model's processor, which does not pad.

The checkpoint directories here hold what export reads besides DeepSpeed's shards (config.yaml,
trainer_state.json, run.json); gathering the shards (`trained_model`) is replaced by a freshly
assembled tiny model, told apart per checkpoint by its weights. Gathering real shards, and a
checkpoint that does not fit its config, are tests/integration/test_export.py's.
"""

from __future__ import annotations

import argparse
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from vistralv_ray.config import dump_config
from vistralv_ray.config.schema import Config, ModelConfig, TrainConfig
from vistralv_ray.data.runs import CONFIG_FILE, RUN_INFO_FILE, STATE_FILE, IncompleteCheckpointError, mark_complete
from vistralv_ray.inference import export as export_module


def make_checkpoint(directory, model_cfg: ModelConfig, step: int, precision: str = "fp32", stage: str = "align"):
    directory.mkdir(parents=True)
    dump_config(Config(model=model_cfg, train=TrainConfig(stage=stage)), directory / CONFIG_FILE)
    (directory / STATE_FILE).write_text(json.dumps({"step": step, "tag": f"global_step{step}"}))
    (directory / RUN_INFO_FILE).write_text(json.dumps({"precision": precision}))
    mark_complete(str(directory), step)  # DeepSpeed's shards are faked: only the marker says complete
    return directory


@pytest.fixture()
def fake_gather(monkeypatch):
    """`trained_model` -> the assembled tiny model of the checkpoint's config, its projector filled
    with the checkpoint's step (so an export shows which checkpoint it came from)."""
    from vistralv_ray.model.assembly import build_model

    def trained_model(ckpt):
        assembled = build_model(ckpt.config.model)
        with torch.no_grad():
            assembled.model.model.multi_modal_projector.linear_1.bias.fill_(float(ckpt.step))
        return assembled.model.eval(), assembled

    monkeypatch.setattr(export_module, "trained_model", trained_model)


def model_config(tiny_assets, aspect: str = "pad") -> ModelConfig:
    return ModelConfig(
        language_model=str(tiny_assets["llm"]), vision_tower=str(tiny_assets["vision"]), max_length=256, aspect=aspect
    )


def weight_dtypes(out) -> set[str]:
    dtypes = set()
    for path in out.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            dtypes |= {str(f.get_slice(k).get_dtype()) for k in f.keys()}
    return dtypes


def exported_step(out) -> float:
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32)
    return float(model.model.multi_modal_projector.linear_1.bias[0])


@pytest.mark.parametrize(
    ("precision", "dtype", "expected"),
    [("bf16", "auto", "BF16"), ("fp32", "auto", "F32"), ("bf16", "float16", "F16"), ("bf16", "float32", "F32")],
)
def test_dtype_auto_follows_the_training_precision_and_an_explicit_one_wins(
    tiny_assets, tmp_path, fake_gather, precision, dtype, expected
):
    ckpt = make_checkpoint(tmp_path / "ckpt", model_config(tiny_assets), step=3, precision=precision)
    out = export_module.export(str(ckpt), tmp_path / "out", dtype=dtype)
    assert weight_dtypes(out) == {expected}
    name = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[expected]
    assert json.loads((out / "vistralv_export.json").read_text())["dtype"] == name
    assert json.loads((out / "config.json").read_text())["dtype"] == name
    with pytest.raises(ValueError, match="dtype: unknown 'float8'"):
        export_module.export(str(ckpt), tmp_path / "other", dtype="float8")
    assert not (tmp_path / "other").exists()


def test_max_shard_size_splits_the_weights_and_they_load_back_whole(tiny_assets, tmp_path, fake_gather):
    from transformers import LlavaForConditionalGeneration

    ckpt = make_checkpoint(tmp_path / "ckpt", model_config(tiny_assets), step=5)
    whole = export_module.export(str(ckpt), tmp_path / "whole")
    sharded = export_module.export(str(ckpt), tmp_path / "sharded", max_shard_size="200KB")
    assert [p.name for p in whole.glob("*.safetensors")] == ["model.safetensors"]
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 2 and all(p.stat().st_size < 400_000 for p in shards)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    a = LlavaForConditionalGeneration.from_pretrained(str(whole)).state_dict()
    b = LlavaForConditionalGeneration.from_pretrained(str(sharded)).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_export_is_replaced_only_with_overwrite(tiny_assets, tmp_path, fake_gather):
    run = tmp_path / "run"
    make_checkpoint(run / "checkpoint-000002", model_config(tiny_assets), step=2)
    out = export_module.export(str(run), tmp_path / "out")
    (out / "notes.txt").write_text("a file of the old export")
    make_checkpoint(run / "checkpoint-000004", model_config(tiny_assets), step=4)
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_module.export(str(run), out)
    assert exported_step(out) == 2 and (out / "notes.txt").is_file()  # untouched
    export_module.export(str(run), out, overwrite=True)
    assert exported_step(out) == 4 and not (out / "notes.txt").exists()  # replaced whole, not merged
    assert json.loads((out / "vistralv_export.json").read_text())["step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]  # no partial or old copies left
    (tmp_path / "empty").mkdir()
    export_module.export(str(run), tmp_path / "empty")  # an empty directory is no export to protect


def test_a_run_exports_its_newest_checkpoint_and_a_checkpoint_itself(tiny_assets, tmp_path, fake_gather):
    run = tmp_path / "run"
    for step in (2, 10, 4):
        make_checkpoint(run / f"checkpoint-{step:06d}", model_config(tiny_assets), step=step)
    newest = export_module.export(str(run), tmp_path / "newest")
    info = json.loads((newest / "vistralv_export.json").read_text())
    assert (info["step"], info["source"]) == (10, str(run / "checkpoint-000010"))
    assert exported_step(newest) == 10
    older = export_module.export(str(run / "checkpoint-000004"), tmp_path / "older")
    assert json.loads((older / "vistralv_export.json").read_text())["step"] == 4 and exported_step(older) == 4
    (tmp_path / "not-a-run").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        export_module.export(str(tmp_path / "not-a-run"), tmp_path / "x")
    (run / "checkpoint-000012").mkdir()  # an upload cut short: newer, never exported
    (run / "checkpoint-000012" / STATE_FILE).write_text(json.dumps({"step": 12, "tag": "global_step12"}))
    assert json.loads((export_module.export(str(run), tmp_path / "y") / "vistralv_export.json").read_text())[
        "source"
    ] == str(run / "checkpoint-000010")
    with pytest.raises(IncompleteCheckpointError, match="incomplete checkpoint"):
        export_module.export(str(run / "checkpoint-000012"), tmp_path / "z")
    mark_complete(str(run / "checkpoint-000012"), 12)
    with pytest.raises(FileNotFoundError, match="not a vistralv-ray checkpoint"):
        export_module.export(str(run), tmp_path / "z")
    assert not (tmp_path / "z").exists()


def test_a_resize_model_exports_a_processor_that_resizes_without_padding(tiny_assets, tmp_path, fake_gather):
    from transformers import AutoProcessor

    from vistralv_ray.data.images import decode_to_pixels, pixel_stats

    pixels = {}
    for aspect in ("resize", "pad"):
        ckpt = make_checkpoint(tmp_path / f"ckpt-{aspect}", model_config(tiny_assets, aspect), step=1)
        out = export_module.export(str(ckpt), tmp_path / aspect)
        assert json.loads((out / "vistralv_export.json").read_text())["aspect"] == aspect
        processor = AutoProcessor.from_pretrained(str(out))
        assert processor.image_processor.do_pad is (aspect == "pad")
        wide = Image.new("RGB", (96, 32), (220, 20, 20))  # a red band 3x as wide as high
        x = processor.image_processor(images=[wide], return_tensors="pt")["pixel_values"][0]
        mean = torch.tensor(processor.image_processor.image_mean)[:, None, None]
        std = torch.tensor(processor.image_processor.image_std)[:, None, None]
        pixels[aspect] = ((x * std + mean) * 255).round().permute(1, 2, 0).numpy()
        png = tmp_path / "wide.png"
        wide.save(png)
        fill = pixel_stats(str(tiny_assets["vision"])).fill
        assert np.abs(pixels[aspect] - decode_to_pixels(png.read_bytes(), 32, aspect, fill=fill)).max() <= 2
    assert (np.abs(pixels["resize"] - [220, 20, 20]) <= 2).all()  # all red: stretched, no bands
    assert (np.abs(pixels["pad"][0] - pixels["pad"][0, 0]) == 0).all() and abs(pixels["pad"][0, 0, 0] - 220) > 50


def test_export_command_passes_its_options(monkeypatch, tmp_path, capsys):
    from vistralv_ray.cli import infer
    from vistralv_ray.cli.main import build_parser

    calls = []
    monkeypatch.setattr(export_module, "export", lambda *a, **kw: calls.append((a, kw)) or tmp_path / "out")
    args = build_parser().parse_args(
        ["export", "runs/x", str(tmp_path / "out"), "--dtype", "float16", "--max-shard-size", "1GB", "--overwrite"]
    )
    assert args.func is infer.export and isinstance(args, argparse.Namespace)
    assert infer.export(args) == 0
    assert calls == [(("runs/x", tmp_path / "out"), {"dtype": "float16", "overwrite": True, "max_shard_size": "1GB"})]
    assert f"exported to {tmp_path / 'out'}" in capsys.readouterr().out
    defaults = build_parser().parse_args(["export", "runs/x", "out"])
    assert (defaults.dtype, defaults.max_shard_size, defaults.overwrite) == ("auto", "5GB", False)


ALL = ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.mark.parametrize(
    ("trained_with", "config_says", "why"),
    [
        (("finetune", True, 8, ALL), ("finetune", True, 4, ALL), "other shapes"),  # another LoRA rank
        (("align", False, 8, ALL), ("finetune", False, 8, ALL), "missing"),  # a projector, but a full finetune
        (("finetune", True, 8, ALL), ("finetune", True, 8, ("q_proj",)), "unexpected"),  # adapters on more layers
    ],
)
def test_a_checkpoint_that_does_not_fit_its_config_is_refused_by_name(
    tiny_assets, tmp_path, monkeypatch, trained_with, config_says, why
):
    """What `trained_model` gathers from the shards (trainable parameters only) is compared with what
    the config builds before anything is loaded. The shards are stood in for by the trainable state of
    the model that was really trained."""
    import dataclasses

    from deepspeed.utils import zero_to_fp32

    from vistralv_ray.config.schema import LoraSettings
    from vistralv_ray.model.assembly import apply_stage, build_model

    def stage(run: tuple) -> tuple[str, ModelConfig, LoraSettings]:
        name, lora, r, targets = run
        settings = LoraSettings(enabled=lora, r=r, alpha=16, target_modules=list(targets))
        return name, dataclasses.replace(model_config(tiny_assets), lora=settings), settings

    trained_stage, trained_cfg, trained_lora = stage(trained_with)
    trained = apply_stage(build_model(trained_cfg).model, trained_stage, trained_lora)
    shards = {n: p.detach().clone() for n, p in trained.named_parameters() if p.requires_grad}
    monkeypatch.setattr(zero_to_fp32, "get_fp32_state_dict_from_zero_checkpoint", lambda *a, **kw: shards)

    config_stage, config_cfg, _ = stage(config_says)
    with export_module.open_checkpoint(str(make_checkpoint(tmp_path / "ckpt", config_cfg, 4, stage=config_stage))) as c:
        with pytest.raises(ValueError, match="does not fit the model its config builds") as refused:
            export_module.trained_model(c)
    reasons = dict(re.findall(r"(missing|unexpected|other shapes) (\[[^]]*\])", str(refused.value)))
    assert [k for k, v in reasons.items() if v != "[]"] == [why], str(refused.value)
    # The same shards under the config they were trained with load (and LoRA is merged).
    right = make_checkpoint(tmp_path / "right", trained_cfg, 4, stage=trained_stage)
    with export_module.open_checkpoint(str(right)) as c:
        model, _ = export_module.trained_model(c)
    assert not any("lora" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(
        model.model.multi_modal_projector.linear_1.weight,
        shards[next(n for n in shards if n.endswith("multi_modal_projector.linear_1.weight"))],
    )
