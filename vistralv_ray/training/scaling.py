"""The learning-rate scaling rule: effective LR = base LR x f(global batch / reference batch).

Vistral-V's lesson: LLaVA's learning rates are tuned for LLaVA's global batch; a run with another
global batch must rescale them (linear, Goyal et al. 2017; square root for Adam, Malladi et al.
2022) or its loss overshoots. Vistral-V's own LoRA run: 2e-4 x 8/128 = 1.25e-5.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from vistralv_ray.config.schema import Config

RULES = ("linear", "sqrt", "none")


def lr_multiplier(global_batch: int, reference_batch: int, rule: str) -> float:
    if global_batch < 1 or reference_batch < 1:
        raise ValueError(f"batches must be >= 1 (global {global_batch}, reference {reference_batch})")
    ratio = global_batch / reference_batch
    if rule == "linear":
        return ratio
    if rule == "sqrt":
        return math.sqrt(ratio)
    if rule == "none":
        return 1.0
    raise ValueError(f"train.lr_rule: unknown rule {rule!r}; allowed: {', '.join(RULES)}")


def scaled_learning_rate(base_lr: float, global_batch: int, reference_batch: int, rule: str) -> float:
    return base_lr * lr_multiplier(global_batch, reference_batch, rule)


@dataclass
class LrPlan:
    base_lr: float
    rule: str
    workers: int
    per_device_batch: int
    grad_accum: int
    global_batch: int
    reference_batch: int
    multiplier: float
    effective_lr: float
    projector_lr: float

    def arithmetic(self) -> str:
        f = {"linear": "x", "sqrt": "x sqrt", "none": "(no scaling)"}[self.rule]
        scale = "" if self.rule == "none" else f" {f}({self.global_batch}/{self.reference_batch})"
        return (
            f"global batch = {self.workers} workers x {self.per_device_batch} per device x {self.grad_accum} accum"
            f" = {self.global_batch}; effective LR = {self.base_lr:g}{scale} = {self.effective_lr:.6g}"
            f" ({self.rule} rule, reference batch {self.reference_batch}); projector LR {self.projector_lr:.6g}"
        )

    def to_dict(self) -> dict:
        return asdict(self)


def lr_plan(cfg: Config, workers: int | None = None) -> LrPlan:
    """The batch and LRs of the run at `workers` workers (default: scaling.workers, the planned size).

    At another size, `scaling.elastic_policy` says what changes: keep_global_batch recomputes the
    accumulation so the global batch stays the planned one (the nearest one when the worker count
    does not divide it); rescale_lr keeps the accumulation and lets the global batch follow the
    workers. Either way the LR is train.lr_rule applied to the global batch actually trained.
    """
    t, n = cfg.train, workers or cfg.scaling.workers
    accum = elastic_grad_accum(cfg, n)
    global_batch = n * cfg.data.per_device_batch * accum
    multiplier = lr_multiplier(global_batch, cfg.reference_batch, t.lr_rule)
    effective = t.base_lr * multiplier
    # In align the projector is all that trains: its LR is the effective LR itself.
    projector = effective if t.stage == "align" else effective * t.projector_lr_scale
    return LrPlan(
        base_lr=t.base_lr,
        rule=t.lr_rule,
        workers=n,
        per_device_batch=cfg.data.per_device_batch,
        grad_accum=accum,
        global_batch=global_batch,
        reference_batch=cfg.reference_batch,
        multiplier=multiplier,
        effective_lr=effective,
        projector_lr=projector,
    )


def elastic_grad_accum(cfg: Config, workers: int) -> int:
    """Gradient accumulation at `workers` workers under scaling.elastic_policy."""
    if workers == cfg.scaling.workers or cfg.scaling.elastic_policy == "rescale_lr":
        return cfg.train.grad_accum
    per_step = workers * cfg.data.per_device_batch
    # The nearest global batch to the planned one; a tie goes to the smaller (less memory-time per step).
    exact = cfg.global_batch / per_step
    low, high = max(1, math.floor(exact)), max(1, math.ceil(exact))
    return low if abs(low * per_step - cfg.global_batch) <= abs(high * per_step - cfg.global_batch) else high


def elastic_workers(cfg: Config) -> list[int]:
    """The worker counts a run may train at: min_workers..workers, or just workers for a fixed-size run."""
    s = cfg.scaling
    return list(range(s.min_workers or s.workers, s.workers + 1))


def elastic_note(cfg: Config, plan: LrPlan) -> str:
    """Why the plan at this size differs from the planned one (empty when it does not)."""
    planned = lr_plan(cfg)
    if plan.workers == planned.workers:
        return ""
    if cfg.scaling.elastic_policy == "keep_global_batch":
        if plan.global_batch == planned.global_batch:
            return f"keep_global_batch: grad accumulation {planned.grad_accum} -> {plan.grad_accum}, LR unchanged"
        return (
            f"keep_global_batch: {planned.global_batch} is not divisible by {plan.workers} x "
            f"{plan.per_device_batch}: nearest global batch {plan.global_batch} (grad accumulation "
            f"{plan.grad_accum}), LR re-derived by the {plan.rule} rule: {plan.effective_lr:.6g}"
        )
    return (
        f"rescale_lr: global batch {planned.global_batch} -> {plan.global_batch}, LR re-derived by the "
        f"{plan.rule} rule: {planned.effective_lr:.6g} -> {plan.effective_lr:.6g}"
    )


def elastic_table(cfg: Config, records: int | None = None) -> list[dict]:
    """One row per worker count the run may train at (min_workers..workers): what `plan` prints and
    what the trainer uses after a resize. Steps per epoch only when the record count is known."""
    rows = []
    for n in elastic_workers(cfg):
        p = lr_plan(cfg, n)
        row = {
            "workers": n,
            "per_device_batch": p.per_device_batch,
            "grad_accum": p.grad_accum,
            "global_batch": p.global_batch,
            "effective_lr": p.effective_lr,
            "projector_lr": p.projector_lr,
        }
        if records is not None:
            row["steps_per_epoch"] = records // p.global_batch
        row["note"] = elastic_note(cfg, p)
        rows.append(row)
    return rows
