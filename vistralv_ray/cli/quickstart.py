"""`vistralv-ray quickstart`: the README's main job on the embedded default (tiny model, demo corpus).

demo data -> tiny model -> align -> finetune -> export -> eval, on CPU or one GPU, on an embedded
`ray.init()`. Every step writes under --workdir and prints where its output is.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quickstart", help="run the local demo end to end on the tiny model (CPU or one GPU)")
    p.add_argument("--workdir", type=Path, default=Path("quickstart"))
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vistralv_ray.data.demo import make_demo_corpus
    from vistralv_ray.model.tiny import make_tiny

    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    print(f"[1] demo corpus   -> {work / 'data'}")
    make_demo_corpus(work / "data", seed=args.seed)
    print(f"[2] tiny model    -> {work / 'tiny'}")
    make_tiny(work / "tiny", seed=args.seed)
    return 0
