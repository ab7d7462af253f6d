"""The Ray layer: datasets, ScalingConfig, RunConfig and the TorchTrainer; nothing else happens here.

Runs on an embedded Ray (local mode, CPU or one GPU) or on a cluster (`ray job submit`, RAY_ADDRESS
set, or `--address`); see `ray_runtime`. A run lives at `run.storage/<run name>`: re-running with the
same name resumes from its latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import sys
from pathlib import Path

import yaml

from vistralv_ray.config.loader import check_projector_start, config_to_dict
from vistralv_ray.config.schema import RANDOM_PROJECTOR, Config
from vistralv_ray.data import storage
from vistralv_ray.data.pipeline import RAY_DATA_ENV
from vistralv_ray.data.placement import PLACEMENT_DIR
from vistralv_ray.logging import get_logger
from vistralv_ray.ray_runtime import cluster_address, init_ray
from vistralv_ray.training.checkpointing import resume_plan as checkpoint_resume_plan
from vistralv_ray.training.optim import warmup_steps_for
from vistralv_ray.training.preflight import run_preflight
from vistralv_ray.training.scaling import elastic_table, lr_plan

log = get_logger(__name__)

WORKER_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_SILENT": "true",
    "RAY_TRAIN_V2_ENABLED": "1",
    # Train V2's controller takes one report per worker each time it polls them (every 2 s by
    # default), and a worker's next `ray.train.report` waits until the last one was taken: with
    # reports less than 2 s apart, every report stalled its step loop (~1 s a report on the CPU
    # benchmark, ours/plain 2.3 -> 1.1 with reports 4x rarer). Polling at 0.5 s removes the stall
    # for reports at least that far apart, at the cost of a small actor call per worker per poll.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    **{k: os.environ.get(k, v) for k, v in RAY_DATA_ENV.items()},
}
# How much of each custom placement resource an embedded local Ray advertises (`local_node_resources`).
LOCAL_MARKER_AMOUNT = 10_000.0
# Rank 0 writes the keys of the records a resumed epoch already trained on here (see build_datasets).
RESUME_SKIP_FILE = "resume_skip_keys.npy"


def ensure_ray(cfg: Config) -> None:
    """Join the cluster in RAY_ADDRESS, or start an embedded local one sized for this run."""
    import ray

    if ray.is_initialized():
        return
    env = dict(WORKER_ENV)
    if os.environ.get("DS_ACCELERATOR"):
        env["DS_ACCELERATOR"] = os.environ["DS_ACCELERATOR"]
    if cluster_address():
        # Under `ray job submit` the job's own runtime env may set these names already; Ray refuses
        # to merge two values of one variable, and the job's choice wins.
        env = {k: v for k, v in env.items() if k not in os.environ}
        init_ray(runtime_env={"env_vars": env}, log_to_driver=True, what=f"run {cfg.run_name}")
        return
    # A busy small machine can take longer than Ray's default to start its metrics agent.
    os.environ.setdefault("RAY_agent_register_timeout_ms", "120000")
    # Local mode: logical CPUs are a scheduling budget. On a small machine, make room for the train
    # workers plus the preprocessing actors (which read the shards) and one CPU to spare, so that
    # Ray Data never waits behind Train's reservation (`backpressured:tasks(ResourceBudget)`).
    s, d = cfg.scaling, cfg.data
    needed = s.workers * s.cpus_per_worker + d.preprocess_actors * d.preprocess_cpus_per_actor + 1
    cpus = max(os.cpu_count() or 1, math.ceil(needed))
    init_ray(
        runtime_env={"env_vars": env},
        log_to_driver=True,
        what=f"run {cfg.run_name}",
        num_cpus=cpus,
        include_dashboard=True,
        resources=local_node_resources(cfg),
    )


def local_node_resources(cfg: Config) -> dict[str, float]:
    """The custom resources an embedded Ray advertises: this one machine is the trainer node and the
    CPU node at once, so it holds the placement markers the recipe asks for (`scaling.resources_per_worker`,
    `data.preprocess_resources`) and a cluster recipe runs here as it is instead of waiting for a node.
    On one machine the markers say nothing about capacity (CPUs and GPUs bound it): ample of each, so
    that they never limit the workers, the preprocessing actors or a sweep's concurrent trials."""
    names = {*cfg.scaling.resources_per_worker, *cfg.data.preprocess_resources} - {"CPU", "GPU", "memory"}
    return {name: LOCAL_MARKER_AMOUNT for name in sorted(names)}


def resolve_use_gpu(cfg: Config) -> bool:
    import ray

    if cfg.scaling.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) >= 1
    return bool(cfg.scaling.use_gpu)


def storage_location(cfg: Config):
    """(storage_path for RunConfig, storage_filesystem or None, local run directory or None)."""
    if storage.is_s3(cfg.run.storage):
        fs, path = storage.filesystem_for(cfg.run.storage)
        return path, fs, None
    root = Path(cfg.run.storage).expanduser().resolve()
    return str(root), None, root / cfg.run_name


def planned_steps(cfg: Config, train_records: int) -> tuple[int, int]:
    """(steps per epoch, total steps): full global batches only, so every rank has data every step."""
    per_epoch = train_records // cfg.global_batch
    if per_epoch < 1:
        raise ValueError(
            f"data.train: {train_records} records are fewer than one global batch of {cfg.global_batch} "
            "(scaling.workers x data.per_device_batch x train.grad_accum)"
        )
    total = cfg.train.max_steps or cfg.train.epochs * per_epoch
    return per_epoch, total


def worker_count(cfg: Config) -> int | tuple[int, int]:
    """ScalingConfig(num_workers): a fixed count, or (min, max) for Ray Train's elastic mode."""
    s = cfg.scaling
    return s.workers if s.min_workers is None else (s.min_workers, s.workers)


def check_resume_plan(cfg: Config, run_uri: str, resume_plan: dict) -> None:
    """A run that resumes must keep the plan of its newest checkpoint (steps, workers, batch, LRs):
    otherwise the restored optimizer and LR schedule would be silently re-timed. Checked before any
    worker starts; a checkpoint written before plans were recorded is not checked."""
    import json

    from vistralv_ray.config import ConfigError
    from vistralv_ray.data.runs import STATE_FILE, latest_checkpoint_uri
    from vistralv_ray.training.checkpointing import resume_changes

    try:
        checkpoint = latest_checkpoint_uri(run_uri)
    except FileNotFoundError:
        return  # a new run
    saved = json.loads(storage.read_bytes(storage.join(checkpoint, STATE_FILE))).get("plan", {})
    changes = resume_changes(cfg, saved, resume_plan)
    if changes:
        raise ConfigError(
            f"run.name: run {cfg.run_name} resumes from {checkpoint}, planned with other values ("
            + "; ".join(changes)
            + "): give this run another run.name, or set back the values it was started with"
        )
    if saved and saved.get("world_size", resume_plan["world_size"]) != resume_plan["world_size"]:
        log.info(
            "resuming elastic run %s from %s, written at %d workers: same plan, re-derived per worker count by %s",
            cfg.run_name,
            checkpoint,
            saved["world_size"],
            cfg.scaling.elastic_policy,
        )
    elif saved:
        log.info("resuming run %s from %s: same plan", cfg.run_name, checkpoint)


def write_run_files(cfg: Config, run_uri: str, extra: dict) -> None:
    """The resolved config and the LR arithmetic; an existing, different config is kept, not overwritten."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)
    target = storage.join(run_uri, "config.yaml")
    if storage.exists(target) and storage.read_bytes(target).decode() != text:
        n = 1
        while storage.exists(storage.join(run_uri, f"config.resume-{n}.yaml")):
            n += 1
        target = storage.join(run_uri, f"config.resume-{n}.yaml")
        log.warning("run %s already has a different config.yaml; this run's config is in %s", cfg.run_name, target)
    storage.write_bytes(target, text.encode())
    storage.write_bytes(storage.join(run_uri, "lr_plan.yaml"), yaml.safe_dump(extra, sort_keys=False).encode())


def absolute_local_paths(cfg: Config) -> Config:
    """Local model and data paths made absolute: Ray Train runs workers in another directory."""

    def fix(path: str) -> str:
        if storage.is_s3(path):
            return path
        local = Path(path).expanduser()
        return str(local.resolve()) if local.exists() else path  # otherwise a hub id

    model = dataclasses.replace(
        cfg.model, language_model=fix(cfg.model.language_model), vision_tower=fix(cfg.model.vision_tower)
    )
    data = dataclasses.replace(cfg.data, train=[fix(p) for p in cfg.data.train], eval=[fix(p) for p in cfg.data.eval])
    return dataclasses.replace(cfg, model=model, data=data)


def build_trainer(cfg: Config, callbacks: list | None = None):
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from vistralv_ray.data.pipeline import build_datasets, ingest_options
    from vistralv_ray.training.benchmark import load_subset
    from vistralv_ray.training.hooks import PROBE_ENV
    from vistralv_ray.training.loop import train_loop_per_worker

    check_projector_start(cfg)  # before Ray, workers or GPUs
    # train.benchmark: its questions, read here once (a wrong file stops the run before any worker).
    benchmark_items = load_subset(cfg.train.benchmark) if cfg.train.benchmark.name else None
    if cluster_address():
        ensure_ray(cfg)  # its nodes and node types are what preflight checks the run against
    cfg = run_preflight(cfg)  # placeholders, credentials, GPUs and resources, before any GPU node
    ensure_ray(cfg)
    cfg = absolute_local_paths(cfg)
    if cfg.model.init_projector_from and cfg.model.init_projector_from != RANDOM_PROJECTOR:
        from vistralv_ray.model.assembly import resolve_projector_uri

        # Resolved once here (a run name becomes its newest checkpoint), so every worker loads the same file.
        uri = resolve_projector_uri(cfg.model.init_projector_from, cfg.run.storage)
        log.info("finetune starts from the projector in %s", uri)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_projector_from=uri))
    use_gpu = resolve_use_gpu(cfg)
    storage_path, storage_fs, local_run_dir = storage_location(cfg)
    run_uri = storage.join(cfg.run.storage if storage.is_s3(cfg.run.storage) else storage_path, cfg.run_name)
    resume_skip_uri = storage.join(run_uri, RESUME_SKIP_FILE)
    # Every train worker and preprocessing actor records the node it runs on here.
    placement_uri = storage.join(run_uri, PLACEMENT_DIR)
    datasets, counts = build_datasets(cfg, resume_skip_uri, placement_uri)
    per_epoch, total = planned_steps(cfg, counts["train"])
    lr = lr_plan(cfg)
    log.info("learning rate: %s", lr.arithmetic())
    log.info("data: %s records; %d steps per epoch, %d steps planned", counts, per_epoch, total)
    resume_plan = checkpoint_resume_plan(cfg, total)
    if cfg.scaling.min_workers is not None:
        for row in elastic_table(cfg, counts["train"]):
            log.info("elastic: at %d workers: %s", row["workers"], row["note"] or "as planned")
    check_resume_plan(cfg, run_uri, resume_plan)
    write_run_files(
        cfg,
        run_uri,
        {
            **lr.to_dict(),
            "records": counts,
            "steps_per_epoch": per_epoch,
            "total_steps": total,
            "use_gpu": use_gpu,
            **({"elastic": elastic_table(cfg, counts["train"])} if cfg.scaling.min_workers is not None else {}),
        },
    )
    wandb_dir = local_run_dir or Path("~/.cache/vistralv-ray").expanduser() / cfg.run_name
    plan = {
        "use_gpu": use_gpu,
        "total_steps": total,
        # The schedule and the end of the run in samples (see optim.sample_lr_factor): a resized
        # elastic run takes steps of another size.
        "total_samples": resume_plan["total_samples"],
        "warmup_samples": warmup_steps_for(total, cfg.train.warmup_ratio) * lr.global_batch,
        "steps_per_epoch": per_epoch,
        "effective_lr": lr.effective_lr,
        "projector_lr": lr.projector_lr,
        "lr_plan": lr.to_dict(),
        "resume_plan": resume_plan,
        "datasets": sorted(datasets),
        "resume_skip_uri": resume_skip_uri,
        "placement_uri": placement_uri,
        "run_name": cfg.run_name,
        "run_dir_local": str(local_run_dir) if local_run_dir else None,
        "wandb_dir": str(wandb_dir),
        "wandb_id": hashlib.sha1(f"{cfg.run.storage}/{cfg.run_name}".encode()).hexdigest()[:12],
        "probe_logits_path": os.environ.get(PROBE_ENV),
        "benchmark_items": benchmark_items,
        # The driver draws the bar: only where it writes to a terminal (job logs get the log lines).
        "progress_bar": cfg.run.progress_bar and sys.stderr.isatty(),
    }
    resources = {"CPU": cfg.scaling.cpus_per_worker, **cfg.scaling.resources_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": dataclasses.asdict(cfg), "plan": plan},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=worker_count(cfg),
            use_gpu=use_gpu,
            resources_per_worker=resources,
            elastic_resize_monitor_interval_s=cfg.scaling.resize_interval_s,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run_name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            callbacks=callbacks or [],
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split="all", execution_options=ingest_options(cfg, datasets)),
    )
    return trainer, plan


def train(cfg: Config, callbacks: list | None = None):
    """Run training to the end (or resume it); returns the Ray Train Result."""
    trainer, plan = build_trainer(cfg, callbacks)
    result = trainer.fit()
    return result
