"""Where the training worker's metrics go: the Ray dashboard, wandb, the progress bar and one log line.

Rank 0 reports; the other ranks hold a `Reporter` that exports only their own data wait and memory
to the dashboard (per rank), so the loop calls it the same way on every rank. Ray Train's own report
logging is quieted: the progress line replaces it.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

from vistralv_ray.config.schema import Config
from vistralv_ray.logging import get_logger
from vistralv_ray.training.metrics import DashboardMetrics

log = get_logger(__name__)


class Reporter:
    """Rank 0's outlets for a run's metrics; the other ranks export their per-rank gauges only."""

    def __init__(self, cfg: Config, plan: dict, rank: int, done_steps: int):
        self.plan = plan
        lead = rank == 0
        self.lead = lead
        self.dashboard = DashboardMetrics(plan["run_name"], rank)  # every rank: its own data wait, memory
        self.wandb = start_wandb(cfg, plan) if lead else None
        self.bar = start_progress_bar(plan, done_steps) if lead else None

    def step_done(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def publish(self, metrics: dict, steps: int, tokens: int) -> None:
        """One report's metrics (rank 0's copy; every rank computed the same values)."""
        self.dashboard.record(metrics, steps, tokens)
        if not self.lead:
            return
        log.info(progress_line(metrics, self.plan["total_steps"]))
        if self.bar is not None:
            self.bar.set_description(f"{self.plan['run_name']} loss {metrics['loss']:.4f}")
        if self.wandb is not None:
            self.wandb.log(numeric(metrics), step=metrics["step"])

    def close(self, metrics: dict) -> None:
        if self.bar is not None:
            self.bar.close()
            sys.stdout.flush()  # the closing state travels as a line on stdout: send it before the worker ends
        if self.wandb is not None:
            self.wandb.summary.update(numeric(metrics))
            self.wandb.finish()


def numeric(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def start_wandb(cfg: Config, plan: dict):
    mode = cfg.run.wandb
    if mode == "off":
        return None
    import wandb

    wandb_dir = Path(plan["wandb_dir"])
    wandb_dir.mkdir(parents=True, exist_ok=True)
    return wandb.init(
        mode=mode,
        project=cfg.run.wandb_project,
        group=cfg.run.wandb_group,
        name=plan["run_name"],
        id=plan["wandb_id"],
        resume="allow",
        dir=str(wandb_dir),
        config={**dataclasses.asdict(cfg), "lr_plan": plan["lr_plan"]},
    )


def start_progress_bar(plan: dict, done: int):
    if not plan.get("progress_bar"):
        return None
    from ray.experimental.tqdm_ray import tqdm

    bar = tqdm(desc=plan["run_name"], total=plan["total_steps"], unit="step")
    bar.update(done)  # a resumed run starts where its checkpoint left off
    return bar


def progress_line(m: dict, total: int) -> str:
    parts = [f"step {m['step']}/{total}", f"loss {m['loss']:.4f}"]
    if "eval_loss" in m:
        parts.append(f"eval_loss {m['eval_loss']:.4f}")
    parts += [f"lr {m.get('lr', 0):.3g}", f"{m['samples_per_s']:.1f} samples/s", f"{m['tokens_per_s']:.0f} tokens/s"]
    if m.get("mfu") is not None:
        parts.append(f"MFU {100 * m['mfu']:.1f}%")
    parts.append(f"data wait {100 * m['data_wait_fraction']:.0f}%")
    return " | ".join(parts)


def quiet_ray_train_reports() -> None:
    """Ray Train logs every report's full metrics dict at INFO; our one-line progress replaces it."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)
