"""Training sub-commands: `train` (a Ray Train + DeepSpeed run) and `plan` (batch, LR and memory)."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train (or resume) a run: Ray Data -> TorchTrainer workers with DeepSpeed ZeRO")
    p.add_argument("config", help="run config YAML (e.g. jobs/finetune.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=train)


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
