"""`prepare`: source records -> validated Parquet shards with image bytes, a manifest and rejections.

Every input record ends up either in a shard or in `rejected.jsonl` with its reason; the manifest
counts both. Shards are built by Ray tasks when there is more than one (one task per shard).

The output is complete or absent: `--out` must be new or empty, every file is written whole
(`storage.write_bytes`), the manifest is written last (training refuses a shard folder without one),
and a run that fails (a storage fault, `--strict`, too many rejections, an interrupt) removes what it
wrote. A record never crashes the run: whatever is wrong with it is a rejection with a reason.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import posixpath
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from vistralv_ray.config.schema import DEFAULT_MAX_MESSAGE_CHARS, DEFAULT_MAX_RECORD_CHARS, ModelConfig
from vistralv_ray.data import storage
from vistralv_ray.data.images import DEFAULT_MAX_PIXELS, StoredPixels, normalise_encoding, verify_image
from vistralv_ray.data.layouts import get_layout
from vistralv_ray.data.sources import SourceReader
from vistralv_ray.errors import RecordError, StorageError
from vistralv_ray.logging import get_logger
from vistralv_ray.ray_runtime import init_ray
from vistralv_ray.text.conversation import normalize_messages

log = get_logger(__name__)

# Rows per Parquet row group: the unit the training pipeline reads and shuffles (`data/shards.py`). An
# actor holds data.shuffle_row_groups of them at once (16 x 64 rows, ~100 MB of images at ~100 KB each):
# small groups let those rows come from many places of the corpus.
SHARD_ROW_GROUP_ROWS = 64
SHARD_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.binary()),
        ("image_name", pa.string()),
        ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
    ]
)
MANIFEST = storage.SHARD_MANIFEST
REJECTED = "rejected.jsonl"
# What `prepare` writes into --out (and the temporary names it writes them under): what a failed run removes.
_OUTPUT_NAME = re.compile(r"^\.?(part-\d{5}\.parquet|rejected\.jsonl|manifest\.json)(\.tmp-[0-9a-f]+)?$")
# Larger image files are rejected (image_too_large) before they are decoded or copied into a shard.
DEFAULT_MAX_IMAGE_BYTES = 32 << 20
# The rejected fraction is judged once this many records are done (or all, if fewer): a few bad
# records at the start of a good corpus must not stop it.
MIN_RECORDS_BEFORE_STOPPING = 200


class TooManyRejections(RuntimeError):
    """More records rejected than --max-rejected-fraction allows: nearly always a wrong flag."""


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
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    # Stop (and remove the output) once more than this fraction of records is rejected. None: never
    # (library callers with deliberately messy corpora); the command line sets 0.5 unless told.
    max_rejected_fraction: float | None = None
    # `--store-pixels`: each image stored as the model sees it (`decode_to_pixels` once, here, instead
    # of every epoch); None keeps the original bytes.
    pixels: StoredPixels | None = None
    # A record with a longer message (characters), or longer messages in all, is text_too_long.
    max_message_chars: int = DEFAULT_MAX_MESSAGE_CHARS
    max_record_chars: int = DEFAULT_MAX_RECORD_CHARS


# Chunks (shards of `shard_size` records) read ahead of the tasks building them, at most.
MAX_CHUNKS_IN_FLIGHT = 64


@dataclass
class ShardResult:
    name: str | None
    records: int
    rejected: list[dict] = field(default_factory=list)
    with_image: int = 0


def resolve_image_path(image_root: str | None, name: str) -> str:
    """The image's path or URI under `image_root`; a name that escapes the root is rejected."""
    _check_text(name, "image name")
    if "\x00" in name:  # the OS refuses it (ValueError), S3 would take it as another key
        raise RecordError("malformed_record", f"image name {name!r:.80} holds a NUL byte")
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


def read_image(image_root: str | None, name: str, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> bytes:
    """The image file's bytes. A missing file (S3: a 404) is the record's `missing_image`; storage
    that cannot be used (StorageError: denied, unreachable after retries) stops the run instead."""
    path = resolve_image_path(image_root, name)
    try:
        if storage.is_s3(path):
            data = storage.read_bytes(path)
        else:
            size = os.stat(path).st_size  # before reading: a 10 GB file is never read into memory
            if size > max_bytes:
                raise RecordError("image_too_large", f"image {name!r} is {size:,} bytes > {max_bytes:,}")
            data = Path(path).read_bytes()
    except FileNotFoundError as e:
        raise RecordError("missing_image", f"image {name!r} not found") from e
    except OSError as e:
        raise RecordError("unreadable_image", f"cannot read image {name!r}: {e}") from e
    if len(data) > max_bytes:
        raise RecordError("image_too_large", f"image {name!r} is {len(data):,} bytes > {max_bytes:,}")
    return data


def _check_text(value: str, what: str) -> None:
    """Text Parquet and JSON can hold: a lone surrogate (JSON's "\\ud800") cannot be written as UTF-8."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RecordError("malformed_record", f"{what} is not valid Unicode ({e.reason} at {e.start})") from None


def validate_record(record: dict, opts: PrepareOptions, encoder=None) -> dict:
    """A shard row for `record`, or RecordError (with the record id) saying why not."""
    rid = record["id"]
    try:
        if "error" in record:
            raise RecordError(record.get("reason", "malformed_record"), record["error"])
        _check_text(rid, "id")
        name = record.get("image")
        messages = normalize_messages(record["turns"], name is not None, opts.max_message_chars, opts.max_record_chars)
        for i, message in enumerate(messages):
            _check_text(message["content"], f"turn {i}")
        image = None
        if name is not None:
            data = record.get("image_bytes")
            if data:
                _check_text(name, "image name")
                if len(data) > opts.max_image_bytes:
                    raise RecordError(
                        "image_too_large", f"embedded image is {len(data):,} bytes > {opts.max_image_bytes:,}"
                    )
            else:
                data = read_image(opts.image_root, name, opts.max_image_bytes)
            if opts.pixels is not None:  # a full decode, which checks the image as verify_image does
                image = opts.pixels.store(data, opts.max_pixels)
            else:
                fmt, _, _ = verify_image(data, opts.max_pixels)
                image = normalise_encoding(data, fmt)
        if encoder is not None:
            encoder.encode(messages)
        return {"id": rid, "image": image, "image_name": name, "messages": messages}
    except RecordError as e:
        raise e.with_id(rid) from None
    except (StorageError, MemoryError):
        raise
    except Exception as e:  # a record shape no check foresaw: rejected and reported, never a crashed run
        raise RecordError("malformed_record", f"unexpected {type(e).__name__}: {e}"[:500], rid) from e


def build_encoder(model_cfg: ModelConfig):
    from vistralv_ray.text.encoder import build_encoder as build

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


def _counted(records, ids: Counter) -> Iterator[dict]:
    for record in records:
        ids[str(record.get("id"))] += 1
        yield record


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
    existing = storage.list_tree(opts.out)
    if existing:
        # Files of an interrupted run (or anything else) would be mistaken for, or mixed into, this output.
        raise FileExistsError(
            f"--out: {opts.out} is not empty ({len(existing)} file(s), e.g. {existing[0]}); "
            "prepare writes only into a new or empty directory"
        )
    if opts.shard_size < 1:
        raise ValueError("--shard-size must be >= 1")
    if opts.max_rejected_fraction is not None and not 0 <= opts.max_rejected_fraction <= 1:
        raise ValueError("--max-rejected-fraction must be between 0 and 1")
    created = not storage.is_s3(opts.out) and not Path(opts.out).expanduser().exists()
    try:
        return _prepare(input_path, opts, parallel, progress)
    except BaseException:
        try:
            _remove_outputs(opts.out, created)
        except Exception as e:  # storage gone: what is left has no manifest, so nothing reads it as complete
            log.warning("could not remove the partial output in %s: %s", opts.out, e)
        raise


def _prepare(input_path: str | Path, opts: PrepareOptions, parallel: bool | None, progress: bool) -> dict:
    started = time.time()
    layout = get_layout(opts.fmt, opts.subset, opts.image_pattern, opts.image_column, opts.conversation_column)
    reader = SourceReader(input_path, opts.fmt, layout)
    # Streamed: the input is read as shards are built, and only the shards being built are held.
    ids: Counter = Counter()  # of every record read: records_in, and the duplicate ids
    chunks = _chunks(_counted(reader, ids), opts.shard_size)
    head = list(itertools.islice(chunks, 2))
    if parallel is None:
        parallel = len(head) > 1
    if parallel:
        results = _run_parallel(itertools.chain(head, chunks), opts, progress)
    else:
        results = []
        for i, chunk in enumerate(itertools.chain(head, chunks)):
            results.append(build_shard(chunk, i, opts))
            _check_rejections(results, None, opts)
    records_in = ids.total()
    _check_rejections(results, records_in, opts)  # a corpus of fewer records than it takes to judge earlier
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
        "duplicate_ids": _duplicate_ids(ids),
        "shards": shards,
        "max_image_pixels": opts.max_pixels,
        "max_message_chars": opts.max_message_chars,
        "max_record_chars": opts.max_record_chars,
        "max_length_checked": opts.model.max_length if opts.model else None,
        # Images as the model sees them (`--store-pixels`), or null: the original bytes. Training
        # refuses stored pixels of another size, aspect or pad colour than its model's (preflight).
        "pixels": opts.pixels.to_manifest() if opts.pixels else None,
        "seconds": round(time.time() - started, 2),
    }
    manifest["warnings"] = _warnings(manifest)
    for warning in manifest["warnings"]:
        log.warning("%s", warning)
    assert manifest["records_out"] + len(rejected) == records_in, "a record went missing"
    # backslashreplace: an id holding a lone surrogate is written as JSON's own "\\udXXX" escape.
    storage.write_bytes(
        storage.join(opts.out, REJECTED),
        "".join(_json_line(r) for r in rejected).encode("utf-8", "backslashreplace"),
    )
    # Last: its presence is what says the shards are all there (storage.list_parquet).
    text = json.dumps(manifest, indent=1, ensure_ascii=False)
    storage.write_bytes(storage.join(opts.out, MANIFEST), text.encode("utf-8", "backslashreplace"))
    return manifest


def _json_line(obj: dict) -> str:
    # U+2028/U+2029 are legal in JSON strings, but Python's splitlines (and JavaScript) end a line there.
    return json.dumps(obj, ensure_ascii=False).replace("\u2028", "\\u2028").replace("\u2029", "\\u2029") + "\n"


def _check_rejections(results: list[ShardResult], records_in: int | None, opts: PrepareOptions) -> None:
    """TooManyRejections once the rejected fraction of the records done so far passes the limit
    (`records_in`: all the input's records, once they are all read)."""
    if opts.max_rejected_fraction is None:
        return
    done = sum(r.records + len(r.rejected) for r in results)
    rejected = [x for r in results for x in r.rejected]
    judged_at = MIN_RECORDS_BEFORE_STOPPING if records_in is None else min(records_in, MIN_RECORDS_BEFORE_STOPPING)
    if done < judged_at or len(rejected) <= opts.max_rejected_fraction * done:
        return
    reasons = ", ".join(f"{k}: {n}" for k, n in Counter(x["reason"] for x in rejected).most_common(3))
    raise TooManyRejections(
        f"{len(rejected)} of {done} records rejected ({reasons}), more than --max-rejected-fraction "
        f"{opts.max_rejected_fraction}; e.g. {rejected[0]['detail']!r:.200}. Is --image-root ({opts.image_root}) "
        "the folder the image paths are relative to? Nothing was written"
    )


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


def _duplicate_ids(counts: Counter) -> dict:
    """Ids that several input records share (LLaVA's finetune JSON: one image, several conversations).
    Not an error: training keys its records by shard row, so each is still trained once an epoch."""
    repeated = {rid: n for rid, n in counts.items() if n > 1}
    return {
        "ids": len(repeated),
        "records": sum(repeated.values()),
        "examples": sorted(repeated, key=lambda rid: (-repeated[rid], rid))[:10],
    }


def chunks_in_flight(cpus: float) -> int:
    """How many chunks `prepare` reads ahead of its tasks: two per CPU, at least 2, at most MAX_CHUNKS_IN_FLIGHT."""
    return min(MAX_CHUNKS_IN_FLIGHT, max(2, 2 * int(cpus)))


def _run_parallel(chunks: Iterator[list[dict]], opts: PrepareOptions, progress: bool) -> list[ShardResult]:
    """One Ray task per chunk, submitted as the input is read: at most two per CPU in flight, and
    never more than MAX_CHUNKS_IN_FLIGHT (on a large cluster two per CPU would be the whole corpus
    held in the driver and the object store at once)."""
    import ray
    from tqdm import tqdm

    init_ray(what="prepare", include_dashboard=False)
    task = ray.remote(num_cpus=1)(build_shard)
    in_flight = chunks_in_flight(ray.cluster_resources().get("CPU", 1))
    pending: dict = {}
    sizes: dict[int, int] = {}
    results: dict[int, ShardResult] = {}
    numbered = enumerate(chunks)
    with tqdm(unit="rec", desc="prepare", disable=not progress) as bar:
        try:
            while True:
                for i, chunk in itertools.islice(numbered, in_flight - len(pending)):
                    pending[task.remote(chunk, i, opts)] = i
                    sizes[i] = len(chunk)
                if not pending:
                    break
                done, _ = ray.wait(list(pending), num_returns=1)
                index = pending.pop(done[0])
                try:
                    results[index] = ray.get(done[0])
                except ray.exceptions.RayTaskError as e:
                    known = (RecordError, StorageError)
                    raise (e.cause if isinstance(e.cause, known) else e) from None
                bar.update(sizes[index])
                _check_rejections(list(results.values()), None, opts)
        except BaseException:
            # The caller removes the output: no task may still be writing into it by then.
            for ref in pending:
                ray.cancel(ref)
            ray.wait(list(pending), num_returns=len(pending), timeout=60)
            raise
    return [results[i] for i in range(len(results))]


def _remove_outputs(out: str, created: bool) -> None:
    """Remove what a failed run wrote into `out` (it was new or empty: anything of ours is this run's)."""
    for uri in storage.list_tree(out):
        if _OUTPUT_NAME.match(posixpath.basename(uri)):
            storage.delete_file(uri)
    if created:
        try:
            os.rmdir(Path(out).expanduser())  # only if empty: never a folder holding anything else
        except OSError:
            pass
