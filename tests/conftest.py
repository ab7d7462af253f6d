"""Shared fixtures: tiny model assets and the demo corpus, generated once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from vistralv_ray.data.pipeline import apply_ray_data_env  # noqa: E402

apply_ray_data_env()  # every local Ray cluster a test starts gets what `vistralv-ray` gives its own


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    from vistralv_ray.model.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory):
    from vistralv_ray.data.demo import make_demo_corpus

    return make_demo_corpus(tmp_path_factory.mktemp("demo"), train_images=48, eval_images=12, seed=1)


@pytest.fixture()
def tiny_model_config(tiny_assets):
    from vistralv_ray.config.schema import ModelConfig

    return ModelConfig(
        language_model=str(tiny_assets["llm"]),
        vision_tower=str(tiny_assets["vision"]),
        max_length=256,
    )
