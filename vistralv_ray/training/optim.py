"""Optimizer parameter groups by name pattern and the warmup + decay schedule.

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
    """Multiplier of each group's LR at an optimizer step (LambdaLR)."""
    total_steps = max(1, total_steps)

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def warmup_steps_for(total_steps: int, warmup_ratio: float) -> int:
    return math.ceil(total_steps * warmup_ratio) if warmup_ratio > 0 else 0
