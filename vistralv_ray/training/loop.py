"""The Ray Train worker: build, restore, loop, report.

`Worker.run` builds the model (frozen by stage, wrapped in DeepSpeed), restores the checkpoint Ray
hands over, runs the optimizer steps and reports every few steps, with an eval and a checkpoint
when due. Where the metrics go is `reporting.py`; the test hooks are `hooks.py`.
Ray hands the config over as a dict; the first thing the worker does is rebuild the typed tree.
Every rank runs the same number of steps, reports and collective calls: the end of the data is
agreed on with an all-reduce, and a rank without a batch still runs the same modules.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from vistralv_ray.config.loader import config_from_dict
from vistralv_ray.config.schema import Config
from vistralv_ray.data.packing import TrainBatch
from vistralv_ray.data.runs import CONFIG_FILE, DEEPSPEED_DIR, RUN_INFO_FILE
from vistralv_ray.errors import REJECT_REASONS
from vistralv_ray.logging import get_logger
from vistralv_ray.training.checkpointing import (
    TrainerState,
    mark_reported_checkpoint_complete,
    restore_rng_state,
    resume_changes,
    resume_plan,
    save_rng_state,
)
from vistralv_ray.training.hooks import maybe_inject_fault, maybe_save_probe
from vistralv_ray.training.reporting import Reporter, quiet_ray_train_reports
from vistralv_ray.training.scaling import elastic_note, lr_plan
from vistralv_ray.training.step import dummy_batch

log = get_logger(__name__)


def train_loop_per_worker(loop_config: dict) -> dict | None:
    cfg = config_from_dict(loop_config["config"])
    plan = loop_config["plan"]
    on_gpu = bool(plan["use_gpu"]) and torch.cuda.is_available()
    if not on_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    return Worker(cfg, plan, on_gpu).run()


class Worker:
    def __init__(self, cfg: Config, plan: dict, on_gpu: bool):
        import ray.train

        from vistralv_ray.training.strategy import resolve_precision, torch_dtype

        self.cfg, self.plan, self.on_gpu = cfg, plan, on_gpu
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = torch.device(f"cuda:{ctx.get_local_rank()}" if on_gpu else "cpu")
        if on_gpu:
            torch.cuda.set_device(self.device)
        self.dtype = torch_dtype(resolve_precision(cfg.train.precision, on_gpu))
        self.rejected = dict.fromkeys(REJECT_REASONS, 0)
        quiet_ray_train_reports()
        self.history: list[dict] = []
        # The batch and LRs at this attempt's world size: the planned ones at scaling.workers, and
        # what scaling.elastic_policy makes of another size in an elastic run.
        self.lr = lr_plan(cfg, self.world)
        self.resume_plan = resume_plan(cfg, plan["total_steps"], self.world)
        self.resize: dict = {}  # set by restore() when this attempt runs at another size than its checkpoint
        if plan.get("placement_uri"):  # the node this rank runs on, once per attempt
            from vistralv_ray.data.placement import record_node

            record_node(plan["placement_uri"], "train", rank=self.rank, world_size=self.world)
        if self.world != cfg.scaling.workers and self.rank == 0:
            log.warning(
                "elastic: training with %d of %d workers: %s (%s)",
                self.world,
                cfg.scaling.workers,
                elastic_note(cfg, self.lr),
                self.lr.arithmetic(),
            )

    # ---- setup -------------------------------------------------------------------------------
    def build(self) -> None:
        import deepspeed

        from vistralv_ray.model.assembly import apply_stage, build_model, llava_of, resolve_attn_implementation
        from vistralv_ray.training.metrics import FlopModel
        from vistralv_ray.training.optim import SampleSchedule, build_param_groups
        from vistralv_ray.training.strategy import build_deepspeed_config, build_optimizer

        cfg, t = self.cfg, self.cfg.train
        # train.seed governs everything seeded: the fresh projector, LoRA, dropout, Python/NumPy draws.
        random.seed(t.seed)
        np.random.seed(t.seed)
        torch.manual_seed(t.seed)
        attn = resolve_attn_implementation(cfg.model.attn_implementation, self.on_gpu)
        assembled = build_model(cfg.model, dtype=self.dtype, attn_implementation=attn, seed=t.seed)
        self.tokenizer = assembled.tokenizer
        self.bench = None  # train.benchmark: the subset the driver read, answered every few steps
        if self.plan.get("benchmark_items"):
            from vistralv_ray.training.benchmark import BenchmarkStep

            synced = t.zero_stage == 3 and self.world > 1
            items = self.plan["benchmark_items"]
            self.bench = BenchmarkStep(t.benchmark, items, assembled, cfg.model, self.rank, self.world, synced)
        model = apply_stage(assembled.model, t.stage, cfg.model.lora)
        if t.gradient_checkpointing:
            llava_of(model).model.language_model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        model.to(self.device)
        self.flops = FlopModel.of(model)
        groups = build_param_groups(model, self.lr.effective_lr, self.lr.projector_lr, t.weight_decay)
        for g in groups:
            g.pop("param_names")
        # The scheduler's LRs come in this order; `lr` is the language model's, `projector_lr` the projector's.
        self.group_names = [g["name"] for g in groups]
        optimizer = build_optimizer(groups, cfg, self.on_gpu)
        # Over samples, so that a resized run keeps its place in the warmup and decay (optim.py).
        self.scheduler = SampleSchedule(
            optimizer,
            [g["lr"] for g in groups],
            self.plan["total_samples"],
            self.plan["warmup_samples"],
            t.schedule,
        )
        # DeepSpeed's accumulation is this world size's (keep_global_batch recomputes it).
        ds_cfg = dataclasses.replace(cfg, train=dataclasses.replace(t, grad_accum=self.lr.grad_accum))
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            config=build_deepspeed_config(ds_cfg, self.world, self.on_gpu),
            dist_init_required=False,
        )

    def restore(self) -> TrainerState:
        import ray.train

        from vistralv_ray.training.strategy import load_engine, load_resized_engine

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return TrainerState(total_steps=self.plan["total_steps"], plan=self.resume_plan)
        with checkpoint.as_directory() as d:
            state = TrainerState.load(Path(d))
            # The driver checked the newest checkpoint it saw; Ray may hand over a newer one. An
            # elastic run's other world size is no change when the policy explains it.
            changes = resume_changes(self.cfg, state.plan, self.resume_plan)
            if changes:
                raise RuntimeError(f"{checkpoint.path}: the run's plan changed since this checkpoint: {changes}")
            saved_world = state.plan.get("world_size", self.world)
            if saved_world != self.world:
                # ZeRO partitions the optimizer state by rank: re-partition it for this world size.
                load_resized_engine(self.engine, Path(d) / DEEPSPEED_DIR, state.tag, self.rank)
                self.resize = {
                    "resized_from": saved_world,
                    "world_size": self.world,
                    "checkpoint_saved_at": state.saved_at,
                }
                if self.rank == 0:
                    log.warning(
                        "elastic: resized %d -> %d workers at sample %d (step %d): global batch %s -> %d, "
                        "grad accumulation %d, effective LR %s -> %.6g (%s)",
                        saved_world,
                        self.world,
                        state.samples_seen,
                        state.step,
                        state.plan.get("global_batch"),
                        self.lr.global_batch,
                        self.lr.grad_accum,
                        state.plan.get("effective_lr"),
                        self.lr.effective_lr,
                        self.cfg.scaling.elastic_policy,
                    )
            else:
                load_engine(self.engine, Path(d) / DEEPSPEED_DIR, state.tag)
            if not restore_rng_state(Path(d), self.rank):
                log.warning("checkpoint has no RNG state for rank %d: dropout continues from a fresh seed", self.rank)
        # From here on, checkpoints record the plan (world size, batch, LRs) this attempt trains under.
        state.plan = self.resume_plan
        log.info(
            "resumed from step %d (epoch %d, %d records already seen)", state.step, state.epoch, len(state.seen_keys)
        )
        return state

    # ---- data --------------------------------------------------------------------------------
    def batches(self, name: str, epoch: int):
        import ray.train

        from vistralv_ray.data.preprocess import PackingCollate

        d = self.cfg.data
        pack_length = d.pack_length  # None: one packed row per micro-batch
        collate = PackingCollate(self.tokenizer.pad_token_id, d.batching, pack_length)
        shuffle = d.shuffle and name.startswith("train")
        return ray.train.get_dataset_shard(name).iter_torch_batches(
            batch_size=d.per_device_batch,
            collate_fn=collate,
            prefetch_batches=d.prefetch_batches,
            local_shuffle_buffer_size=max(d.shuffle_buffer, d.per_device_batch)
            if shuffle and d.shuffle_buffer
            else None,
            local_shuffle_seed=self.cfg.train.seed + epoch if shuffle else None,
        )

    def train_dataset_for(self, state: TrainerState) -> str:
        """`train`, or in an epoch resumed from a checkpoint `train_resume`: the data without the
        records this epoch already trained on (rank 0 hands their keys to the preprocessing actors)."""
        if not state.seen_keys:
            return "train"
        if self.rank == 0:
            from vistralv_ray.data.preprocess import save_keys

            save_keys(self.plan["resume_skip_uri"], state.seen_keys)
        # Every rank restored the same checkpoint, so all take this branch. No rank asks for the
        # split (which starts the pipeline that reads the file) before rank 0 has written it; an
        # earlier resume's file may still be there.
        self.all_sum([0.0])
        log.info("epoch %d resumes: %d records already trained on are left out", state.epoch, len(state.seen_keys))
        return "train_resume"

    def next_batch(self, iterator, timer) -> TrainBatch | None:
        """The next batch with at least one usable sample; counts rejected records on the way."""
        while True:
            started = time.perf_counter()
            batch = next(iterator, None)
            timer.waited(time.perf_counter() - started)
            if batch is None:
                return None
            for rid, reason, detail in batch.rejected:
                self.rejected[reason] += 1
                log.warning("record %r rejected in preprocessing: %s: %s", rid, reason, detail)
            if batch.num_samples:
                return batch

    def probe_batch(self) -> TrainBatch:
        """A batch for the logits probe (hooks.py): the first of eval's, else of train's."""
        name = "eval" if "eval" in self.plan["datasets"] else "train"
        return next(iter(self.batches(name, 0)), None) or dummy_batch(self.tokenizer.pad_token_id)

    def all_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    # ---- training ----------------------------------------------------------------------------
    def run(self) -> dict | None:
        from vistralv_ray.training.metrics import StepTimer

        started = time.perf_counter()
        self.build()
        built = time.perf_counter()
        state = self.restore()
        restored = time.perf_counter()
        total_samples, accum = self.plan["total_samples"], self.lr.grad_accum
        # The run ends at its planned samples (at the planned size: its planned steps); a resized run
        # takes steps of another size, and its last step may end past them by less than one step.
        self.scheduler.set_position(state.samples_seen, self.lr.global_batch)
        self.reporter = Reporter(self.cfg, self.plan, self.rank, state.step)
        timer = StepTimer()
        window = {"samples": 0, "tokens": 0, "flops": 0.0, "steps": 0, "loss": 0.0}
        first_step = self.rank == 0
        self.engine.train()
        while state.samples_seen < total_samples:
            iterator = iter(self.batches(self.train_dataset_for(state), state.epoch))
            while state.samples_seen < total_samples:
                micro = []
                while len(micro) < accum:
                    batch = self.next_batch(iterator, timer)
                    if batch is None:
                        break
                    micro.append(batch)
                have = 1.0 if len(micro) == accum else 0.0
                targets = float(sum(b.num_target_tokens for b in micro))
                samples = sum(b.num_samples for b in micro)
                agreed_have, global_targets, global_samples = self.all_sum([have, targets, float(samples)])
                if agreed_have < self.world:
                    break  # some rank ran out of data: the epoch ends for everyone
                if first_step:
                    first_step = False
                    log.info(
                        "startup: model + DeepSpeed %.1f s, restore %.1f s, first batch %.1f s",
                        built - started,
                        restored - built,
                        time.perf_counter() - restored,
                    )
                loss = self.optimizer_step(micro, global_targets)
                state.step += 1
                # Records consumed (rejected ones too): the data position the schedule follows.
                state.samples_seen += self.lr.global_batch
                self.scheduler.set_position(state.samples_seen, self.lr.global_batch)
                if self.resize and "resize_s" not in self.resize:
                    self.resize.update(self.resize_timeline(started, built, restored))
                self.reporter.step_done()
                maybe_inject_fault(state.step, self.rank, self.world, self.cfg, self.plan)
                for b in micro:
                    state.seen_keys.update(b.sample_keys)
                tokens = sum(b.num_tokens for b in micro)
                state.epoch_samples += int(global_samples)
                window["samples"] += samples
                window["tokens"] += tokens
                window["flops"] += sum(
                    self.flops.step_flops(b.num_tokens, b.sum_sq_lengths, b.pixel_values.shape[0]) for b in micro
                )
                window["steps"] += 1
                window["loss"] += loss
                if not torch.isfinite(torch.tensor(loss)):
                    log.error("loss is %s at step %d: stopping (diverged)", loss, state.step)
                    metrics = self.report(state, window, timer, diverged=True)
                    return self.finish(state, metrics)
                last = state.samples_seen >= total_samples
                if (
                    state.step % self.cfg.train.log_every == 0
                    or last
                    or state.step % self.cfg.train.checkpoint_every == 0
                    or (self.bench is not None and self.bench.due(state.step, last))
                ):
                    self.report(state, window, timer, eval_now=self.eval_due(state.step, last), last=last)
                    window = {"samples": 0, "tokens": 0, "flops": 0.0, "steps": 0, "loss": 0.0}
            else:
                break  # the planned steps are done (the inner loop ended without running out of data)
            state.epoch += 1
            state.seen_keys = set()
            state.epoch_samples = 0
        metrics = self.history[-1] if self.history else {}
        maybe_save_probe(self.plan, self.engine, self.probe_batch, self.dtype, self.device, self.rank)
        return self.finish(state, metrics)

    def optimizer_step(self, micro: list[TrainBatch], global_targets: float) -> float:
        from vistralv_ray.training.step import summed_token_loss

        accum = len(micro)
        scale = self.world * accum / max(global_targets, 1.0)
        total = 0.0
        for batch in micro:
            loss_sum = summed_token_loss(self.engine, batch.to(self.device), self.dtype)
            # DeepSpeed divides by grad_accum and averages over ranks: undo both so the gradient is
            # the mean over every target token of the step, however they are spread.
            self.engine.backward(loss_sum * scale)
            self.engine.step()
            total += float(loss_sum.detach())
        (step_loss_sum,) = self.all_sum([total])
        return step_loss_sum / max(global_targets, 1.0)

    def eval_due(self, step: int, last: bool) -> bool:
        if "eval" not in self.plan["datasets"]:
            return False
        every = self.cfg.train.eval_every
        return last or (every is not None and step % every == 0)

    @torch.no_grad()
    def evaluate(self) -> dict:
        from vistralv_ray.training.metrics import StepTimer
        from vistralv_ray.training.step import summed_token_loss

        self.engine.eval()
        iterator = iter(self.batches("eval", 0))
        loss_sum, targets = 0.0, 0.0
        timer = StepTimer()
        while True:
            batch = self.next_batch(iterator, timer)
            (any_left,) = self.all_sum([0.0 if batch is None else 1.0])
            if any_left == 0:
                break
            # A rank without a batch runs a dummy one: ZeRO-3 needs every rank in every forward.
            run = batch if batch is not None else dummy_batch(self.tokenizer.pad_token_id)
            value = summed_token_loss(self.engine, run.to(self.device), self.dtype)
            if batch is not None:
                loss_sum += float(value)
                targets += batch.num_target_tokens
        loss_sum, targets = self.all_sum([loss_sum, targets])
        self.engine.train()
        eval_loss = loss_sum / max(targets, 1.0)
        return {"eval_loss": eval_loss, "eval_perplexity": float(torch.exp(torch.tensor(min(eval_loss, 50.0))))}

    # ---- reporting and checkpoints -----------------------------------------------------------
    def report(
        self, state: TrainerState, window: dict, timer, eval_now: bool = False, diverged: bool = False, last=False
    ):
        import ray.train

        from vistralv_ray.training.metrics import memory_mb, peak_flops_per_device

        elapsed, wait = timer.reset()
        samples, tokens, flops, steps, loss_total = self.all_sum(
            [
                window["samples"],
                window["tokens"],
                window["flops"],
                window["steps"] / self.world,
                window["loss"] / self.world,
            ]
        )
        rejected = dict(
            zip(REJECT_REASONS, self.all_sum([float(self.rejected[r]) for r in REJECT_REASONS]), strict=True)
        )
        lrs = dict(zip(self.group_names, self.scheduler.get_last_lr(), strict=True))
        peak = peak_flops_per_device(self.on_gpu)
        metrics = {
            "step": state.step,
            "epoch": state.epoch,
            "loss": loss_total / max(steps, 1),
            # align trains the projector only: its LR is the run's LR.
            "lr": lrs.get("model", lrs.get("model_no_decay", lrs.get("projector"))),
            "projector_lr": lrs.get("projector", lrs.get("projector_no_decay")),
            "grad_norm": _as_float(self.engine.get_global_grad_norm()),
            "samples_per_s": samples / elapsed,
            "tokens_per_s": tokens / elapsed,
            "tflops_per_device": flops / elapsed / self.world / 1e12,
            "mfu": flops / elapsed / self.world / peak if peak else None,
            "data_wait_fraction": wait / elapsed if elapsed > 0 else 0.0,
            "memory_mb": memory_mb(self.device),
            "rejected_records": int(sum(rejected.values())),
            "diverged": diverged,
            # Elastic runs: the size trained at and what it means (constant in a fixed-size run).
            "world_size": self.world,
            "global_batch": self.lr.global_batch,
            "grad_accum": self.lr.grad_accum,
            "effective_lr": self.lr.effective_lr,
            "samples_seen": state.samples_seen,
        }
        if self.resize and not self.resize.get("reported") and "resize_s" in self.resize:
            # Once, in the first report after a resize: where it came from and what it cost.
            self.resize["reported"] = True
            metrics.update({k: v for k, v in self.resize.items() if k not in ("reported", "world_size")})
        metrics.update({f"rejected_{k}": int(v) for k, v in rejected.items() if v})
        if eval_now and not diverged:
            metrics.update(self.evaluate())
        if self.bench is not None and self.bench.due(state.step, last) and not diverged:
            metrics.update(self.bench.run(self.engine, self.device, self.dtype, state.step))
        checkpoint_now = diverged is False and (state.step % self.cfg.train.checkpoint_every == 0 or last)
        metrics = {k: v for k, v in metrics.items() if v is not None}
        self.history.append(metrics)
        self.reporter.publish(metrics, int(window["steps"]), int(tokens))
        if checkpoint_now:
            with tempfile.TemporaryDirectory() as tmp:
                self.save_checkpoint(Path(tmp), state)
                ray.train.report(
                    metrics,
                    checkpoint=ray.train.Checkpoint.from_directory(tmp),
                    checkpoint_dir_name=f"checkpoint-{state.step:06d}",
                )
            self.all_sum([0.0])  # a barrier: every rank's report returned, so its part is uploaded
            if self.rank == 0:
                mark_reported_checkpoint_complete(state.step, f"checkpoint-{state.step:06d}")
        else:
            ray.train.report(metrics)
        return metrics

    def save_checkpoint(self, directory: Path, state: TrainerState) -> None:
        from vistralv_ray.config import dump_config
        from vistralv_ray.model.assembly import PROJECTOR_FILE, projector_state, save_projector
        from vistralv_ray.training.strategy import save_engine

        state.tag = f"step-{state.step}"
        state.saved_at = time.time()
        save_engine(self.engine, directory / DEEPSPEED_DIR, state.tag)
        state.save(directory, self.rank)
        save_rng_state(directory, self.rank)
        projector = projector_state(self.engine.module)  # every rank: ZeRO-3 gathers it
        if self.rank == 0:
            save_projector(self.engine.module, directory / PROJECTOR_FILE, projector)
            self.tokenizer.save_pretrained(directory / "tokenizer")
            # Self-contained for export: the model recipe and the precision the weights were trained in.
            dump_config(self.cfg, directory / CONFIG_FILE)
            precision = "bf16" if self.dtype == torch.bfloat16 else ("fp16" if self.dtype == torch.float16 else "fp32")
            (directory / RUN_INFO_FILE).write_text(
                json.dumps({"run_name": self.plan["run_name"], "step": state.step, "precision": precision}, indent=1)
            )

    def resize_timeline(self, started: float, built: float, restored: float) -> dict:
        """Seconds a resize cost, measured when the first step after it is done: since the checkpoint
        it resumed from was saved (lost work + detection + restart + restore + first step), and the
        parts this process saw (model + DeepSpeed, restore incl. re-partitioning, first step)."""
        now_wall, now = time.time(), time.perf_counter()
        saved_at = self.resize.get("checkpoint_saved_at") or 0.0
        return {
            "resize_s": now_wall - saved_at if saved_at else now - started,
            "resize_attempt_started_at": now_wall - (now - started),
            "resize_build_s": built - started,
            "resize_restore_s": restored - built,
            "resize_first_step_s": now - restored,
        }

    def finish(self, state: TrainerState, metrics: dict) -> dict | None:
        self.reporter.close(metrics)
        if self.rank != 0:
            return None
        return {
            "final": metrics,
            "history": self.history,
            "steps": state.step,
            "epoch": state.epoch,
            "epoch_samples": state.epoch_samples,
            "samples_seen": state.samples_seen,
            "world_size": self.world,
        }


def _as_float(value) -> float | None:
    if value is None:
        return None
    return float(value.item() if hasattr(value, "item") else value)
