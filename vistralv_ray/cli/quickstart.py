"""`vistralv-ray quickstart`: the README's main job on the embedded default (tiny model, demo corpus).

demo data -> tiny model -> shards -> align -> finetune (projector from align) -> export -> eval, on
the CPU or one GPU, on an embedded `ray.init()`. Everything lands under --workdir; a rerun reuses
what is there (data, shards, finished runs) and resumes an interrupted run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from vistralv_ray.cli.options import add_ray_address
from vistralv_ray.config import Config, config_from_dict

DEMO_SYSTEM_PROMPT = "Trợ lý trả lời ngắn gọn."


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quickstart", help="run the local demo end to end on the tiny model (CPU or one GPU)")
    p.add_argument("--workdir", type=Path, default=Path("quickstart"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-images", type=int, default=1500, help="demo images for finetune (and align)")
    p.add_argument("--eval-images", type=int, default=100)
    p.add_argument("--align-epochs", type=int, default=1)
    p.add_argument("--finetune-epochs", type=int, default=4)
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (GPUs when the machine has them)")
    add_ray_address(p)
    p.set_defaults(func=run)


def demo_configs(work: Path, args: argparse.Namespace) -> tuple[Config, Config]:
    """The two runs of the demo. The LR arithmetic is the real one: base LRs are stated for a reference
    batch of 32 and rescaled linearly to the run's global batch."""
    tiny, shards, runs = work / "tiny", work / "shards", work / "runs"
    common_model = {
        "language_model": str(tiny / "llm"),
        "vision_tower": str(tiny / "vision"),
        "max_length": 256,
    }
    common_data = {"per_device_batch": 16, "preprocess_cpus_per_actor": 0.5, "map_batch_size": 64}
    common_train = {"lr_rule": "linear", "reference_batch": 32, "log_every": 20, "warmup_ratio": 0.05}
    run = {"storage": str(runs), "wandb": "off"}
    scaling = {"workers": args.workers, "cpus_per_worker": 1.0}
    align = config_from_dict(
        {
            "model": {**common_model, "template": "plain", "aspect": "resize"},
            "data": {**common_data, "train": [str(shards / "align")]},
            "train": {
                **common_train,
                "stage": "align",
                "epochs": args.align_epochs,
                "base_lr": 4e-3,
                "checkpoint_every": 10_000,
                "seed": args.seed,
            },
            "scaling": scaling,
            "run": {**run, "name": "quickstart-align"},
        }
    )
    finetune = config_from_dict(
        {
            "model": {
                **common_model,
                "template": "vistral",
                # Vistral-V's system prompt is ~40 tokens for the tiny tokenizer, a third of each
                # demo sequence; a short one keeps the CPU demo fast. Real recipes keep the original.
                "system_prompt": DEMO_SYSTEM_PROMPT,
                "aspect": "pad",
                "init_projector_from": "quickstart-align",  # a run name under run.storage
            },
            "data": {**common_data, "train": [str(shards / "train")], "eval": [str(shards / "eval")]},
            "train": {
                **common_train,
                "stage": "finetune",
                "epochs": args.finetune_epochs,
                "base_lr": 4e-3,
                "zero_stage": 2,
                "checkpoint_every": 10_000,
                "eval_every": None,  # once, at the end: each eval pass starts its own pipeline
                "seed": args.seed,
            },
            "scaling": scaling,
            "run": {**run, "name": "quickstart-finetune"},
        }
    )
    return align, finetune


def prepare_data(work: Path, args: argparse.Namespace) -> dict[str, str]:
    from vistralv_ray.data.demo import make_demo_corpus
    from vistralv_ray.data.prepare import MANIFEST, PrepareOptions, prepare
    from vistralv_ray.model.tiny import make_tiny

    data = work / "data"
    if not (data / "eval.json").is_file():
        make_demo_corpus(data, train_images=args.train_images, eval_images=args.eval_images, seed=args.seed)
    if not (work / "tiny" / "llm" / "config.json").is_file():
        make_tiny(work / "tiny", seed=args.seed)
    out = {}
    for name in ("align", "train", "eval"):
        target = work / "shards" / name
        if not (target / MANIFEST).is_file():
            opts = PrepareOptions(image_root=str(data / "images"), out=str(target), shard_size=500, fmt="llava")
            manifest = prepare(data / f"{name}.json", opts, parallel=False, progress=False)
            if manifest["records_out"] != manifest["records_in"]:
                print(f"    {name}: {manifest['records_in'] - manifest['records_out']} records rejected, see {target}")
        out[name] = str(target)
    return out


def train_stage(cfg: Config) -> dict:
    from vistralv_ray.training.driver import train

    result = train(cfg)
    if result.error is not None:
        raise RuntimeError(f"run {cfg.run_name} failed: {result.error}")
    value = result.return_value if isinstance(result.return_value, dict) else {}
    final = value.get("final", {})
    if final.get("diverged"):
        # Nothing after a diverged stage is worth running: no export of a model whose loss is NaN/inf.
        raise RuntimeError(f"run {cfg.run_name} diverged at step {final.get('step')} (loss {final.get('loss')})")
    return {"path": result.path, "final": final}


def run(args: argparse.Namespace) -> int:
    import os

    if not _has_gpu():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    work: Path = args.workdir.expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    align_cfg, finetune_cfg = demo_configs(work, args)

    print(f"[1/5] demo corpus, tiny model, shards -> {work / 'data'}, {work / 'tiny'}, {work / 'shards'}", flush=True)
    prepare_data(work, args)

    print(f"[2/5] align: projector only, captions -> {work / 'runs' / align_cfg.run_name}", flush=True)
    align = train_stage(align_cfg)
    print(f"      train loss {align['final'].get('loss', float('nan')):.4f}", flush=True)

    print(f"[3/5] finetune: projector + language model, Q&A -> {work / 'runs' / finetune_cfg.run_name}", flush=True)
    finetune = train_stage(finetune_cfg)
    final = finetune["final"]
    print(
        f"      train loss {final.get('loss', float('nan')):.4f}, eval loss {final.get('eval_loss', float('nan')):.4f}"
    )

    from vistralv_ray.inference.evaluate import evaluate
    from vistralv_ray.inference.export import export

    print(f"[4/5] export (Hugging Face Llava) -> {work / 'export'}", flush=True)
    # The export is this command's own output: a rerun replaces it.
    export(finetune["path"], work / "export", overwrite=True)

    print(f"[5/5] eval on the held-out questions, real and blank images -> {work / 'eval'}", flush=True)
    metrics = evaluate(work / "export", str(work / "data" / "eval.json"), work / "eval", max_new_tokens=12)

    summary = {
        "workdir": str(work),
        "data": str(work / "data"),
        "align_run": align["path"],
        "finetune_run": finetune["path"],
        "export": str(work / "export"),
        "eval": str(work / "eval"),
        "eval_loss": metrics["loss"],
        "eval_perplexity": metrics["perplexity"],
        "accuracy": metrics["accuracy"],
        "blank_image_accuracy": metrics["blank_image_accuracy"],
        "seconds": round(time.time() - started, 1),
    }
    (work / "quickstart.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    print(
        f"final eval loss {metrics['loss']:.4f}; accuracy {metrics['accuracy']:.2f} with the images, "
        f"{metrics['blank_image_accuracy']:.2f} with blank images"
    )
    print(f"try it: vistralv-ray chat {work / 'export'} --image {work / 'data' / 'images' / 'eval_00000.jpg'}")
    return 0


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False
