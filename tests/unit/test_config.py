"""The config tree: YAML + overrides, and errors that name the key and the allowed values."""

from __future__ import annotations

import json

import pytest
import yaml

from vistralv_ray.config import ConfigError, config_from_dict, dump_config, load_config


def test_defaults_and_derived_values():
    cfg = config_from_dict({"train": {"stage": "finetune"}, "scaling": {"workers": 2}, "data": {"per_device_batch": 4}})
    assert cfg.run_name == "finetune-seed42"
    assert cfg.reference_batch == 128
    assert cfg.global_batch == 8
    assert config_from_dict({}).reference_batch == 256


def test_overrides_parse_yaml_values():
    cfg = config_from_dict(
        {},
        [
            "train.base_lr=2e-4",
            "model.lora.enabled=true",
            "train.stage=finetune",
            "data.train=[a.parquet, b.parquet]",
            "train.zero_stage=3",
        ],
    )
    assert cfg.train.base_lr == pytest.approx(2e-4)
    assert cfg.model.lora.enabled is True
    assert cfg.data.train == ["a.parquet", "b.parquet"]
    assert cfg.train.zero_stage == 3


@pytest.mark.parametrize(
    "data, overrides, key, hint",
    [
        ({"trian": {}}, [], "trian", "known keys"),
        ({"train": {"lr": 1}}, [], "train.lr", "known keys: stage"),
        ({}, ["train.zero_stage=4"], "train.zero_stage", "allowed values: 2, 3"),
        ({}, ["train.stage=pretrain"], "train.stage", "'align', 'finetune'"),
        ({}, ["train.epochs=many"], "train.epochs", "integer"),
        ({}, ["model.lora.enabled=yes please"], "model.lora.enabled", "true or false"),
        ({}, ["scaling.workers=0"], "scaling.workers", ">= 1"),
        ({}, ["train.warmup_ratio=1.5"], "train.warmup_ratio", "0 <= ratio < 1"),
        ({}, ["train.base_lr=-1"], "train.base_lr", "> 0"),
        ({}, ["train.offload_params=true"], "train.offload_params", "zero_stage=3"),
        ({}, ["model.lora.enabled=true"], "model.lora.enabled", "finetune"),
        ({}, ["model.aspect=stretch"], "model.aspect", "'resize', 'pad'"),
        ({"data": {"train": "x.parquet"}}, [], "data.train", "list"),
        ({}, ["data.pack_length=512"], "data.pack_length", "allowed: null or >= 2048"),
        ({}, ["data.batching=group"], "data.batching", "'pack', 'pad'"),
        ({}, ["model.projector=linear"], "model.projector", "'mlp2x_gelu'"),
        ({}, ["data.max_block_mb=0"], "data.max_block_mb", ">= 1"),
        ({}, ["train.precision=fp16"], "train.precision", "use bf16"),
        ({}, ["train.benchmark.name=vqav2"], "train.benchmark.name", "'openvivqa'"),
        ({}, ["train.benchmark.name=mtvqa"], "train.benchmark.data", "needs its file"),
        ({}, ["train.benchmark.data=x.json"], "train.benchmark.name", "name it"),
        ({}, ["train.benchmark.every_steps=0"], "train.benchmark.every_steps", ">= 1"),
        ({}, ["train.benchmark.max_questions=0"], "train.benchmark.max_questions", "1 to 1024"),
        ({}, ["train.benchmark.max_questions=5000"], "train.benchmark.max_questions", "1 to 1024"),
    ],
)
def test_errors_name_the_key(data, overrides, key, hint):
    with pytest.raises(ConfigError) as err:
        config_from_dict(data, overrides)
    assert str(err.value).startswith(key + ":"), str(err.value)
    assert hint in str(err.value)


def test_yaml_roundtrip_writes_resolved_config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"train": {"stage": "finetune", "base_lr": "2e-4"}}))
    cfg = load_config(path, ["scaling.workers=3"])
    dump_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg
    assert again.scaling.workers == 3


def test_value_from_json_file(tmp_path):
    (tmp_path / "best.json").write_text(json.dumps({"base_lr": 3e-4, "effective_lr": 1e-5}))
    cfg = config_from_dict({}, [f"train.base_lr=@{tmp_path / 'best.json'}"])
    assert cfg.train.base_lr == pytest.approx(3e-4)
    with pytest.raises(ConfigError, match="train.warmup_ratio: .* has no field 'warmup_ratio'"):
        config_from_dict({}, [f"train.warmup_ratio=@{tmp_path / 'best.json'}"])


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does-not-exist.yaml"):
        load_config(tmp_path / "does-not-exist.yaml")


def test_unquoted_off_is_the_word_off_in_yaml_and_overrides(tmp_path):
    # YAML 1.1 reads `off` as false: for a field of words it still means "off".
    path = tmp_path / "run.yaml"
    path.write_text("run:\n  wandb: off\n")
    assert load_config(path).run.wandb == "off"
    assert config_from_dict({}, ["run.wandb=off"]).run.wandb == "off"
    assert config_from_dict({}, ["run.wandb=offline"]).run.wandb == "offline"
    with pytest.raises(ConfigError, match="run.wandb: True is not allowed"):
        config_from_dict({}, ["run.wandb=on"])  # no "on" among the allowed words
