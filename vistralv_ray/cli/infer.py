"""Inference sub-commands: `export` (Hugging Face Llava directory), `chat` and `eval` (Ray Data batch inference)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vistralv_ray.cli.options import add_ray_address
from vistralv_ray.evaluation.benchmarks import BENCHMARK_NAMES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a run's (or checkpoint's) model as a Hugging Face Llava directory")
    p.add_argument("source", help="run directory or checkpoint directory, local or s3://")
    p.add_argument("out", type=Path)
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: the training precision (bf16 for GPU runs, fp32 for CPU runs)",
    )
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists and is not empty")
    p.set_defaults(func=export)

    p = sub.add_parser("chat", help="ask a trained model about an image (streamed; interactive without --prompt)")
    p.add_argument("model", help="export directory, or a run / checkpoint (exported on the fly)")
    p.add_argument("--image", type=Path, help="image file; omit for a text-only conversation")
    p.add_argument("--prompt", help="one question; without it, an interactive multi-turn session")
    p.add_argument("--system", help="system prompt (default: the one the model was trained with)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy decoding; > 0: sampling")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:1, ...")
    p.set_defaults(func=chat)

    p = sub.add_parser("eval", help="batch inference with Ray Data: predictions.jsonl and metrics.json")
    p.add_argument("model", help="export directory, or a run / checkpoint (exported on the fly)")
    p.add_argument(
        "--benchmark",
        default="llava",
        choices=BENCHMARK_NAMES,
        help="file layout and official metrics (docs/EVAL.md); llava: our LLaVA JSON or prepared shards",
    )
    p.add_argument(
        "--data", required=True, help="the benchmark's file; for llava a LLaVA JSON file or shards (dir / s3://)"
    )
    p.add_argument("--image-root", "--images", help="image folder (default: the data file's folder, then its images/)")
    p.add_argument("--lang", default="vi", help="mtvqa: the language to evaluate (a code as in `lang`), or all")
    p.add_argument("--template", help="chat template for a model without one: vistral, plain, or a Jinja file")
    p.add_argument(
        "--blank-images", action="store_true", help="also ask every question on a blank image (llava: always)"
    )
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples of the 95%% intervals")
    p.add_argument("--out", type=Path, default=Path("eval"))
    p.add_argument("--actors", type=int, default=1, help="model replicas (one GPU each when there are GPUs)")
    p.add_argument("--cpus-per-actor", type=float)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--limit", type=int, help="evaluate only the first N records")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        help="a questions-done bar on stderr (llava: records); default: where stderr is a terminal",
    )
    add_ray_address(p)
    p.set_defaults(func=evaluate)

    p = sub.add_parser("eval-compare", help="two eval outputs of one benchmark side by side, paired bootstrap")
    p.add_argument("a", type=Path, help="eval output directory (predictions.jsonl, metrics.json)")
    p.add_argument("b", type=Path, help="eval output directory of the same benchmark")
    p.add_argument("--out", type=Path, default=Path("eval-compare"), help="where compare.md / .json / .png go")
    p.add_argument("--resamples", type=int, default=1000)
    p.set_defaults(func=eval_compare)


def export(args: argparse.Namespace) -> int:
    from vistralv_ray.inference.export import export as run

    out = run(args.source, args.out, dtype=args.dtype, overwrite=args.overwrite, max_shard_size=args.max_shard_size)
    print(f"exported to {out}")
    print(f"load it with LlavaForConditionalGeneration.from_pretrained({str(out)!r}) and AutoProcessor")
    return 0


def chat(args: argparse.Namespace) -> int:
    from vistralv_ray.inference.chat import ChatSession, load_image, run_chat
    from vistralv_ray.inference.models import load_model, model_directory

    image = load_image(args.image) if args.image is not None else None

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    with model_directory(args.model) as directory:
        session = ChatSession(load_model(directory, args.device), image=image, system=args.system)
        run_chat(
            session,
            args.prompt,
            write,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
        )
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from vistralv_ray.inference.evaluate import evaluate as run
    from vistralv_ray.inference.models import model_directory

    if args.benchmark != "llava":
        return evaluate_benchmark(args)
    with model_directory(args.model) as directory:
        metrics = run(
            directory,
            args.data,
            args.out,
            image_root=args.image_root,
            actors=args.actors,
            cpus_per_actor=args.cpus_per_actor,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            limit=args.limit,
            progress=args.progress,
        )
    print(json.dumps(metrics, indent=1, ensure_ascii=False))
    print(f"predictions: {args.out / 'predictions.jsonl'}\nmetrics:     {args.out / 'metrics.json'}")
    return 0


def evaluate_benchmark(args: argparse.Namespace) -> int:
    from vistralv_ray.evaluation.runner import run_benchmark
    from vistralv_ray.inference.models import model_directory

    with model_directory(args.model) as directory:
        metrics = run_benchmark(
            directory,
            args.benchmark,
            args.data,
            args.out,
            images=args.image_root,
            lang=args.lang,
            template=args.template,
            blank_images=args.blank_images,
            actors=args.actors,
            cpus_per_actor=args.cpus_per_actor,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            limit=args.limit,
            resamples=args.resamples,
            progress=args.progress,
        )
    intervals = metrics.get("ci95", {})
    for name, value in metrics.items():
        if name in intervals and isinstance(value, float):
            lo, hi = intervals[name] or (float("nan"), float("nan"))
            print(f"{name:32s} {value:8.4f}   95% CI [{lo:.4f}, {hi:.4f}]")
    print(f"questions: {metrics['questions']}, rejected: {metrics['rejected']}")
    print(f"predictions: {args.out / 'predictions.jsonl'}\nmetrics:     {args.out / 'metrics.json'}")
    return 0


def eval_compare(args: argparse.Namespace) -> int:
    from vistralv_ray.evaluation.compare import compare

    _, table = compare(args.a, args.b, args.out, args.resamples)
    print(table)
    print(f"written: {args.out / 'compare.md'}, {args.out / 'compare.png'}")
    return 0
