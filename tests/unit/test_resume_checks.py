"""Checks before and at resume: a finetune's projector, the resumed plan, RNG states, the model seed."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from vistralv_ray.config import ConfigError, check_projector_start, config_from_dict
from vistralv_ray.training.checkpointing import (
    TrainerState,
    plan_changes,
    restore_rng_state,
    save_rng_state,
)


def test_a_finetune_without_a_stage1_projector_is_refused_before_ray_starts(tmp_path):
    import ray

    from vistralv_ray.training.driver import train

    cfg = config_from_dict({"train": {"stage": "finetune"}, "run": {"storage": str(tmp_path)}})
    with pytest.raises(ConfigError, match=r"model.init_projector_from: .*align run's name.*'random'"):
        check_projector_start(cfg)
    ray.shutdown()
    with pytest.raises(ConfigError, match="model.init_projector_from"):
        train(cfg)
    assert not ray.is_initialized(), "the check must come before Ray (and any worker) starts"
    assert not any(tmp_path.iterdir()), "nothing written for a run that cannot start"

    check_projector_start(
        config_from_dict({"train": {"stage": "finetune"}, "model": {"init_projector_from": "random"}})
    )
    check_projector_start(config_from_dict({"train": {"stage": "finetune"}, "model": {"init_projector_from": "a1"}}))
    check_projector_start(config_from_dict({"train": {"stage": "align"}}))
    # Reading a finetune recipe (plan, prepare --config, export of a run) needs no align run.
    assert config_from_dict({"train": {"stage": "finetune"}}).model.init_projector_from is None


def test_recipes_hand_the_align_run_to_finetune():
    from vistralv_ray.config import load_config

    align, finetune = load_config("jobs/align.yaml"), load_config("jobs/finetune.yaml")
    assert finetune.model.init_projector_from == align.run_name
    assert finetune.run.storage == align.run.storage
    check_projector_start(finetune)


def test_plan_changes_name_what_changed():
    saved = {"total_steps": 100, "world_size": 2, "global_batch": 16, "base_lr": 2e-4, "effective_lr": 2.5e-5}
    assert plan_changes(saved, dict(saved)) == []
    assert plan_changes(saved, {**saved, "effective_lr": 2.5e-5 * (1 + 1e-12)}) == []  # float noise
    changed = {**saved, "world_size": 4, "global_batch": 32, "effective_lr": 5e-5, "projector_lr": 1e-5}
    assert plan_changes(saved, changed) == [
        "world_size: 2 -> 4",
        "global_batch: 16 -> 32",
        "effective_lr: 2.5e-05 -> 5e-05",
    ]
    assert plan_changes({}, changed) == []  # a checkpoint from before plans were recorded


def test_trainer_state_keeps_its_plan(tmp_path):
    state = TrainerState(step=3, total_steps=10, plan={"total_steps": 10, "world_size": 2}, seen_keys={1, 2})
    state.save(tmp_path, rank=0)
    loaded = TrainerState.load(tmp_path)
    assert loaded.plan == state.plan and loaded.seen_keys == {1, 2} and loaded.step == 3


def test_rng_states_round_trip_per_rank(tmp_path):
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    save_rng_state(tmp_path, rank=1)
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    assert restore_rng_state(tmp_path, rank=1)
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])
    assert not restore_rng_state(tmp_path, rank=0)  # no state for a rank the checkpoint did not have


def test_the_run_seed_initialises_the_fresh_projector(tiny_model_config):
    from vistralv_ray.model.assembly import build_model

    def projector(seed):
        return build_model(tiny_model_config, seed=seed).model.model.multi_modal_projector.linear_1.weight

    assert torch.equal(projector(3), projector(3))
    assert not torch.equal(projector(3), projector(4))
