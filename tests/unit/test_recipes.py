"""The real recipes load, validate and carry the REFERENCE hyper-parameters."""

from __future__ import annotations

from pathlib import Path

import pytest

from vistralv_ray.config import load_config

JOBS = Path(__file__).resolve().parents[2] / "jobs"


def test_align_recipe():
    cfg = load_config(JOBS / "align.yaml")
    assert cfg.model.language_model == "Viet-Mistral/Vistral-7B-Chat"
    assert cfg.model.vision_tower == "google/siglip-base-patch16-256-multilingual"
    assert (cfg.train.stage, cfg.model.template, cfg.model.aspect) == ("align", "plain", "resize")
    assert cfg.train.base_lr == pytest.approx(1e-3)
    assert cfg.global_batch == cfg.reference_batch == 256
    assert cfg.train.zero_stage == 2


def test_finetune_recipe():
    cfg = load_config(JOBS / "finetune.yaml")
    assert (cfg.train.stage, cfg.model.template, cfg.model.aspect) == ("finetune", "vistral", "pad")
    assert cfg.model.lora.enabled and (cfg.model.lora.r, cfg.model.lora.alpha) == (128, 256)
    assert cfg.train.base_lr == pytest.approx(2e-4)
    assert cfg.global_batch == cfg.reference_batch == 128
    assert cfg.train.zero_stage == 3
