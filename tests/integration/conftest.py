"""A real local Ray cluster, prepared tiny shards and a helper that runs a training job on them."""

from __future__ import annotations

import os

import pytest

from vistralv_ray.config import config_from_dict


@pytest.fixture(scope="session")
def ray_local():
    import ray

    ray.shutdown()
    os.environ.setdefault("RAY_agent_register_timeout_ms", "120000")  # slow starts on a busy 2-core machine
    # Logical CPUs above the 2 physical ones: 2 train workers + preprocessing + file listing at once.
    ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_shards(demo_corpus, tmp_path_factory):
    from vistralv_ray.data.prepare import PrepareOptions, prepare

    out = tmp_path_factory.mktemp("shards")
    paths = {}
    for name in ("align", "train", "eval"):
        opts = PrepareOptions(image_root=str(demo_corpus["images"]), out=str(out / name), shard_size=16, fmt="llava")
        manifest = prepare(demo_corpus[name], opts, parallel=False, progress=False)
        assert manifest["records_out"] == manifest["records_in"]
        paths[name] = str(out / name)
    return paths


@pytest.fixture()
def run_config(tiny_assets, tiny_shards, tmp_path):
    """A tiny run config; keyword overrides use dotted keys (`train.zero_stage=3`)."""

    def make(*overrides: str, stage: str = "align"):
        data = "align" if stage == "align" else "train"
        base = {
            "model": {
                "language_model": str(tiny_assets["llm"]),
                "vision_tower": str(tiny_assets["vision"]),
                "template": "plain" if stage == "align" else "vistral",
                "aspect": "resize" if stage == "align" else "pad",
                "max_length": 256,
                # A finetune of the tiny model starts from a fresh projector unless a test gives one.
                "init_projector_from": "random" if stage == "finetune" else None,
            },
            "data": {
                "train": [tiny_shards[data]],
                "per_device_batch": 4,
                "preprocess_cpus_per_actor": 0.5,
                "shuffle": False,
            },
            "train": {
                "stage": stage,
                "base_lr": 2e-3,
                "lr_rule": "none",
                "max_steps": 4,
                "checkpoint_every": 2,
                "log_every": 1,
                "warmup_ratio": 0.0,
            },
            "scaling": {"workers": 2, "cpus_per_worker": 0.5},
            "run": {"storage": str(tmp_path / "runs"), "name": f"{stage}-test"},
        }
        return config_from_dict(base, list(overrides))

    return make
