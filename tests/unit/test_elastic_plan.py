"""Elastic runs without Ray: the per-worker-count plan under both policies, `plan`'s table and JSON,
the schedule over samples, and which resumes at another world size are allowed."""

from __future__ import annotations

import json

import pytest

from vistralv_ray.cli.main import main
from vistralv_ray.config import ConfigError, config_from_dict, load_config
from vistralv_ray.training.checkpointing import TrainerState, resume_changes, resume_plan
from vistralv_ray.training.optim import lr_lambda, sample_lr_factor, warmup_steps_for
from vistralv_ray.training.scaling import elastic_table, lr_plan


def finetune(*overrides: str):
    return load_config("jobs/finetune.yaml", ["scaling.min_workers=2", *overrides])


def test_config_checks_min_workers_interval_and_failures():
    assert config_from_dict({}).scaling.min_workers is None  # fixed size unless asked
    assert config_from_dict({}).scaling.elastic_policy == "keep_global_batch"
    with pytest.raises(ConfigError, match="scaling.min_workers"):
        config_from_dict({}, ["scaling.workers=4", "scaling.min_workers=5", "scaling.max_failures=1"])
    with pytest.raises(ConfigError, match="scaling.min_workers"):
        config_from_dict({}, ["scaling.workers=4", "scaling.min_workers=0", "scaling.max_failures=1"])
    with pytest.raises(ConfigError, match="scaling.max_failures"):
        config_from_dict({}, ["scaling.workers=4", "scaling.min_workers=2"])
    with pytest.raises(ConfigError, match="scaling.resize_interval_s"):
        config_from_dict({}, ["scaling.resize_interval_s=-1"])
    with pytest.raises(ConfigError, match="scaling.elastic_policy"):
        config_from_dict({}, ["scaling.elastic_policy=whatever"])


def test_done_when_half_the_workers_rescale_halves_the_lr_keep_doubles_accumulation():
    rescale = {r["workers"]: r for r in elastic_table(finetune("scaling.elastic_policy=rescale_lr"))}
    assert sorted(rescale) == list(range(2, 9))
    assert rescale[8]["global_batch"] == 128 and rescale[8]["effective_lr"] == pytest.approx(2e-4)
    assert rescale[4]["global_batch"] == 64 and rescale[4]["grad_accum"] == 1
    assert rescale[4]["effective_lr"] == pytest.approx(rescale[8]["effective_lr"] / 2)
    assert rescale[4]["projector_lr"] == pytest.approx(rescale[8]["projector_lr"] / 2)
    keep = {r["workers"]: r for r in elastic_table(finetune())}
    assert keep[4]["grad_accum"] == 2 * keep[8]["grad_accum"] and keep[4]["global_batch"] == 128
    assert keep[4]["effective_lr"] == keep[8]["effective_lr"] and keep[2]["grad_accum"] == 4
    assert keep[8]["note"] == "" and "LR unchanged" in keep[4]["note"]


def test_keep_global_batch_takes_the_nearest_batch_and_rederives_the_lr():
    cfg = finetune()
    three = lr_plan(cfg, 3)  # 128 / (3 x 16) = 2.67: accumulation 3, global batch 144
    assert (three.grad_accum, three.global_batch) == (3, 144)
    assert three.effective_lr == pytest.approx(2e-4 * 144 / 128)  # the linear rule, as `plan` derives it
    assert "not divisible" in elastic_table(cfg)[1]["note"]
    sqrt = lr_plan(finetune("train.lr_rule=sqrt", "scaling.elastic_policy=rescale_lr"), 2)
    assert sqrt.effective_lr == pytest.approx(2e-4 * (32 / 128) ** 0.5)


def test_rescale_lr_is_what_plan_gives_a_fixed_run_of_that_size():
    for n in (2, 5):
        elastic = lr_plan(finetune("scaling.elastic_policy=rescale_lr"), n)
        fixed = lr_plan(load_config("jobs/finetune.yaml", [f"scaling.workers={n}"]))
        assert elastic.to_dict() == fixed.to_dict()


def test_plan_prints_the_elastic_table_and_json(capsys):
    assert main(["plan", "jobs/finetune.yaml", "--set", "scaling.min_workers=2", "--records", "330855"]) == 0
    out = capsys.readouterr().out
    assert "elastic (keep_global_batch" in out
    row4 = next(line.split() for line in out.splitlines() if line.split()[:1] == ["4"])
    assert row4[:4] == ["4", "128", "2", "0.0002"] and row4[5] == str(330855 // 128)
    main(["plan", "jobs/finetune.yaml", "--set", "scaling.min_workers=2", "--set", "scaling.elastic_policy=rescale_lr"])
    main(["plan", "jobs/finetune.yaml", "--json", "--set", "scaling.min_workers=6"])
    text = capsys.readouterr().out
    plan = json.loads(text[text.index("{") :])
    assert plan["global_batch"] == 128 and plan["memory_gb"]["zero3"] > 0
    assert [r["workers"] for r in plan["elastic"]] == [6, 7, 8]
    assert {"workers", "global_batch", "grad_accum", "effective_lr", "projector_lr", "memory_gb"} <= set(
        plan["elastic"][0]
    )
    assert "steps_per_epoch" not in plan["elastic"][0]  # records unknown
    main(["plan", "jobs/finetune.yaml", "--json"])
    assert "elastic" not in json.loads(capsys.readouterr().out)  # a fixed-size run has no table


def test_schedule_over_samples_equals_the_step_schedule_at_a_fixed_batch():
    total, batch = 40, 12
    warmup = warmup_steps_for(total, 0.1)
    steps = lr_lambda(total, warmup, "cosine")
    for k in range(total):
        by_samples = sample_lr_factor(k * batch, batch, total * batch, warmup * batch, "cosine")
        assert by_samples == pytest.approx(steps(k), abs=1e-12)


def test_schedule_over_samples_keeps_its_place_across_a_resize():
    total, warmup = 480, 48
    # 8 steps of 12, then the group shrinks and takes steps of 8: at sample 96 the LR is the same
    # whichever step size got there, and the decay ends at the planned sample count.
    before = sample_lr_factor(96, 12, total, warmup, "cosine")
    assert sample_lr_factor(96, 8, total, warmup, "cosine") == before
    assert sample_lr_factor(total, 8, total, warmup, "cosine") == pytest.approx(0.0)
    assert sample_lr_factor(24, 12, total, warmup, "linear") == pytest.approx(36 / 48)  # warming up


def test_a_resize_the_policy_explains_resumes_and_other_changes_are_refused():
    cfg = finetune("scaling.elastic_policy=rescale_lr")
    at8, at4 = resume_plan(cfg, 100), resume_plan(cfg, 100, 4)
    assert at4["world_size"] == 4 and at4["global_batch"] == 64 and at4["total_samples"] == 100 * 128
    assert resume_changes(cfg, at4, at8) == []  # written at 4, resumed at 8
    assert resume_changes(cfg, at8, at4) == []  # and the other way
    doubled = finetune("scaling.elastic_policy=rescale_lr", "train.base_lr=4e-4")
    assert resume_changes(doubled, at4, resume_plan(doubled, 100)) == [
        "base_lr: 0.0002 -> 0.0004",
        "effective_lr: 0.0001 -> 0.0002",
        "projector_lr: 1e-05 -> 2e-05",
    ]
    # The checkpoint says rescale_lr's 4-worker LR, the run now keeps the global batch: refused.
    keep = finetune()
    assert resume_changes(keep, at4, resume_plan(keep, 100))
    # A fixed-size run keeps refusing another world size.
    fixed = load_config("jobs/finetune.yaml")
    assert resume_changes(fixed, at4, resume_plan(fixed, 100))[:2] == ["world_size: 4 -> 8", "global_batch: 64 -> 128"]


def test_trainer_state_from_different_world_sizes_unions_the_seen_records(tmp_path):
    plan = {"world_size": 3, "global_batch": 12}
    for rank, keys in enumerate(({1, 2}, {3}, {4, 5, 6})):
        TrainerState(step=2, epoch_samples=24, samples_seen=24, seen_keys=keys, plan=plan).save(tmp_path, rank)
    state = TrainerState.load(tmp_path)
    assert state.seen_keys == {1, 2, 3, 4, 5, 6} and state.samples_seen == 24 and state.plan == plan
    # A shrunk group's next checkpoint (2 ranks, each holding the union) loads the same.
    out = tmp_path / "after"
    for rank in range(2):
        TrainerState(step=5, samples_seen=48, seen_keys=state.seen_keys | {10 + rank}).save(out, rank)
    assert TrainerState.load(out).seen_keys == {1, 2, 3, 4, 5, 6, 10, 11}
    # A checkpoint from before samples were counted: every step had the planned global batch.
    (tmp_path / "trainer_state.json").write_text(json.dumps({"step": 2, "plan": plan}))
    assert TrainerState.load(tmp_path).samples_seen == 24
