"""Sub-commands that write local assets: `make-tiny` (tiny model + tokenizer) and `demo-data`."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-tiny", help="write a tiny random Mistral LM, SigLIP tower and Vietnamese tokenizer")
    p.add_argument("out", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.set_defaults(func=make_tiny)

    p = sub.add_parser("demo-data", help="write the generated Vietnamese image-text demo corpus (LLaVA JSON)")
    p.add_argument("out", type=Path)
    p.add_argument("--train-images", type=int, default=600)
    p.add_argument("--eval-images", type=int, default=100)
    p.add_argument("--align-images", type=int, default=None, help="default: as many as train")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=demo_data)


def make_tiny(args: argparse.Namespace) -> int:
    from vistralv_ray.model.tiny import make_tiny as write

    paths = write(args.out, seed=args.seed, vocab_size=args.vocab_size)
    print(f"language model + tokenizer: {paths['llm']}")
    print(f"vision tower:               {paths['vision']}")
    return 0


def demo_data(args: argparse.Namespace) -> int:
    from vistralv_ray.data.demo import make_demo_corpus

    paths = make_demo_corpus(
        args.out,
        train_images=args.train_images,
        eval_images=args.eval_images,
        align_images=args.align_images,
        image_size=args.image_size,
        seed=args.seed,
    )
    for key in ("align", "train", "eval", "images"):
        print(f"{key + ':':8} {paths[key]}")
    return 0
