"""Data sub-commands: `prepare` (sources -> validated Parquet shards, local or S3)."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="convert LLaVA / Vista / caption data into validated Parquet shards")
    p.add_argument("--format", dest="fmt", required=True, choices=["llava", "vista", "captions"])
    p.add_argument("--input", required=True, help="JSON, JSON lines or Parquet file")
    p.add_argument("--image-root", default=None, help="directory (or s3:// prefix) the image paths are relative to")
    p.add_argument("--out", required=True, help="output directory or s3://bucket/prefix (must not hold shards yet)")
    p.add_argument("--shard-size", type=int, default=2000, help="records per shard (default 2000)")
    p.add_argument("--max-image-pixels", type=int, default=None, help="reject larger images (decompression bombs)")
    p.add_argument("--strict", action="store_true", help="stop with an error at the first bad record")
    p.add_argument(
        "--config", default=None, help="run config: also reject sequences over its model.max_length (tokenized)"
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--serial", action="store_true", help="build shards in this process instead of Ray tasks")
    p.set_defaults(func=prepare)


def prepare(args: argparse.Namespace) -> int:
    from vistralv_ray.data.images import DEFAULT_MAX_PIXELS
    from vistralv_ray.data.prepare import PrepareOptions
    from vistralv_ray.data.prepare import prepare as run

    model = None
    max_pixels = args.max_image_pixels or DEFAULT_MAX_PIXELS
    if args.config or args.overrides:
        from vistralv_ray.config import load_config

        cfg = load_config(args.config, args.overrides)
        model = cfg.model
        max_pixels = args.max_image_pixels or cfg.data.max_image_pixels
    opts = PrepareOptions(
        image_root=args.image_root,
        out=args.out,
        shard_size=args.shard_size,
        max_pixels=max_pixels,
        strict=args.strict,
        model=model,
        fmt=args.fmt,
    )
    manifest = run(args.input, opts, parallel=False if args.serial else None)
    summary = {k: manifest[k] for k in ("records_in", "records_out", "rejected")}
    summary["shards"] = len(manifest["shards"])
    print(json.dumps(summary, ensure_ascii=False))
    print(f"shards, manifest.json and rejected.jsonl in {args.out}")
    return 0
