"""`train.zero3_persistence_threshold`: which ZeRO-3 parameters stay whole on every rank instead of partitioned."""

from __future__ import annotations

import pytest

from vistralv_ray.config import ConfigError, config_from_dict
from vistralv_ray.training.strategy import build_deepspeed_config


def persistence(overrides: list[str], on_gpu: bool):
    cfg = config_from_dict({}, ["train.zero_stage=3", *overrides])
    return build_deepspeed_config(cfg, world_size=2, on_gpu=on_gpu)["zero_optimization"][
        "stage3_param_persistence_threshold"
    ]


def test_default_threshold_is_unchanged_and_the_key_overrides_it():
    assert persistence([], on_gpu=True) == 1e6
    assert persistence([], on_gpu=False) == 1e4
    # 0 partitions every parameter, so every module's forward gathers with a collective (tests do this).
    assert persistence(["train.zero3_persistence_threshold=0"], on_gpu=False) == 0
    assert persistence(["train.zero3_persistence_threshold=50000"], on_gpu=True) == 50000


def test_negative_threshold_is_a_config_error():
    with pytest.raises(ConfigError, match="train.zero3_persistence_threshold"):
        config_from_dict({}, ["train.zero3_persistence_threshold=-1"])
