"""Shared fixtures: tiny model assets and the demo corpus, generated once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from vistralv_ray.data.pipeline import apply_ray_data_env  # noqa: E402

apply_ray_data_env()  # every local Ray cluster a test starts gets what `vistralv-ray` gives its own


@pytest.fixture(scope="session", autouse=True)
def ray_bootstrap_file_restored():
    """Multi-node test clusters (`ray.cluster_utils.Cluster`) write Ray's bootstrap address file as
    `ray start` does; the session leaves it as it found it. (Every test starts its own Ray with
    address="local", so the file never captures one, as `vistralv-ray` itself never lets it.)"""
    from ray._common.utils import get_ray_address_file

    path = get_ray_address_file(None)
    before = open(path).read() if os.path.exists(path) else None
    yield
    if before is None:
        if os.path.exists(path):
            os.remove(path)
    else:
        with open(path, "w") as f:
            f.write(before)


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


@pytest.fixture(scope="session")
def spread_weights():
    """spread_weights(model): the tiny model's 0.02 init answers every prompt with the same tokens;
    weights spread wide (the vision tower left as it is) make answers depend on the input."""
    import torch

    def spread(model) -> None:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "vision_tower" not in name and p.dim() >= 2:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    return spread
