"""Training metrics: FLOPs and MFU counted right for frozen parts, and where metrics go.

FLOPs per token of a linear layer with N weights: forward 2N; backward 2N for the input gradient
plus 2N for the weight gradient. A trained language model costs 6N per token, a frozen one that
still back-propagates to the projector 4N, and the frozen vision tower a forward pass only (2N per
patch). Attention adds 2 x 2 x L x d x l per token of a sample of length l (causal: half), times 3
with the backward pass.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

# Dense bf16 peak, FLOP/s (REFERENCE.md).
PEAK_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12}


def peak_flops_per_device(on_gpu: bool) -> float | None:
    if not on_gpu or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_FLOPS.items():
        if key in name:
            return value
    return None


@dataclass
class FlopModel:
    lm_params: int  # language model incl. embeddings output head
    lm_trainable: bool  # full finetune: weight gradients for the LM
    lora_params: int
    vision_params: int
    projector_params: int
    layers: int
    hidden: int
    image_tokens: int

    @classmethod
    def of(cls, model: torch.nn.Module) -> FlopModel:
        from vistralv_ray.model.assembly import llava_of

        base = llava_of(model)
        inner = base.model
        lm = list(inner.language_model.parameters()) + list(base.lm_head.parameters())
        lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        # Embedding lookups cost no FLOPs; the output head does.
        embed = inner.language_model.get_input_embeddings().weight.numel()
        text = base.config.text_config
        return cls(
            lm_params=sum(p.numel() for p in lm) - lora - embed,
            lm_trainable=all(p.requires_grad for p in inner.language_model.parameters()),
            lora_params=lora,
            vision_params=sum(p.numel() for p in inner.vision_tower.parameters()),
            projector_params=sum(p.numel() for p in inner.multi_modal_projector.parameters()),
            layers=text.num_hidden_layers,
            hidden=text.hidden_size,
            image_tokens=base.config.image_seq_length,
        )

    def step_flops(self, tokens: int, sum_sq_lengths: int, images: int) -> float:
        lm_factor = 6 if self.lm_trainable else 4
        flops = lm_factor * self.lm_params * tokens
        flops += 6 * self.lora_params * tokens
        flops += 3 * 2 * self.layers * self.hidden * sum_sq_lengths  # causal attention, fwd + bwd
        patches = images * self.image_tokens
        flops += 2 * self.vision_params * patches + 6 * self.projector_params * patches
        return float(flops)


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss / 2**20


class StepTimer:
    """Splits wall time into waiting for data and computing."""

    def __init__(self):
        self.data_wait = 0.0
        self.started = time.perf_counter()

    def waited(self, seconds: float) -> None:
        self.data_wait += seconds

    def reset(self) -> tuple[float, float]:
        now = time.perf_counter()
        elapsed, wait = now - self.started, self.data_wait
        self.started, self.data_wait = now, 0.0
        return elapsed, wait


class DashboardMetrics:
    """`ray.util.metrics` gauges and counters, shown on the Ray dashboard / Prometheus as ray_vistralv_*."""

    GAUGES = ("loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "mfu", "data_wait_fraction", "memory_mb")
    # Elastic runs: the size the group trains at now, and what the last resize cost.
    GAUGES += ("world_size", "global_batch", "effective_lr", "samples_seen", "resize_s")

    def __init__(self, run_name: str):
        from ray.util.metrics import Counter, Gauge

        tags = ("run",)
        self.tags = {"run": run_name}
        self.gauges = {k: Gauge(f"vistralv_{k}", description=f"vistralv-ray {k}", tag_keys=tags) for k in self.GAUGES}
        self.steps = Counter("vistralv_steps", description="optimizer steps", tag_keys=tags)
        self.tokens = Counter("vistralv_tokens", description="non-padding tokens trained on", tag_keys=tags)

    def record(self, metrics: dict, steps: int, tokens: int) -> None:
        for key, gauge in self.gauges.items():
            value = metrics.get(key)
            if value is not None:
                gauge.set(float(value), tags=self.tags)
        self.steps.inc(steps, tags=self.tags)
        self.tokens.inc(tokens, tags=self.tags)
