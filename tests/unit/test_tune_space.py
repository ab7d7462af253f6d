"""Search spaces and sweep bookkeeping, without a Ray cluster: loading, errors that name the key, each
trial's effective LR, resource-bound concurrency, best.json and its transfer to another worker count."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vistralv_ray.config import ConfigError, config_from_dict, load_config
from vistralv_ray.training.scaling import lr_plan
from vistralv_ray.tuning.results import TrialRecord, best_summary, pick_best, write_results
from vistralv_ray.tuning.space import check_against, load_space, space_from_dict, trial_config
from vistralv_ray.tuning.sweep import (
    SweepSetup,
    check_metric_cadence,
    max_concurrent_trials,
    planned_reports,
    trial_footprint,
)

ROOT = Path(__file__).resolve().parents[2]
LR_SEARCH = {"train.base_lr": {"loguniform": [1.0e-5, 1.0e-2]}}
# 1 worker x 4 per device: the shape the tiny sweeps run at; reference batch 8 makes the rule visible.
RECIPE = {
    "data": {"per_device_batch": 4, "eval": ["eval-shards"]},
    "train": {"base_lr": 1e-3, "lr_rule": "linear", "reference_batch": 8},
    "scaling": {"workers": 2},
}


def test_shipped_spaces_load_and_fit_their_recipes():
    pairs = {"base_lr_align": "align.yaml", "base_lr_finetune": "finetune.yaml", "tiny_demo": "local_tiny.yaml"}
    shipped = sorted((ROOT / "tune_spaces").glob("*.yaml"))
    assert {p.stem for p in shipped} >= set(pairs)
    for path in shipped:
        space = load_space(path)
        assert space.scheduler.name == "asha" and space.scheduler.metric == "eval_loss"
        assert "train.base_lr" in space.search
        assert space.trial.get("train.eval_every") == space.trial.get("train.log_every"), path
        job = ROOT / "jobs" / pairs.get(path.stem, "align.yaml")
        if job.is_file():
            check_against(space, space.recipe(load_config(job)))


def test_domains_become_tune_search_space():
    from ray import tune

    space = space_from_dict(
        {
            "search": {
                "train.base_lr": {"loguniform": ["1e-5", 1.0e-2]},  # YAML reads 1e-5 as a string
                "train.lr_rule": {"choice": ["linear", "sqrt"]},
                "train.warmup_ratio": {"grid": [0.0, 0.03]},
            }
        },
        default_name="from-dict",
    )
    params = space.param_space()
    assert isinstance(params["train.base_lr"], tune.search.sample.Float)
    assert params["train.base_lr"].lower == pytest.approx(1e-5)
    assert isinstance(params["train.lr_rule"], tune.search.sample.Categorical)
    assert params["train.warmup_ratio"] == {"grid_search": [0.0, 0.03]}
    assert space.name == "from-dict" and space.samples == 1 and space.scheduler.reduction_factor == 3.0


@pytest.mark.parametrize(
    "data, key, hint",
    [
        ({"search": {"train.base_lrr": {"loguniform": [1e-4, 1e-2]}}}, "search.train.base_lrr", "known keys in train"),
        ({"search": {"trian.base_lr": {"loguniform": [1e-4, 1e-2]}}}, "search.trian.base_lr", "known keys"),
        ({"search": {"train": {"choice": [1]}}}, "search.train", "is a section"),
        ({"search": {"train.base_lr": {"logunif": [1e-4, 1e-2]}}}, "search.train.base_lr.logunif", "allowed"),
        ({"search": {"train.base_lr": {"loguniform": [0, 1e-2]}}}, "search.train.base_lr.loguniform", "> 0"),
        ({"search": {"train.base_lr": {"loguniform": [1e-2, 1e-4]}}}, "search.train.base_lr.loguniform", "below"),
        ({"search": {"train.base_lr": {"uniform": [1e-4]}}}, "search.train.base_lr.uniform", "[low, high]"),
        ({"search": {"train.base_lr": {"uniform": ["a", 1]}}}, "search.train.base_lr.uniform", "finite number"),
        ({"search": {"train.lr_rule": {"choice": []}}}, "search.train.lr_rule.choice", "non-empty"),
        ({"search": {"train.base_lr": 1e-3}}, "search.train.base_lr", "loguniform"),
        ({"search": {}}, "search", "at least one"),
        ({"search": {"run.name": {"choice": ["a", "b"]}}}, "search.run.name", "set by the sweep"),
        ({"trial": {"scaling.worker": 1}}, "trial.scaling.worker", "known keys in scaling: workers"),
        ({"trial": {"train.base_lr": 1e-3}}, "trial.train.base_lr", "also in search"),
        ({"trial": {"run.storage": "/tmp"}}, "trial.run.storage", "set by the sweep"),
        ({"trial": ["scaling.workers=1"]}, "trial", "must map"),
        ({"samples": 0}, "samples", ">= 1"),
        ({"sample": 3}, "sample", "unknown key"),
        ({"name": "my sweep"}, "name", "letters"),
        ({"scheduler": {"name": "pbt"}}, "scheduler.name", "asha, fifo"),
        ({"scheduler": {"mode": "lowest"}}, "scheduler.mode", "'min', 'max'"),
        ({"scheduler": {"grace_period": 0}}, "scheduler.grace_period", ">= 1"),
        ({"scheduler": {"reduction_factor": 1}}, "scheduler.reduction_factor", "> 1"),
        ({"scheduler": {"max_t": 2, "grace_period": 3}}, "scheduler.max_t", "grace_period"),
        ({"scheduler": {"grace": 1}}, "scheduler.grace", "known keys"),
    ],
)
def test_space_errors_name_the_key(data, key, hint):
    data = {"search": LR_SEARCH, **data}
    with pytest.raises(ConfigError) as err:
        space_from_dict(data, source="bad.yaml")
    message = str(err.value)
    assert message.startswith(key + ":"), message
    assert hint in message and "bad.yaml" in message


def test_space_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_space(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("search: {train.base_lr: {loguniform: [1e-5, 1e-2]}\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_space(bad)
    ok = tmp_path / "my_sweep.yaml"
    ok.write_text("search:\n  train.base_lr: {grid: [1.0e-4, 1.0e-3]}\n")
    assert load_space(ok).name == "my_sweep"


def test_space_values_are_checked_against_the_recipe():
    recipe_cfg = config_from_dict(RECIPE)
    bad_rule = space_from_dict({"search": {"train.lr_rule": {"choice": ["linear", "cubic"]}}}, source="s.yaml")
    with pytest.raises(ConfigError) as err:
        check_against(bad_rule, bad_rule.recipe(recipe_cfg))
    assert str(err.value).startswith("search.train.lr_rule: 'cubic'") and "'linear', 'sqrt', 'none'" in str(err.value)
    bad_trial = space_from_dict({"search": LR_SEARCH, "trial": {"train.eval_every": 0}})
    with pytest.raises(ConfigError) as err:
        check_against(bad_trial, bad_trial.recipe(recipe_cfg))
    assert str(err.value).startswith("trial.train.eval_every:")
    negative = space_from_dict({"search": {"train.warmup_ratio": {"uniform": [-0.5, 0.1]}}})
    with pytest.raises(ConfigError, match=r"^search\.train\.warmup_ratio: -0\.5"):
        check_against(negative, negative.recipe(recipe_cfg))


def test_trial_config_gets_its_own_run_and_the_rule_scaled_lr():
    space = space_from_dict(
        {
            "search": {"train.base_lr": {"grid": [4e-3]}, "train.lr_rule": {"choice": ["linear", "sqrt"]}},
            "trial": {"scaling.workers": 1},
        }
    )
    recipe = space.recipe(config_from_dict(RECIPE))
    cfg = trial_config(recipe, {"train.base_lr": 4e-3, "train.lr_rule": "linear"}, "s-abc_00001", "/sweep/runs", "s")
    assert (cfg.run.name, cfg.run.storage, cfg.run.wandb_group) == ("s-abc_00001", "/sweep/runs", "s")
    plan = lr_plan(cfg)
    assert plan.global_batch == 4 and plan.reference_batch == 8
    assert plan.effective_lr == pytest.approx(4e-3 * 4 / 8)
    sqrt = lr_plan(trial_config(recipe, {"train.base_lr": 4e-3, "train.lr_rule": "sqrt"}, "t", "/r", "s"))
    assert sqrt.effective_lr == pytest.approx(4e-3 * (4 / 8) ** 0.5)
    # The recipe itself is untouched: the space applies to a copy.
    assert recipe["train"]["lr_rule"] == "linear" and config_from_dict(RECIPE).scaling.workers == 2


def record(trial_id: str, status: str, metric: float | None, cfg) -> TrialRecord:
    plan = lr_plan(cfg)
    return TrialRecord(
        trial_id=trial_id,
        run_name=f"s-{trial_id}",
        params={"train.base_lr": cfg.train.base_lr},
        base_lr=cfg.train.base_lr,
        effective_lr=plan.effective_lr,
        global_batch=plan.global_batch,
        workers=plan.workers,
        per_device_batch=plan.per_device_batch,
        grad_accum=plan.grad_accum,
        lr_rule=plan.rule,
        reference_batch=plan.reference_batch,
        planned_steps=4,
        status=status,
        iterations=4 if status == "completed" else 1,
        last_step=4 if status == "completed" else 1,
        final_metric=metric,
        best_metric=metric,
        final_loss=metric,
        history=[{"step": 1, "loss": 6.4, "eval_loss": metric, "diverged": status == "diverged"}],
    )


def test_best_json_transfers_the_base_lr_through_the_rule(tmp_path):
    space = space_from_dict({"search": {"train.base_lr": {"grid": [4e-3]}}, "trial": {"scaling.workers": 1}})
    recipe = space.recipe(config_from_dict(RECIPE))
    found = trial_config(recipe, {"train.base_lr": 4e-3}, "s-a", "/r", "s")  # 1 worker x 4
    best = record("a", "completed", 6.1, found)
    path = tmp_path / "best.json"
    path.write_text(json.dumps(best_summary(best, "s", "eval_loss")))
    data = json.loads(path.read_text())
    assert data["base_lr"] == 4e-3 and data["global_batch"] == 4 and data["lr_rule"] == "linear"
    assert data["reference_batch"] == 8 and data["metric"] == "eval_loss" and data["value"] == 6.1
    assert data["trial_id"] == "a" and data["effective_lr"] == pytest.approx(2e-3)

    # The real run: 2 workers x 4, the same rule: the effective LR doubles with the global batch.
    run = config_from_dict(RECIPE, [f"train.base_lr=@{path}"])
    plan = lr_plan(run)
    assert run.train.base_lr == pytest.approx(4e-3) and plan.global_batch == 8
    assert plan.effective_lr == pytest.approx(2 * data["effective_lr"])
    assert "2 workers x 4 per device x 1 accum = 8" in plan.arithmetic()
    sqrt = lr_plan(config_from_dict(RECIPE, [f"train.base_lr=@{path}", "train.lr_rule=sqrt", "scaling.workers=4"]))
    assert sqrt.effective_lr == pytest.approx(4e-3 * (16 / 8) ** 0.5)


def test_transfer_command_repeats_what_differs_from_the_recipe():
    import argparse

    from vistralv_ray.cli.tune import transfer_command

    args = argparse.Namespace(config="jobs/x.yaml", overrides=["data.train=[a]", "train.base_lr=1"])
    cfg = config_from_dict(RECIPE)
    same = transfer_command(args, cfg, {"lr_rule": "linear", "reference_batch": 8}, Path("d/best.json"))
    assert same == "vistralv-ray train jobs/x.yaml --set train.base_lr=@d/best.json --set data.train=[a]"
    other = transfer_command(args, cfg, {"lr_rule": "sqrt", "reference_batch": 16}, Path("d/best.json"))
    assert "--set train.lr_rule=@d/best.json --set train.reference_batch=@d/best.json" in other


def test_every_report_must_carry_the_metric():
    ok = config_from_dict(RECIPE, ["train.log_every=4", "train.eval_every=2", "train.checkpoint_every=8"])
    check_metric_cadence(ok, "eval_loss", total_steps=16)
    check_metric_cadence(config_from_dict({}), "loss", total_steps=16)  # reported every time anyway
    with pytest.raises(ConfigError, match=r"^train\.eval_every: None"):
        check_metric_cadence(config_from_dict(RECIPE), "eval_loss", total_steps=16)
    with pytest.raises(ConfigError, match=r"^train\.eval_every: 3"):
        check_metric_cadence(config_from_dict(RECIPE, ["train.eval_every=3"]), "eval_loss", total_steps=16)
    # A checkpoint step off the eval cadence reports without eval, unless it is the last step anyway.
    late = config_from_dict(RECIPE, ["train.log_every=2", "train.eval_every=2", "train.checkpoint_every=5"])
    with pytest.raises(ConfigError, match="checkpoint_every"):
        check_metric_cadence(late, "eval_loss", total_steps=16)
    check_metric_cadence(late, "eval_loss", total_steps=5)
    with pytest.raises(ConfigError, match=r"^data\.eval:"):
        check_metric_cadence(config_from_dict({"train": {"eval_every": 10}}), "eval_loss", total_steps=16)


def test_planned_reports_and_concurrency_follow_the_recipe():
    cfg = config_from_dict(RECIPE, ["train.log_every=2", "train.checkpoint_every=3"])
    assert planned_reports(cfg, 7) == len({2, 4, 6, 3, 7})
    tiny = config_from_dict(
        RECIPE, ["scaling.workers=1", "scaling.cpus_per_worker=0.5", "data.preprocess_cpus_per_actor=0.5"]
    )
    footprint = trial_footprint(tiny, use_gpu=False)
    # trial function + 1 worker + (train and eval pipelines: one actor each, which reads the shards)
    assert footprint == {"CPU": pytest.approx(0.05 + 0.5 + 2 * 0.5)}
    assert max_concurrent_trials(footprint, {"CPU": 5.0}) == 2
    assert max_concurrent_trials(footprint, {"CPU": 2.0}) == 1  # one trial at least, even if it must wait
    gpu = trial_footprint(config_from_dict(RECIPE, ["scaling.workers=2", "scaling.cpus_per_worker=4"]), use_gpu=True)
    assert gpu["GPU"] == 2
    assert max_concurrent_trials(gpu, {"CPU": 64.0, "GPU": 8.0}) == 4
    assert max_concurrent_trials(gpu, {"CPU": 20.0, "GPU": 8.0}) == 1


def saved_figures(monkeypatch) -> dict:
    """file name -> the matplotlib Figure saved there, from every `savefig` from now on."""
    from matplotlib.figure import Figure

    saved, savefig = {}, Figure.savefig

    def spy(self, path, *args, **kwargs):
        saved[Path(path).name] = self
        return savefig(self, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    return saved


def points_by_label(ax) -> dict[str, set[tuple[float, float]]]:
    """The scatter points of each labelled series of an axes."""
    return {c.get_label(): {tuple(map(float, xy)) for xy in c.get_offsets()} for c in ax.collections if c.get_label()}


def test_best_skips_diverged_and_results_are_written(tmp_path, monkeypatch):
    from PIL import Image

    figures = saved_figures(monkeypatch)
    space = space_from_dict({"name": "s", "search": {"train.base_lr": {"grid": [1e-3, 4e-3, 1e-5, 1e20]}}})
    setup = SweepSetup(space, tmp_path, space.recipe(config_from_dict(RECIPE)), 1, 48, 4, 2)
    cfgs = {lr: trial_config(setup.recipe, {"train.base_lr": lr}, "x", "/r", "s") for lr in (1e-3, 4e-3, 1e-5, 1e20)}
    records = [
        record("a", "completed", 6.2, cfgs[1e-3]),
        record("b", "completed", 6.1, cfgs[4e-3]),
        record("c", "stopped_early", 6.0, cfgs[1e-5]),  # a lower value, but at an earlier step
        record("d", "diverged", None, cfgs[1e20]),
    ]
    assert pick_best(records, "min").trial_id == "b"
    assert pick_best(records, "max").trial_id == "a"
    assert pick_best(records[2:], "min").trial_id == "c"
    assert pick_best(records[3:], "min") is None

    paths = write_results(records, setup)
    assert json.loads(paths["best"].read_text())["trial_id"] == "b"
    rows = paths["table"].read_text().splitlines()
    assert rows[0].startswith("trial_id,run_name,status,base_lr,effective_lr,global_batch,lr_rule")
    assert [r.split(",")[2] for r in rows[1:]] == ["completed", "completed", "stopped_early", "diverged"]
    assert Image.open(paths["metric_plot"]).size == (770, 495)  # 7 x 4.5 in at 110 dpi
    assert Image.open(paths["curves_plot"]).size == (1210, 550)

    # Final metric against base LR: one point per trial at its LR, by status; the diverged one (no
    # metric) on a dotted line above every finite point; the best one starred.
    (ax,) = figures[paths["metric_plot"].name].axes
    assert (ax.get_xscale(), ax.get_xlabel(), ax.get_ylabel()) == ("log", "base learning rate", "final eval_loss")
    points = points_by_label(ax)
    assert points["completed"] == {(1e-3, 6.2), (4e-3, 6.1)} and points["stopped early"] == {(1e-5, 6.0)}
    ((x, ceiling),) = points["diverged (NaN/inf)"]
    assert x == 1e20 and ceiling > 6.2
    assert points["best: base LR 0.004"] == {(4e-3, 6.1)}
    assert [line.get_ydata()[0] for line in ax.lines] == [ceiling]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "completed",
        "stopped early",
        "diverged (NaN/inf)",
        "best: base LR 0.004",
    ]

    # Curves: every trial's loss over steps on the left, the metric of those that have one on the right.
    left, right = figures[paths["curves_plot"].name].axes
    assert (left.get_xlabel(), left.get_ylabel(), right.get_ylabel()) == ("step", "training loss", "eval_loss")
    curves = {line.get_label(): list(zip(line.get_xdata(), line.get_ydata())) for line in left.lines}
    assert curves == {
        "1e-05 (stopped early)": [(1, 6.4)],
        "0.001 (completed)": [(1, 6.4)],
        "0.004 (completed)": [(1, 6.4)],
        "1e+20 (diverged (NaN/inf))": [(1, 6.4)],
    }
    assert {line.get_label(): list(zip(line.get_xdata(), line.get_ydata())) for line in right.lines} == {
        "1e-05 (stopped early)": [(1, 6.0)],
        "0.001 (completed)": [(1, 6.2)],
        "0.004 (completed)": [(1, 6.1)],
    }
    assert [tuple(map(float, xy)) for c in left.collections for xy in c.get_offsets()] == [(1.0, 6.4)]  # its cross
    # A sweep where nothing qualifies leaves no stale best.json behind.
    assert "best" not in write_results(records[3:], setup) and not (tmp_path / "best.json").exists()
