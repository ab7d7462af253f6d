"""`prepare`: source records -> validated Parquet shards with image bytes, a manifest and rejections.

Every input record ends up either in a shard or in `rejected.jsonl` with its reason; the manifest
counts both. Shards are built by Ray tasks when there is more than one (one task per shard).
"""

from __future__ import annotations

import io
import json
import posixpath
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from vistralv_ray.config.schema import ModelConfig
from vistralv_ray.data import storage
from vistralv_ray.data.images import DEFAULT_MAX_PIXELS, normalise_encoding, verify_image
from vistralv_ray.data.layouts import get_layout
from vistralv_ray.data.sources import SourceReader
from vistralv_ray.errors import RecordError
from vistralv_ray.logging import get_logger
from vistralv_ray.ray_runtime import init_ray
from vistralv_ray.text.conversation import normalize_messages

log = get_logger(__name__)

# Rows per Parquet row group: the preprocessing actors read a shard one row group at a time, so this,
# not the shard size, bounds what a shard costs them in memory (~25 MB of images at ~100 KB each).
SHARD_ROW_GROUP_ROWS = 256
SHARD_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.binary()),
        ("image_name", pa.string()),
        ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
    ]
)
MANIFEST = "manifest.json"
REJECTED = "rejected.jsonl"


@dataclass
class PrepareOptions:
    image_root: str | None
    out: str
    shard_size: int = 2000
    max_pixels: int = DEFAULT_MAX_PIXELS
    strict: bool = False
    # When set, sequences are tokenized to reject those over max_length once image tokens expand.
    model: ModelConfig | None = None
    fmt: str = "llava"
    # Where the rows keep conversation and image (data/layouts.py): a Vista subset preset, then flags.
    subset: str | None = None
    image_pattern: str | None = None
    image_column: str | None = None
    conversation_column: str | None = None
    # The stage the corpus is for, when the format does not say (captions and align subsets do).
    stage: str | None = None


@dataclass
class ShardResult:
    name: str | None
    records: int
    rejected: list[dict] = field(default_factory=list)
    with_image: int = 0


def resolve_image_path(image_root: str | None, name: str) -> str:
    """The image's path or URI under `image_root`; a name that escapes the root is rejected."""
    if image_root is None:
        raise RecordError("missing_image", f"record names image {name!r} but no --image-root was given")
    if name.startswith(("/", "\\")) or "://" in name or (len(name) > 1 and name[1] == ":"):
        raise RecordError("image_outside_root", f"absolute image path {name!r}")
    normal = posixpath.normpath(name.replace("\\", "/"))
    if normal == ".." or normal.startswith("../"):
        raise RecordError("image_outside_root", f"image path {name!r} escapes the image root")
    if storage.is_s3(image_root):
        return storage.join(image_root, normal)
    root = Path(image_root).expanduser().resolve()
    path = (root / normal).resolve()  # resolves symlinks too: a link out of the root is outside it
    if not path.is_relative_to(root):
        raise RecordError("image_outside_root", f"image path {name!r} resolves outside the image root")
    return str(path)


def read_image(image_root: str | None, name: str) -> bytes:
    path = resolve_image_path(image_root, name)
    try:
        if storage.is_s3(path):
            return storage.read_bytes(path)
        return Path(path).read_bytes()
    except FileNotFoundError as e:
        raise RecordError("missing_image", f"image {name!r} not found") from e
    except OSError as e:
        raise RecordError("unreadable_image", f"cannot read image {name!r}: {e}") from e


def validate_record(record: dict, opts: PrepareOptions, encoder=None) -> dict:
    """A shard row for `record`, or RecordError (with the record id) saying why not."""
    rid = record["id"]
    try:
        if "error" in record:
            raise RecordError(record.get("reason", "malformed_record"), record["error"])
        name = record.get("image")
        messages = normalize_messages(record["turns"], has_image=name is not None)
        image = None
        if name is not None:
            data = record.get("image_bytes") or read_image(opts.image_root, name)
            fmt, _, _ = verify_image(data, opts.max_pixels)
            image = normalise_encoding(data, fmt)
        if encoder is not None:
            encoder.encode(messages)
        return {"id": rid, "image": image, "image_name": name, "messages": messages}
    except RecordError as e:
        raise e.with_id(rid) from None


def build_encoder(model_cfg: ModelConfig):
    from vistralv_ray.model.assembly import build_encoder as build

    return build(model_cfg)


def build_shard(records: list[dict], index: int, opts: PrepareOptions) -> ShardResult:
    """Validate `records` and write shard `index` (nothing is written when every record fails)."""
    encoder = build_encoder(opts.model) if opts.model is not None else None
    rows, rejected = [], []
    for record in records:
        try:
            rows.append(validate_record(record, opts, encoder))
        except RecordError as e:
            if opts.strict:
                raise
            rejected.append({"id": e.record_id, "reason": e.reason, "detail": e.detail})
    with_image = sum(row["image"] is not None for row in rows)
    if not rows:
        return ShardResult(None, 0, rejected)
    name = f"part-{index:05d}.parquet"
    table = pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=SHARD_ROW_GROUP_ROWS)
    storage.write_bytes(storage.join(opts.out, name), buf.getvalue())
    return ShardResult(name, len(rows), rejected, with_image)


def _chunks(records, size):
    chunk = []
    for record in records:
        chunk.append(record)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def prepare(input_path: str | Path, opts: PrepareOptions, parallel: bool | None = None, progress: bool = True) -> dict:
    """Convert `input_path` into shards under `opts.out`; returns the manifest."""
    if storage.exists(storage.join(opts.out, MANIFEST)):
        raise FileExistsError(f"--out: {opts.out} already holds prepared shards ({MANIFEST}); choose a new directory")
    if opts.shard_size < 1:
        raise ValueError("--shard-size must be >= 1")
    started = time.time()
    layout = get_layout(opts.fmt, opts.subset, opts.image_pattern, opts.image_column, opts.conversation_column)
    reader = SourceReader(input_path, opts.fmt, layout)
    chunks = list(_chunks(reader, opts.shard_size))
    records_in = sum(len(c) for c in chunks)
    if parallel is None:
        parallel = len(chunks) > 1
    if parallel:
        results = _run_parallel(chunks, opts, progress)
    else:
        results = []
        try:
            for i, chunk in enumerate(chunks):
                results.append(build_shard(chunk, i, opts))
        except RecordError:
            _remove_shards(opts.out, results)
            raise
    rejected = [r for res in results for r in res.rejected]
    shards = [{"name": r.name, "records": r.records} for r in results if r.name]
    records_out = sum(s["records"] for s in shards)
    with_image = sum(r.with_image for r in results)
    stage = opts.stage or layout.stage
    manifest = {
        "format": opts.fmt,
        "subset": opts.subset,
        "image_pattern": layout.image_pattern,
        "stage": stage,
        "input": str(input_path),
        "parts": [{"path": p, "records": reader.records_per_part[p]} for p in reader.parts],
        "image_root": opts.image_root,
        "records_in": records_in,
        "records_out": records_out,
        "records_with_image": with_image,
        "records_text_only": records_out - with_image,
        "rejected": dict(sorted(Counter(r["reason"] for r in rejected).items())),
        "shards": shards,
        "max_image_pixels": opts.max_pixels,
        "max_length_checked": opts.model.max_length if opts.model else None,
        "seconds": round(time.time() - started, 2),
    }
    manifest["warnings"] = _warnings(manifest)
    for warning in manifest["warnings"]:
        log.warning("%s", warning)
    assert manifest["records_out"] + len(rejected) == records_in, "a record went missing"
    storage.write_bytes(
        storage.join(opts.out, REJECTED),
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejected).encode(),
    )
    storage.write_bytes(storage.join(opts.out, MANIFEST), json.dumps(manifest, indent=1, ensure_ascii=False).encode())
    return manifest


def _warnings(manifest: dict) -> list[str]:
    """What a person should look at before training on these shards."""
    warnings = []
    if manifest["stage"] == "align" and manifest["records_text_only"]:
        # Alignment trains the projector on images only: a text-only record teaches it nothing.
        warnings.append(
            f"{manifest['records_text_only']} of {manifest['records_out']} records of this align corpus have no image"
        )
    missing = manifest["rejected"].get("missing_image", 0)
    if missing * 2 > manifest["records_in"]:
        warnings.append(
            f"{missing} of {manifest['records_in']} records were rejected for a missing image: "
            f"is --image-root ({manifest['image_root']}) the folder their paths are relative to?"
        )
    return warnings


def _run_parallel(chunks: list[list[dict]], opts: PrepareOptions, progress: bool) -> list[ShardResult]:
    import ray
    from tqdm import tqdm

    init_ray(what="prepare", include_dashboard=False)
    task = ray.remote(num_cpus=1)(build_shard)
    pending = {task.remote(chunk, i, opts): i for i, chunk in enumerate(chunks)}
    results: dict[int, ShardResult] = {}
    with tqdm(total=sum(len(c) for c in chunks), unit="rec", desc="prepare", disable=not progress) as bar:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            index = pending.pop(done[0])
            try:
                results[index] = ray.get(done[0])
            except ray.exceptions.RayTaskError as e:
                for ref in pending:
                    ray.cancel(ref)
                _remove_shards(opts.out, results.values())
                raise (e.cause if isinstance(e.cause, RecordError) else e) from None
            bar.update(len(chunks[index]))
    return [results[i] for i in range(len(chunks))]


def _remove_shards(out: str, results) -> None:
    for res in results:
        if res.name:
            storage.delete_file(storage.join(out, res.name))
