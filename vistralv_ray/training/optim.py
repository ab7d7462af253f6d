"""Optimizer parameter groups by name pattern and the warmup + decay schedule.

The schedule runs over samples seen, not optimizer steps: when an elastic run changes its global
batch (`scaling.elastic_policy=rescale_lr`), a step covers another number of samples, and a
schedule over steps would move its warmup and decay relative to the data.

Groups: the projector (its own LR in finetune) and the rest, each split into decayed weights and
undecayed biases and norms. A pattern that matches no trainable parameter is an error: a silent
miss would train the projector at the wrong LR.
"""

from __future__ import annotations

import math
import re

import torch

PROJECTOR_PATTERN = r"multi_modal_projector\."
NO_DECAY_PATTERN = r"(\.bias$|norm\.weight$|norm\.bias$|layernorm|\.norm\.)"


def build_param_groups(model: torch.nn.Module, lr: float, projector_lr: float, weight_decay: float) -> list[dict]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("no trainable parameters: check train.stage and model.lora")
    for pattern in (PROJECTOR_PATTERN, NO_DECAY_PATTERN):
        if not any(re.search(pattern, n) for n, _ in named):
            raise ValueError(f"parameter-group pattern {pattern!r} matches no trainable parameter")
    buckets: dict[tuple[bool, bool], list] = {}
    for name, param in named:
        key = (bool(re.search(PROJECTOR_PATTERN, name)), bool(re.search(NO_DECAY_PATTERN, name)))
        buckets.setdefault(key, []).append((name, param))
    groups = []
    for (is_projector, no_decay), items in sorted(buckets.items()):
        groups.append(
            {
                "name": ("projector" if is_projector else "model") + ("_no_decay" if no_decay else ""),
                "params": [p for _, p in items],
                "param_names": [n for n, _ in items],
                "lr": projector_lr if is_projector else lr,
                "weight_decay": 0.0 if no_decay else weight_decay,
            }
        )
    return groups


def lr_lambda(total_steps: int, warmup_steps: int, schedule: str):
    """Multiplier of each group's LR at an optimizer step (LambdaLR): the sample schedule counted in
    steps, one "sample" a step."""
    total_steps = max(1, total_steps)
    return lambda step: sample_lr_factor(step, 1, total_steps, warmup_steps, schedule)


def warmup_steps_for(total_steps: int, warmup_ratio: float) -> int:
    return math.ceil(total_steps * warmup_ratio) if warmup_ratio > 0 else 0


def sample_lr_factor(samples_seen: int, step_samples: int, total_samples: int, warmup_samples: int, schedule: str):
    """Multiplier of each group's LR for the optimizer step that trains samples
    `samples_seen .. samples_seen + step_samples` of the run's `total_samples`.

    With a fixed global batch B this is `lr_lambda(total_samples / B, warmup_samples / B, ...)` at
    step `samples_seen / B`: a fixed-size run keeps the schedule it had when it counted steps.
    """
    if warmup_samples > 0 and samples_seen < warmup_samples:
        return min(1.0, (samples_seen + step_samples) / warmup_samples)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (samples_seen - warmup_samples) / max(1, total_samples - warmup_samples))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class SampleSchedule:
    """Sets the optimizer's group LRs from the samples seen (see `sample_lr_factor`).

    Not handed to DeepSpeed: the position is the trainer's sample count, which the checkpoint keeps,
    so nothing of it needs saving and a restart at another size continues where the data is.
    """

    def __init__(self, optimizer, base_lrs: list[float], total_samples: int, warmup_samples: int, schedule: str):
        self.optimizer = optimizer
        self.base_lrs = list(base_lrs)
        self.total_samples, self.warmup_samples, self.schedule = total_samples, warmup_samples, schedule
        self.last_lrs = list(base_lrs)

    def set_position(self, samples_seen: int, step_samples: int) -> None:
        """The LRs of the next optimizer step."""
        f = sample_lr_factor(samples_seen, step_samples, self.total_samples, self.warmup_samples, self.schedule)
        self.last_lrs = [base * f for base in self.base_lrs]
        # Read the groups anew every time: loading a checkpoint replaces the optimizer's group dicts.
        for group, lr in zip(self.optimizer.param_groups, self.last_lrs, strict=True):
            group["lr"] = lr

    def get_last_lr(self) -> list[float]:
        return list(self.last_lrs)
