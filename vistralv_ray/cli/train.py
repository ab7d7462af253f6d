"""Training sub-commands: `train` (a Ray Train + DeepSpeed run) and `plan` (batch, LR and memory)."""

from __future__ import annotations

import argparse
import json
import sys

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
    final = (result.return_value or {}).get("final", {}) if isinstance(result.return_value, dict) else {}
    if final.get("diverged"):
        # A job runner (ray job submit, CI) must see a diverged run as failed, not as done.
        print(f"error: run diverged at step {final.get('step')} (loss {final.get('loss')})", file=sys.stderr)
        return 1
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
    p.add_argument("--records", type=int, help="training records, for steps per epoch (elastic table)")
    p.add_argument("--json", action="store_true", help="print the whole plan as one JSON object")
    p.set_defaults(func=plan)


def plan(args: argparse.Namespace) -> int:
    from vistralv_ray.config import load_config

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
    result = build_plan(cfg, args.gpu_memory_gb, args.records)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(format_plan(result))
    return 0


def build_plan(cfg, gpu_memory_gb: float = 80.0, records: int | None = None) -> dict:
    """Batch, LRs, model size and memory of a run; with scaling.min_workers, the elastic table: one row
    per worker count, with the memory per GPU at that count under the configured ZeRO stage."""
    from vistralv_ray.model.assembly import resolve_attn_implementation
    from vistralv_ray.training.memory import estimate, model_sizes, recommend
    from vistralv_ray.training.scaling import elastic_table, lr_plan

    lr = lr_plan(cfg)
    sizes = model_sizes(cfg)
    if sizes.lora:
        what = "LoRA adapters + projector"
    else:
        what = "projector" if cfg.train.stage == "align" else "projector + LM"
    est = estimate(cfg, sizes, cfg.scaling.workers)
    out = {
        **lr.to_dict(),
        "parameters": {"total": sizes.total, "trainable": sizes.trainable, "trainable_what": what},
        "memory_gb": {
            "tokens_per_micro_batch": cfg.data.per_device_batch * cfg.model.max_length,
            "gradient_checkpointing": cfg.train.gradient_checkpointing,
            "attention": resolve_attn_implementation(cfg.model.attn_implementation, True),
            **est,
        },
        "recommendation": recommend(est, gpu_memory_gb),
    }
    if records is not None:
        out["records"] = records
        out["steps_per_epoch"] = records // lr.global_batch
    if cfg.scaling.min_workers is not None:
        zero = f"zero{cfg.train.zero_stage}" + ("_offload" if cfg.train.offload_params else "")
        rows = elastic_table(cfg, records)
        for row in rows:
            row["memory_gb"] = estimate(cfg, sizes, row["workers"])[zero]
        out["elastic"] = rows
        out["elastic_policy"] = cfg.scaling.elastic_policy
        out["elastic_memory_for"] = zero
    return out


def format_plan(p: dict) -> str:
    lines = [
        f"global_batch={p['global_batch']} ({p['workers']} workers x {p['per_device_batch']} per device x "
        f"{p['grad_accum']} accumulation)",
        f"reference_batch={p['reference_batch']} lr_rule={p['rule']} multiplier={p['multiplier']:.6g}",
        f"effective_lr={p['effective_lr']:.6g}",
        f"projector_lr={p['projector_lr']:.6g}",
    ]
    if "steps_per_epoch" in p:
        lines.append(f"steps_per_epoch={p['steps_per_epoch']} ({p['records']} records)")
    n, m = p["parameters"], p["memory_gb"]
    lines.append(
        f"parameters: {n['total'] / 1e9:.3f}B total, {n['trainable'] / 1e6:.1f}M trainable ({n['trainable_what']})"
    )
    lines.append(
        f"memory per GPU (estimate; {m['tokens_per_micro_batch']} tokens per micro-batch, gradient checkpointing "
        f"{'on' if m['gradient_checkpointing'] else 'off'}, attention {m['attention']}):"
    )
    for key in ("zero2", "zero3", "zero3_offload"):
        lines.append(f"  {key:<14} {m[key]:7.1f} GB")
    lines.append(f"recommendation: {p['recommendation']}")
    if "elastic" in p:
        rows = p["elastic"]
        steps = "steps_per_epoch" in rows[0]
        lines.append(f"elastic ({p['elastic_policy']}; memory per GPU under {p['elastic_memory_for']}):")
        header = f"  {'workers':>7} {'global_batch':>12} {'grad_accum':>10} {'effective_lr':>12} {'projector_lr':>12}"
        header += f" {'steps/epoch':>11}" if steps else ""
        lines.append(header + f" {'memory_gb':>9}  note")
        for r in rows:
            line = (
                f"  {r['workers']:>7} {r['global_batch']:>12} {r['grad_accum']:>10} {r['effective_lr']:>12.6g}"
                f" {r['projector_lr']:>12.6g}"
            )
            line += f" {r['steps_per_epoch']:>11}" if steps else ""
            lines.append(line + f" {r['memory_gb']:>9.1f}  {r['note'] or 'as planned'}")
    return "\n".join(lines)
