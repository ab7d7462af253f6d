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


def lr_plan(cfg: Config) -> LrPlan:
    t = cfg.train
    multiplier = lr_multiplier(cfg.global_batch, cfg.reference_batch, t.lr_rule)
    effective = t.base_lr * multiplier
    # In align the projector is all that trains: its LR is the effective LR itself.
    projector = effective if t.stage == "align" else effective * t.projector_lr_scale
    return LrPlan(
        base_lr=t.base_lr,
        rule=t.lr_rule,
        workers=cfg.scaling.workers,
        per_device_batch=cfg.data.per_device_batch,
        grad_accum=t.grad_accum,
        global_batch=cfg.global_batch,
        reference_batch=cfg.reference_batch,
        multiplier=multiplier,
        effective_lr=effective,
        projector_lr=projector,
    )
