"""One Tune trial as the sweep reports it: what the results table, best.json and the plots read."""

from __future__ import annotations

from dataclasses import dataclass, field

STATUSES = ("completed", "stopped_early", "diverged", "error")


@dataclass
class TrialRecord:
    trial_id: str
    run_name: str
    params: dict
    base_lr: float
    effective_lr: float
    global_batch: int
    workers: int
    per_device_batch: int
    grad_accum: int
    lr_rule: str
    reference_batch: int
    planned_steps: int
    status: str
    iterations: int
    last_step: int | None
    final_metric: float | None
    best_metric: float | None
    final_loss: float | None
    error: str | None = None
    # One entry per report: step, loss and the metric (None where the report had none or diverged).
    history: list[dict] = field(default_factory=list)
