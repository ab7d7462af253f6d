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


# What the training workers export through `ray.util.metrics`. Prometheus sees each as
# `ray_vistralv_<name>` (counters with `_total`); cluster/grafana/vistralv-ray.json charts them.
# Every series carries Ray Train's own run-name label, so one dashboard variable filters ours and
# Ray Train's `ray_train_*` metrics alike.
RUN_TAG = "ray_train_run_name"
RANK_TAG = "ray_train_worker_world_rank"
REASON_TAG = "reason"
METRIC_TAG = "metric"
BENCH_PREFIX = "bench/"  # the benchmark step's metrics in a report (training/benchmark.py)
# name: (kind, description, tag keys beyond the run's)
EXPORTED_METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "loss": ("gauge", "training loss, mean over the last report's steps", ()),
    "eval_loss": ("gauge", "eval loss per target token", ()),
    "lr": ("gauge", "learning rate of the language model (align: the projector's)", ()),
    "projector_lr": ("gauge", "learning rate of the projector", ()),
    "grad_norm": ("gauge", "global gradient norm", ()),
    "samples_per_s": ("gauge", "samples per second, all ranks", ()),
    "tokens_per_s": ("gauge", "non-padding tokens per second, all ranks", ()),
    "tflops_per_device": ("gauge", "model TFLOP/s per device", ()),
    "mfu": ("gauge", "model FLOPs utilisation (GPUs of known peak only)", ()),
    "data_wait_fraction": ("gauge", "share of this rank's wall time spent waiting for a batch", (RANK_TAG,)),
    "memory_mb": ("gauge", "this rank's peak device memory (CPU: resident memory), MiB", (RANK_TAG,)),
    "rejected_records": ("gauge", "records rejected in preprocessing so far in this attempt", ()),
    "rejected_records_by_reason": ("gauge", "records rejected in preprocessing, by reason", (REASON_TAG,)),
    # Elastic runs: the size the group trains at now, and what the last resize cost.
    "world_size": ("gauge", "Ray Train workers the run trains with now", ()),
    "global_batch": ("gauge", "samples per optimizer step", ()),
    "effective_lr": ("gauge", "peak LR after the scaling rule", ()),
    "samples_seen": ("gauge", "records consumed (the data position the schedule follows)", ()),
    "resize_s": ("gauge", "seconds the last resize cost (restart to first step)", ()),
    "resizes": ("counter", "resizes of the worker group", ()),
    "steps": ("counter", "optimizer steps", ()),
    "tokens": ("counter", "non-padding tokens trained on", ()),
    # train.benchmark: the benchmark subset's scores, one series per metric (bench/<metric> in a report).
    "benchmark": ("gauge", "the benchmark step's score on its subset (train.benchmark), by metric", (METRIC_TAG,)),
}
# Gauges set from the report's metrics dict under the same key.
_FROM_REPORT = [
    k for k, (kind, _, tags) in EXPORTED_METRICS.items() if kind == "gauge" and not {REASON_TAG, METRIC_TAG} & set(tags)
]


def prometheus_names() -> set[str]:
    """The names Prometheus scrapes for EXPORTED_METRICS (Ray adds `ray_`, OpenTelemetry `_total`)."""
    return {f"ray_vistralv_{k}{'_total' if kind == 'counter' else ''}" for k, (kind, _, _) in EXPORTED_METRICS.items()}


class DashboardMetrics:
    """`ray.util.metrics` gauges and counters of EXPORTED_METRICS, on the Ray dashboard and Prometheus.

    Every rank records its own data wait and memory (tagged with its rank); rank 0, whose report
    holds the run's all-reduced values, records the rest.
    """

    def __init__(self, run_name: str, rank: int = 0):
        from ray.util.metrics import Counter, Gauge

        self.rank = rank
        self.tags = {RUN_TAG: run_name}
        self.rank_tags = {RUN_TAG: run_name, RANK_TAG: str(rank)}
        self.metrics = {
            name: (Gauge if kind == "gauge" else Counter)(
                f"vistralv_{name}", description=description, tag_keys=(RUN_TAG, *extra)
            )
            for name, (kind, description, extra) in EXPORTED_METRICS.items()
        }

    def record(self, metrics: dict, steps: int, tokens: int) -> None:
        for key in _FROM_REPORT:
            value = metrics.get(key)
            per_rank = RANK_TAG in EXPORTED_METRICS[key][2]
            if value is None or not (per_rank or self.rank == 0):
                continue
            self.metrics[key].set(float(value), tags=self.rank_tags if per_rank else self.tags)
        if self.rank != 0:
            return
        for key, value in metrics.items():
            if key.startswith("rejected_") and key != "rejected_records":
                reason = key.removeprefix("rejected_")
                self.metrics["rejected_records_by_reason"].set(float(value), tags={**self.tags, REASON_TAG: reason})
            elif key.startswith(BENCH_PREFIX):
                metric = key.removeprefix(BENCH_PREFIX)
                self.metrics["benchmark"].set(float(value), tags={**self.tags, METRIC_TAG: metric})
        if "resize_s" in metrics:  # reported once, in the first report after a resize
            self.metrics["resizes"].inc(1, tags=self.tags)
        if steps:
            self.metrics["steps"].inc(steps, tags=self.tags)
        if tokens:
            self.metrics["tokens"].inc(tokens, tags=self.tags)
