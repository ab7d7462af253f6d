"""Training sub-commands: `train` (a Ray Train + DeepSpeed run) and `plan` (batch, LR and memory)."""

from __future__ import annotations

import argparse
import json

from vistralv_ray.cli.options import add_ray_address


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train (or resume) a run: Ray Data -> TorchTrainer workers with DeepSpeed ZeRO")
    p.add_argument("config", help="run config YAML (e.g. jobs/finetune.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    add_ray_address(p)
    p.set_defaults(func=train)
    register_plan(sub)


def train(args: argparse.Namespace) -> int:
    from vistralv_ray.config import load_config
    from vistralv_ray.training.driver import train as run

    cfg = load_config(args.config, args.overrides)
    result = run(cfg)
    print(summarize(result))
    return 0 if result.error is None else 1


def summarize(result) -> str:
    final = (result.return_value or {}).get("final", {}) if isinstance(result.return_value, dict) else {}
    keep = ("step", "loss", "eval_loss", "eval_perplexity", "samples_per_s", "tokens_per_s", "rejected_records")
    summary = {k: final[k] for k in keep if k in final}
    lines = [f"run directory: {result.path}"]
    if result.checkpoint is not None:
        lines.append(f"latest checkpoint: {result.checkpoint.path}")
    if result.error is not None:
        lines.append(f"error: {result.error}")
    lines.append("final: " + json.dumps(summary))
    return "\n".join(lines)


def register_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="print global batch, effective LR and per-GPU memory under ZeRO 2 / 3 / offload")
    p.add_argument("config", help="run config YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--workers", type=int)
    p.add_argument("--per-device-batch", type=int)
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--base-lr", type=float)
    p.add_argument("--reference-batch", type=int)
    p.add_argument("--lr-rule", choices=["linear", "sqrt", "none"])
    p.add_argument("--gpu-memory-gb", type=float, default=80.0)
    p.set_defaults(func=plan)


def plan(args: argparse.Namespace) -> int:
    from vistralv_ray.config import load_config
    from vistralv_ray.training.memory import estimate, model_sizes, recommend
    from vistralv_ray.training.scaling import lr_plan

    flags = {
        "scaling.workers": args.workers,
        "data.per_device_batch": args.per_device_batch,
        "train.grad_accum": args.grad_accum,
        "train.base_lr": args.base_lr,
        "train.reference_batch": args.reference_batch,
        "train.lr_rule": args.lr_rule,
    }
    overrides = args.overrides + [f"{k}={v}" for k, v in flags.items() if v is not None]
    cfg = load_config(args.config, overrides)
    lr = lr_plan(cfg)
    print(
        f"global_batch={lr.global_batch} ({lr.workers} workers x {lr.per_device_batch} per device x "
        f"{lr.grad_accum} accumulation)"
    )
    print(f"reference_batch={lr.reference_batch} lr_rule={lr.rule} multiplier={lr.multiplier:.6g}")
    print(f"effective_lr={lr.effective_lr:.6g}")
    print(f"projector_lr={lr.projector_lr:.6g}")
    sizes = model_sizes(cfg)
    if sizes.lora:
        what = "LoRA adapters + projector"
    else:
        what = "projector" if cfg.train.stage == "align" else "projector + LM"
    print(f"parameters: {sizes.total / 1e9:.3f}B total, {sizes.trainable / 1e6:.1f}M trainable ({what})")
    est = estimate(cfg, sizes, cfg.scaling.workers)
    tokens = cfg.data.per_device_batch * cfg.model.max_length
    print(
        f"memory per GPU (estimate; {tokens} tokens per micro-batch, gradient checkpointing "
        f"{'on' if cfg.train.gradient_checkpointing else 'off'}):"
    )
    print(f"  zero2          {est['zero2']:7.1f} GB")
    print(f"  zero3          {est['zero3']:7.1f} GB")
    print(f"  zero3_offload  {est['zero3_offload']:7.1f} GB")
    print(f"recommendation: {recommend(est, args.gpu_memory_gb)}")
    return 0
