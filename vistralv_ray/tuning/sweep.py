"""Run a learning-rate sweep: every Tune trial is a full TorchTrainer run with its own workers.

Ray 2.60 (Train V2) no longer takes a trainer as a Tune trainable: each trial runs a small function
that builds the trial's config, its TorchTrainer (the same `build_trainer` as `vistralv-ray train`)
and fits it, with a TuneReportCallback in the Train RunConfig forwarding rank 0's reports to Tune.
ASHA then stops poor trials on the reported metric; a diverged trial ends itself and is recorded,
not crashed. Everything lands under the sweep directory: Tune's state in `tune/`, each trial's run
in `runs/<sweep>-<trial id>/`, and the results (`best.json`, `trials.csv`, plots) at the top. The
sweep directory may be an `s3://` URI: on a multi-node cluster every node writes there, no NFS needed.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

from vistralv_ray.config import RANDOM_PROJECTOR, Config, ConfigError, check_projector_start
from vistralv_ray.data import storage
from vistralv_ray.logging import get_logger
from vistralv_ray.tuning.space import SchedulerSpec, SearchSpace, check_against, trial_config

log = get_logger(__name__)

# The trial function only waits on its trainer; the trainer asks for its workers' resources itself.
TRIAL_DRIVER_CPUS = 0.05
# Kept free of trials so that Ray Data's own tasks (listing, eval reads) always find a CPU.
DATA_HEADROOM_CPUS = 1.0
# What a diverged report carries as the metric, so that the scheduler ranks it last (ASHA needs a number).
DIVERGED_METRIC_VALUE = 1e30


@dataclass
class SweepSetup:
    """Everything a sweep needs, checked before any trial starts."""

    space: SearchSpace
    workdir: str | Path  # an absolute local path or an s3:// URI
    recipe: dict  # the run config tree every trial starts from (the space's trial settings applied)
    samples: int
    train_records: int
    max_t: int
    max_concurrent: int
    footprint: dict[str, float] = field(default_factory=dict)

    @property
    def runs_dir(self) -> str:
        return storage.join(str(self.workdir), "runs")

    def config_of(self, params: dict, trial_id: str) -> Config:
        name = self.space.name
        return trial_config(self.recipe, params, f"{name}-{trial_id}", self.runs_dir, name)


def build_report_callback(metric: str, mode: str):
    """A TuneReportCallback for the Train RunConfig (built inside the trial: it needs the Tune session)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class SweepReportCallback(TuneReportCallback):
        """Rank 0's report to Tune; a diverged one (or a non-finite metric) gets the worst metric value."""

        def after_report(self, run_context, metrics, checkpoint):
            first = dict(metrics[0])
            value = first.get(metric)
            if first.get("diverged") or (value is not None and not math.isfinite(value)):
                first["diverged"] = True
                first[metric] = DIVERGED_METRIC_VALUE if mode == "min" else -DIVERGED_METRIC_VALUE
            super().after_report(run_context, [first, *metrics[1:]], checkpoint)

    return SweepReportCallback()


def run_trial(params: dict, sweep: SweepSetup) -> None:
    """The Tune function trainable: one whole TorchTrainer run with this trial's sampled values."""
    import ray.tune

    from vistralv_ray.training.driver import build_trainer

    cfg = sweep.config_of(params, ray.tune.get_context().get_trial_id())
    scheduler = sweep.space.scheduler
    trainer, _ = build_trainer(cfg, callbacks=[build_report_callback(scheduler.metric, scheduler.mode)])
    trainer.fit()


def absolute_paths(tree: dict) -> dict:
    """Tune runs each trial in its own working directory: make the recipe's local paths absolute."""
    out = copy.deepcopy(tree)
    for key in ("train", "eval"):
        out["data"][key] = [u if "://" in u else str(Path(u).expanduser().resolve()) for u in out["data"][key]]
    model = out["model"]
    for key in ("language_model", "vision_tower", "init_projector_from"):
        value = model[key]
        if value and "://" not in value and Path(value).expanduser().exists():
            model[key] = str(Path(value).expanduser().resolve())
    source, runs = model["init_projector_from"], out["run"]["storage"]
    if source and source != RANDOM_PROJECTOR and "://" not in source and not Path(source).expanduser().is_absolute():
        # A run name: it lives under the recipe's run storage, not under the sweep's.
        model["init_projector_from"] = (
            runs.rstrip("/") + "/" + source if "://" in runs else str(Path(runs).expanduser().resolve() / source)
        )
    return out


def planned_reports(cfg: Config, total_steps: int) -> int:
    """How many times a run reports: every log_every and checkpoint_every step, and the last."""
    t = cfg.train
    steps = range(1, total_steps + 1)
    return sum(1 for s in steps if s % t.log_every == 0 or s % t.checkpoint_every == 0 or s == total_steps)


def check_metric_cadence(cfg: Config, metric: str, total_steps: int) -> None:
    """Every report must carry the scheduler's metric: eval metrics need eval data at each report step."""
    if not metric.startswith("eval_"):
        return
    t = cfg.train
    if not cfg.data.eval:
        raise ConfigError(f"data.eval: scheduler.metric {metric} needs eval shards; set data.eval in the recipe")
    every = t.eval_every
    if every is None or t.log_every % every or (t.checkpoint_every % every and t.checkpoint_every < total_steps):
        raise ConfigError(
            f"train.eval_every: {every}; every report must carry {metric}, so it must divide train.log_every "
            f"({t.log_every}) and train.checkpoint_every ({t.checkpoint_every}); set both in the space's trial section"
        )


def trial_footprint(cfg: Config, use_gpu: bool) -> dict[str, float]:
    """The resources one trial holds at its peak: its workers and its preprocessing pipelines."""
    s, d = cfg.scaling, cfg.data
    worker = {"CPU": s.cpus_per_worker, **({"GPU": 1.0} if use_gpu else {}), **s.resources_per_worker}
    out = {key: value * s.workers for key, value in worker.items()}
    pipelines = 2 if d.eval else 1  # train and eval each have their own preprocessing actors
    out["CPU"] = out.get("CPU", 0.0) + TRIAL_DRIVER_CPUS
    out["CPU"] += pipelines * d.preprocess_actors * d.preprocess_cpus_per_actor
    return out


def max_concurrent_trials(footprint: dict[str, float], cluster: dict[str, float]) -> int:
    """How many trials the cluster holds at once (at least one: an autoscaler may add the rest)."""
    fits = []
    for key, need in footprint.items():
        if need > 0:
            have = cluster.get(key, 0.0) - (DATA_HEADROOM_CPUS if key == "CPU" else 0.0)
            fits.append(int(have // need))
    if fits and min(fits) < 1:
        log.warning("one trial needs %s but the cluster has %s: trials wait for resources", footprint, cluster)
    return max(1, min(fits, default=1))


def get_scheduler(spec: SchedulerSpec, max_t: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if spec.name == "asha":
        # Trials that pass the last rung run to their own end: the recipe's planned steps decide it.
        return ASHAScheduler(
            time_attr="training_iteration",
            max_t=max_t,
            grace_period=spec.grace_period,
            reduction_factor=spec.reduction_factor,
            stop_last_trials=False,
        )
    if spec.name == "fifo":
        return FIFOScheduler()
    raise ConfigError(f"scheduler.name: {spec.name!r}; allowed: asha, fifo")


def prepare_sweep(
    cfg: Config,
    space: SearchSpace,
    workdir: str | Path,
    samples: int | None = None,
    max_concurrent: int | None = None,
) -> SweepSetup:
    """Check the space against the recipe and size the sweep; starts Ray (or joins RAY_ADDRESS).

    `samples` overrides the space's; `max_concurrent` caps the trials that run at once below what fits.
    """
    import ray

    from vistralv_ray.data.pipeline import count_records, shard_files
    from vistralv_ray.training.driver import ensure_ray, planned_steps, resolve_use_gpu

    if samples is not None and samples < 1:
        raise ConfigError(f"--samples: {samples}; allowed: >= 1")
    if max_concurrent is not None and max_concurrent < 1:
        raise ConfigError(f"--max-concurrent: {max_concurrent}; allowed: >= 1")
    root = str(workdir) if storage.is_s3(str(workdir)) else str(Path(workdir).expanduser().resolve())
    recipe = absolute_paths(space.recipe(cfg))
    check_against(space, recipe)
    setup = SweepSetup(space, root, recipe, samples or space.samples, train_records=0, max_t=1, max_concurrent=1)
    probe = setup.config_of({}, "probe")
    check_projector_start(probe)
    setup.train_records = count_records(shard_files(probe.data.train))
    _, total = planned_steps(probe, setup.train_records)
    check_metric_cadence(probe, space.scheduler.metric, total)
    setup.max_t = space.scheduler.max_t or planned_reports(probe, total)
    if space.scheduler.grace_period > setup.max_t:
        raise ConfigError(
            f"scheduler.grace_period: {space.scheduler.grace_period} is more than the {setup.max_t} reports "
            f"a trial makes ({total} steps, train.log_every {probe.train.log_every})"
        )
    ensure_ray(probe)
    setup.footprint = trial_footprint(probe, resolve_use_gpu(probe))
    fits = max_concurrent_trials(setup.footprint, ray.cluster_resources())
    setup.max_concurrent = min(fits, max_concurrent) if max_concurrent else fits
    log.info(
        "sweep %s: %d sample(s) of %s; a trial: %d steps, %d reports, needs %s; at most %d trial(s) at once",
        space.name,
        setup.samples,
        ", ".join(space.search),
        total,
        setup.max_t,
        setup.footprint,
        setup.max_concurrent,
    )
    return setup


def run_sweep(setup: SweepSetup):
    """Run the trials; returns Tune's ResultGrid (trial errors are in it, not raised)."""
    from ray import tune

    from vistralv_ray.tuning.cleanup import PlacementGroupJanitor, build_janitor_callback

    sched = setup.space.scheduler
    janitor = PlacementGroupJanitor().start()
    # Tune's own state (experiment and trial directories) next to the trial runs: local or on S3.
    fs, path = storage.filesystem_for(str(setup.workdir))
    if not storage.is_s3(str(setup.workdir)):
        Path(path).mkdir(parents=True, exist_ok=True)
        fs = None
    trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=setup), {"CPU": TRIAL_DRIVER_CPUS})
    tuner = tune.Tuner(
        trainable,
        param_space=setup.space.param_space(),
        tune_config=tune.TuneConfig(
            metric=sched.metric,
            mode=sched.mode,
            scheduler=get_scheduler(sched, setup.max_t),
            num_samples=setup.samples,
            max_concurrent_trials=setup.max_concurrent,
            trial_dirname_creator=lambda trial: trial.trial_id,
        ),
        run_config=tune.RunConfig(
            name="tune",
            storage_path=path,
            storage_filesystem=fs,
            failure_config=tune.FailureConfig(max_failures=0),
            callbacks=[build_janitor_callback(janitor)],
        ),
    )
    try:
        return tuner.fit()
    finally:
        janitor.settle()
