"""Data sub-commands: `prepare` (sources -> validated Parquet shards, local or S3)."""

from __future__ import annotations

import argparse
import json
import sys

from vistralv_ray.cli.options import add_ray_address
from vistralv_ray.data.layouts import FORMATS, STAGES, VISTA_SUBSETS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="convert LLaVA / Vista / caption data into validated Parquet shards")
    p.add_argument("--format", dest="fmt", required=True, choices=FORMATS)
    p.add_argument(
        "--subset",
        default=None,
        choices=list(VISTA_SUBSETS),
        help="with --format vista: a published Vista subset's columns, image source and placeholder",
    )
    p.add_argument(
        "--input",
        required=True,
        help="a JSON, JSON lines or Parquet file, a directory of such parts, or a quoted glob; local or s3://",
    )
    p.add_argument("--image-root", default=None, help="directory (or s3:// prefix) the image paths are relative to")
    p.add_argument(
        "--image-pattern",
        default=None,
        help="image path made from columns, e.g. 'wit/images/{id}.jpg'; a record without them is missing_image",
    )
    p.add_argument("--image-column", default=None, help="the column naming (or holding) the image")
    p.add_argument("--conversation-column", default=None, help="the column holding the conversation")
    p.add_argument(
        "--stage", default=None, choices=STAGES, help="the stage the corpus is for (align: warn on text-only records)"
    )
    p.add_argument("--out", required=True, help="output directory or s3://bucket/prefix (must not hold shards yet)")
    p.add_argument("--shard-size", type=int, default=2000, help="records per shard (default 2000)")
    p.add_argument(
        "--max-image-pixels",
        type=int,
        default=None,
        metavar="N",
        help="reject images of more pixels (default: the config's data.max_image_pixels, 25,000,000)",
    )
    p.add_argument(
        "--max-message-chars",
        type=int,
        default=None,
        metavar="N",
        help="reject records with a longer message (default: data.max_message_chars, 32,768)",
    )
    p.add_argument(
        "--max-record-chars",
        type=int,
        default=None,
        metavar="N",
        help="reject records whose messages are longer in all (default: data.max_record_chars, 131,072)",
    )
    p.add_argument(
        "--max-image-bytes", type=int, default=None, help="reject larger image files (default 32 MiB)", metavar="N"
    )
    p.add_argument("--strict", action="store_true", help="stop with an error at the first bad record")
    p.add_argument(
        "--max-rejected-fraction",
        type=float,
        default=0.5,
        metavar="F",
        help="stop, writing nothing, once more than this fraction of records is rejected: that nearly always "
        "means a wrong --image-root or --format (default 0.5; 1 never stops)",
    )
    p.add_argument(
        "--config", default=None, help="run config: also reject sequences over its model.max_length (tokenized)"
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--store-pixels",
        action="store_true",
        help="store each image as the config's model sees it (model.image_size, model.aspect, its tower's "
        "mean as pad colour; lossless), so training does not resize it every epoch; needs --config or --set",
    )
    p.add_argument("--serial", action="store_true", help="build shards in this process instead of Ray tasks")
    add_ray_address(p)
    p.set_defaults(func=prepare)


def prepare(args: argparse.Namespace) -> int:
    from vistralv_ray.config.schema import DataConfig
    from vistralv_ray.data.layouts import SourceError, get_layout
    from vistralv_ray.data.prepare import DEFAULT_MAX_IMAGE_BYTES, PrepareOptions, TooManyRejections
    from vistralv_ray.data.prepare import prepare as run
    from vistralv_ray.errors import StorageError

    layout_flags = (args.subset, args.image_pattern, args.image_column, args.conversation_column)
    try:
        get_layout(args.fmt, *layout_flags)  # a wrong flag fails before a config or model is loaded
    except SourceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model = None
    data_cfg = DataConfig()
    if args.store_pixels and not (args.config or args.overrides):
        message = "--store-pixels stores images at one model's size: give its --config (or --set model.*)"
        print(f"error: {message}", file=sys.stderr)
        return 2
    pixels = None
    if args.config or args.overrides:
        from vistralv_ray.config import load_config
        from vistralv_ray.data.images import pixels_for_model

        cfg = load_config(args.config, args.overrides)
        model, data_cfg = cfg.model, cfg.data
        pixels = pixels_for_model(model) if args.store_pixels else None
    opts = PrepareOptions(
        image_root=args.image_root,
        out=args.out,
        shard_size=args.shard_size,
        max_pixels=args.max_image_pixels or data_cfg.max_image_pixels,
        strict=args.strict,
        model=model,
        fmt=args.fmt,
        subset=args.subset,
        image_pattern=args.image_pattern,
        image_column=args.image_column,
        conversation_column=args.conversation_column,
        stage=args.stage,
        max_image_bytes=args.max_image_bytes or DEFAULT_MAX_IMAGE_BYTES,
        max_rejected_fraction=args.max_rejected_fraction,
        pixels=pixels,
        max_message_chars=args.max_message_chars or data_cfg.max_message_chars,
        max_record_chars=args.max_record_chars or data_cfg.max_record_chars,
    )
    for flag, value in (("--max-message-chars", opts.max_message_chars), ("--max-record-chars", opts.max_record_chars)):
        if value < 1:
            print(f"error: {flag} must be >= 1", file=sys.stderr)
            return 2
    try:
        manifest = run(args.input, opts, parallel=False if args.serial else None)
    except (SourceError, ValueError) as e:  # ValueError: an option out of range, or --strict's RecordError
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (StorageError, TooManyRejections) as e:
        # The storage cannot be used, or the input does not fit the flags: nothing was written.
        print(f"error: {e}", file=sys.stderr)
        return 1
    keys = ("records_in", "records_out", "records_with_image", "records_text_only", "rejected")
    summary = {k: manifest[k] for k in keys}
    summary["parts"] = len(manifest["parts"])
    summary["shards"] = len(manifest["shards"])
    print(json.dumps(summary, ensure_ascii=False))  # prepare has logged its warnings (also in the manifest)
    print(f"shards, manifest.json and rejected.jsonl in {args.out}")
    return 0
