"""`bench train`: our training step (Ray Train worker + DeepSpeed) against a plain PyTorch loop.

Both run in the same command on the same tiny model and the same records. Ours is the real path:
`training.driver.train` with one worker, Ray Data feeding it, and the figures it reports itself
(`Result.return_value["history"]`, one entry per logging window). The baselines are the loops a
researcher would write: the same model and optimizer, no Ray, no DeepSpeed, with batches built in
memory beforehand (a lower bound: no data work at all) or fed by a torch DataLoader worker doing
the same preprocessing (data work on the other core, as ours). Step times are medians over logging
windows, the first window dropped as warm-up.

Runs of one loop in separate processes differ by a few percent on a small machine, more than the
overhead being measured. So ours and the in-memory plain loop can run in turn several times
(`repeats`, the ratio is the median of the pairs'), and the DeepSpeed engine alone is timed against
the plain loop window by window in one process, which cancels the machine's drift between them.
"""

from __future__ import annotations

import itertools
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from vistralv_ray.config import config_from_dict
from vistralv_ray.config.schema import RANDOM_PROJECTOR, Config
from vistralv_ray.logging import get_logger
from vistralv_ray.ray_runtime import init_ray

log = get_logger(__name__)


@dataclass
class TrainBenchOptions:
    steps: int = 60  # measured optimizer steps (after warm-up)
    warmup_steps: int = 5
    window: int = 5  # steps per logging window (train.log_every); warmup_steps must be a multiple
    batch_size: int = 8
    stage: str = "finetune"
    threads: int = 1  # torch threads of the train worker and of the plain loop
    seed: int = 0
    repeats: int = 1  # (ours, plain) pairs; the overhead ratio is the median of the pairs' ratios

    def __post_init__(self):
        for name in ("steps", "window", "batch_size", "threads", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}: {getattr(self, name)}; allowed: >= 1")
        if self.warmup_steps < 0 or self.warmup_steps % self.window:
            raise ValueError(f"--warmup-steps: {self.warmup_steps}; allowed: a multiple of --window ({self.window})")


def make_inputs(work: Path, records: int, stage: str, seed: int = 0) -> dict[str, str]:
    """Tiny assets, the demo corpus and its shards under `work`."""
    from vistralv_ray.data.demo import make_demo_corpus
    from vistralv_ray.data.prepare import PrepareOptions, prepare
    from vistralv_ray.model.tiny import make_tiny

    assets = make_tiny(work / "tiny", seed=seed)
    corpus = make_demo_corpus(work / "demo", train_images=records, eval_images=1, seed=seed)
    source = corpus["align" if stage == "align" else "train"]
    out = work / "shards"
    prepare(source, PrepareOptions(str(corpus["images"]), str(out), shard_size=64), parallel=False, progress=False)
    return {"llm": str(assets["llm"]), "vision": str(assets["vision"]), "shards": str(out), "runs": str(work / "runs")}


def bench_config(paths: dict[str, str], opts: TrainBenchOptions, run_name: str = "bench-train") -> Config:
    total = opts.warmup_steps + opts.steps
    finetune = opts.stage == "finetune"
    return config_from_dict(
        {
            "model": {
                "language_model": paths["llm"],
                "vision_tower": paths["vision"],
                "template": "vistral" if finetune else "plain",
                "aspect": "pad" if finetune else "resize",
                "max_length": 256,
                # Step time does not depend on where the projector came from: a fresh one, said so.
                "init_projector_from": RANDOM_PROJECTOR if finetune else None,
            },
            "data": {
                "train": [paths["shards"]],
                "per_device_batch": opts.batch_size,
                "shuffle": False,
                "preprocess_cpus_per_actor": 0.5,
            },
            "train": {
                "stage": opts.stage,
                "max_steps": total,
                "log_every": opts.window,
                "checkpoint_every": total,
                "lr_rule": "none",
                "warmup_ratio": 0.0,
                "seed": opts.seed,
            },
            "scaling": {"workers": 1, "cpus_per_worker": float(opts.threads), "use_gpu": False},
            "run": {"storage": paths["runs"], "name": run_name},
        }
    )


def summarise(window_seconds: list[float], window_steps: list[int], samples: list[float], tokens: list[float]) -> dict:
    """Median step time over windows (each window's time / its steps) and throughput over all of them."""
    step_times = [s / n for s, n in zip(window_seconds, window_steps)]
    seconds = sum(window_seconds)
    return {
        "median_step_s": statistics.median(step_times),
        "samples_per_s": sum(samples) / seconds,
        "tokens_per_s": sum(tokens) / seconds,
        "measured_steps": int(sum(window_steps)),
        "windows": len(step_times),
    }


def windows_from_history(history: list[dict], global_batch: int, warmup_steps: int) -> dict:
    """Our loop's own report -> the same summary as the plain loop, plus its data-wait fraction."""
    seconds, steps, samples, tokens, waits = [], [], [], [], []
    previous = 0
    for entry in history:
        n = entry["step"] - previous
        previous = entry["step"]
        if entry["step"] <= warmup_steps or n <= 0:
            continue
        window_samples = n * global_batch
        elapsed = window_samples / entry["samples_per_s"]
        seconds.append(elapsed)
        steps.append(n)
        samples.append(window_samples)
        tokens.append(entry["tokens_per_s"] * elapsed)
        waits.append(entry["data_wait_fraction"] * elapsed)
    if not seconds:
        raise ValueError("no logging window after the warm-up steps: raise --steps")
    out = summarise(seconds, steps, samples, tokens)
    out["data_wait_fraction"] = sum(waits) / sum(seconds)
    return out


def run_ours(cfg: Config, opts: TrainBenchOptions) -> dict:
    from vistralv_ray.training.driver import train

    started = time.perf_counter()
    result = train(cfg)
    if result.error is not None:
        raise RuntimeError(f"the Ray Train run failed: {result.error}")
    out = windows_from_history(result.return_value["history"], cfg.global_batch, opts.warmup_steps)
    out["command_wall_s"] = time.perf_counter() - started
    return out


def plain_batches(cfg: Config, count: int, lazily: bool = False):
    """`count` batches of the shards' first records, in file order, built in memory (no Ray); with
    `lazily`, a generator that builds each when asked."""
    import dataclasses

    import pyarrow.parquet as pq

    from vistralv_ray.data.pipeline import shard_files
    from vistralv_ray.data.preprocess import PackingCollate, Preprocessor
    from vistralv_ray.data.shards import SHARD_COLUMNS
    from vistralv_ray.text.encoder import build_tokenizer

    rows = pq.read_table(shard_files(cfg.data.train), columns=SHARD_COLUMNS).to_pydict()
    pre = Preprocessor(dataclasses.asdict(cfg.model), cfg.data.max_image_pixels)
    collate = PackingCollate(build_tokenizer(cfg.model)[0].pad_token_id, cfg.data.batching, cfg.data.pack_length)
    b = cfg.data.per_device_batch
    batches = (collate(pre({k: v[i * b : (i + 1) * b] for k, v in rows.items()})) for i in range(count))
    return batches if lazily else list(batches)


def _fresh_model_and_optimizer(cfg: Config):
    from vistralv_ray.model.assembly import apply_stage, build_model
    from vistralv_ray.training.optim import build_param_groups
    from vistralv_ray.training.strategy import build_optimizer

    torch.manual_seed(cfg.train.seed)
    model = apply_stage(build_model(cfg.model).model, cfg.train.stage, cfg.model.lora)
    groups = build_param_groups(model, cfg.train.base_lr, cfg.train.base_lr, cfg.train.weight_decay)
    for g in groups:
        g.pop("param_names")
    return model, build_optimizer(groups, cfg, on_gpu=False)


def _timed_windows(step, batches, opts: TrainBenchOptions) -> dict:
    """Run `step(batch)` over the batches (a list or a loader), timed per logging window like our
    loop reports; a window's time includes waiting for its batches, as ours does."""
    seconds, steps, samples, tokens = [], [], [], []
    iterator, done = iter(batches), 0
    while True:
        began = time.perf_counter()
        window = []
        for batch in itertools.islice(iterator, opts.window):
            step(batch)
            window.append(batch)
        if not window:
            break
        done += len(window)
        if done <= opts.warmup_steps:
            continue
        seconds.append(time.perf_counter() - began)
        steps.append(len(window))
        samples.append(sum(b.num_samples for b in window))
        tokens.append(sum(b.num_tokens for b in window))
    return summarise(seconds, steps, samples, tokens)


def plain_step(cfg: Config):
    """A fresh model and optimizer, and the plain loop's step over a batch: torch only."""
    from vistralv_ray.training.step import summed_token_loss

    model, optimizer = _fresh_model_and_optimizer(cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()

    def step(batch):
        loss = summed_token_loss(model, batch, torch.float32) / max(batch.num_target_tokens, 1)
        loss.backward()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def run_plain(cfg: Config, opts: TrainBenchOptions, batches=None) -> dict:
    """Same model, optimizer, clipping and batches (a list, or a DataLoader); torch only. Timed per
    window like ours."""
    threads = torch.get_num_threads()
    torch.set_num_threads(opts.threads)
    try:
        batches = batches if batches is not None else plain_batches(cfg, opts.warmup_steps + opts.steps)
        return _timed_windows(plain_step(cfg), batches, opts)
    finally:
        torch.set_num_threads(threads)


class ShardBatches(torch.utils.data.IterableDataset):
    """The plain loop's data loading: the shards' first `count` micro-batches, read, preprocessed
    and collated by our Preprocessor and PackingCollate inside a DataLoader worker process."""

    def __init__(self, cfg: Config, count: int):
        self.cfg, self.count = cfg, count

    def __iter__(self):
        torch.set_num_threads(1)
        yield from plain_batches(self.cfg, self.count, lazily=True)


def run_plain_with_dataloader(cfg: Config, opts: TrainBenchOptions) -> dict:
    """The plain loop fed by a torch DataLoader (one worker process, prefetching): like ours, it
    prepares the next batches on the other core while it trains."""
    loader = torch.utils.data.DataLoader(
        ShardBatches(cfg, opts.warmup_steps + opts.steps), batch_size=None, num_workers=1, prefetch_factor=2
    )
    return run_plain(cfg, opts, loader)


def _interleaved_windows(steps: dict, batches: list, opts: TrainBenchOptions) -> dict[str, dict]:
    """Each loop in `steps` over the same batches, one logging window at a time in turn (ABBA order),
    so that a slow spell of the machine falls on every loop alike; summaries as `_timed_windows`."""
    names = list(steps)
    windows = {n: ([], [], [], []) for n in names}
    for index, start in enumerate(range(0, len(batches), opts.window)):
        window = batches[start : start + opts.window]
        for name in names if index % 2 == 0 else names[::-1]:
            began = time.perf_counter()
            for batch in window:
                steps[name](batch)
            if start + len(window) > opts.warmup_steps:
                seconds, count, samples, tokens = windows[name]
                seconds.append(time.perf_counter() - began)
                count.append(len(window))
                samples.append(sum(b.num_samples for b in window))
                tokens.append(sum(b.num_tokens for b in window))
    return {n: summarise(*windows[n]) for n in names}


def run_deepspeed_in_process(cfg: Config, opts: TrainBenchOptions, batches: list) -> dict[str, dict]:
    """The DeepSpeed engine of our worker (same config: ZeRO stage, clipping) on the in-memory
    batches, in this process without Ray, window by window in turn with the plain loop: what
    DeepSpeed alone adds to the plain loop. Returns both loops' summaries."""
    import deepspeed
    import torch.distributed as dist

    from vistralv_ray.training.step import summed_token_loss
    from vistralv_ray.training.strategy import build_deepspeed_config

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    started_group = not dist.is_initialized()
    if started_group:
        import socket

        with socket.socket() as sock:  # a free port for the one-process gloo group
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
        os.environ.update(env)
        deepspeed.init_distributed("gloo")
    threads = torch.get_num_threads()
    torch.set_num_threads(opts.threads)
    try:
        model, optimizer = _fresh_model_and_optimizer(cfg)
        engine, *_ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            config=build_deepspeed_config(cfg, 1, on_gpu=False),
            dist_init_required=False,
        )
        engine.train()

        def step(batch):
            loss = summed_token_loss(engine, batch, torch.float32) / max(batch.num_target_tokens, 1)
            engine.backward(loss)
            engine.step()
            float(loss.detach())  # our loop reads the loss every step

        return _interleaved_windows({"deepspeed": step, "plain": plain_step(cfg)}, batches, opts)
    finally:
        torch.set_num_threads(threads)
        if started_group:
            dist.destroy_process_group()


def run_train_bench(opts: TrainBenchOptions) -> dict:
    import ray

    from vistralv_ray.bench.inputs import machine
    from vistralv_ray.training.driver import WORKER_ENV

    total = opts.warmup_steps + opts.steps
    with tempfile.TemporaryDirectory(prefix="vistralv-bench-train-") as tmp:
        log.info("building tiny assets and %d demo records", total * opts.batch_size)
        paths = make_inputs(Path(tmp), total * opts.batch_size + opts.batch_size, opts.stage, opts.seed)
        cfg = bench_config(paths, opts)
        batches = plain_batches(cfg, total)
        pairs = []
        for repeat in range(opts.repeats):
            started_ray = not ray.is_initialized()
            if started_ray:
                # Our own cluster, quiet (worker logs would mix with --json output) and with the
                # worker's torch thread count pinned to the plain loop's.
                env = {**WORKER_ENV, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(opts.threads)}
                init_ray(
                    runtime_env={"env_vars": env},
                    what="bench train",
                    num_cpus=max(os.cpu_count() or 1, 4),
                    include_dashboard=False,
                )
            try:
                log.info("run %d/%d, ours: %d steps, Ray Train + DeepSpeed (1 worker)", repeat + 1, opts.repeats, total)
                # A run of its own each time: the same name would resume the previous run's last checkpoint.
                ours = run_ours(bench_config(paths, opts, f"bench-train-{repeat + 1}"), opts)
            finally:
                if started_ray:
                    ray.shutdown()  # the plain loop runs without a Ray cluster beside it
            log.info("run %d/%d, plain PyTorch: the same %d steps, batches in memory", repeat + 1, opts.repeats, total)
            pairs.append((ours, run_plain(cfg, opts, batches)))
        log.info("plain PyTorch fed by a DataLoader worker: the same %d steps", total)
        plain_loader = run_plain_with_dataloader(cfg, opts)
        log.info("the DeepSpeed engine alone and plain PyTorch, window by window in turn: %d steps each", total)
        interleaved = run_deepspeed_in_process(cfg, opts, batches)
    ratios = [o["median_step_s"] / p["median_step_s"] for o, p in pairs]
    ours, plain = _median_run([o for o, _ in pairs]), _median_run([p for _, p in pairs])
    return {
        "machine": machine(),
        "options": asdict(opts),
        "model": "tiny preset (Mistral 4 layers x 128 + SigLIP 2 layers x 64, 16 image tokens), fp32 on CPU",
        "ours": ours,
        "plain_pytorch": plain,
        "plain_pytorch_dataloader": plain_loader,
        "deepspeed_in_process": interleaved["deepspeed"],
        "plain_pytorch_interleaved": interleaved["plain"],
        "overhead_ratio": statistics.median(ratios),
        "overhead_ratios": ratios,
        "overhead_ratio_vs_dataloader": ours["median_step_s"] / plain_loader["median_step_s"],
        "deepspeed_overhead_ratio": interleaved["deepspeed"]["median_step_s"] / interleaved["plain"]["median_step_s"],
    }


def _median_run(runs: list[dict]) -> dict:
    """Several runs of one loop -> one summary: the median of each figure, steps and windows summed."""
    out = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k not in ("measured_steps", "windows")}
    out.update({k: sum(r[k] for r in runs) for k in ("measured_steps", "windows")})
    out["runs"] = len(runs)
    return out
