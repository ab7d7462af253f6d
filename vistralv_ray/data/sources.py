"""Source formats -> one record shape: `{"id", "image" (relative path or None), "turns"}`, plus
`image_bytes` where the source embeds the image itself (HF datasets' `{"bytes", "path"}`).

Formats: `llava` (LLaVA JSON or JSON lines), `vista` (Vista-style Parquet / JSON lines rows with a
conversation list and an image file name), `captions` (image + caption pairs, WIT / ShareGPT4V
style, turned into one-turn "describe the image" conversations). Reading never drops a record: a
row that cannot be understood becomes a record with an `error` (and a `reason`, `malformed_record`
unless said) that `prepare` rejects and counts.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq

from vistralv_ray.data.demo import DESCRIBE_INSTRUCTIONS

FORMATS = ("llava", "vista", "captions")

_CONVERSATION_KEYS = ("conversations", "conversation", "messages")
_IMAGE_KEYS = ("image", "image_name", "file_name", "image_path", "image_file")
_CAPTION_KEYS = ("caption", "text", "caption_reference_description", "caption_attribution_description")


def _rows(path: Path) -> Iterator[object]:
    """Rows of a JSON array, a JSON lines file or a Parquet file."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            yield from batch.to_pylist()
        return
    if suffix in (".jsonl", ".ndjson"):
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    yield {"__error__": f"line {line_no} is not JSON: {e.msg}", "__line__": line_no}
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON array of records (LLaVA format)")
    yield from data


def _first(row: dict, keys: tuple[str, ...]):
    for key in keys:
        if row.get(key) is not None:
            return row[key]
    return None


def _record_id(row: object, index: int) -> str:
    if isinstance(row, dict) and row.get("id") not in (None, ""):
        return str(row["id"])
    return f"row-{index}"


def _image_fields(row: dict, rid: str) -> dict:
    """`image` (a name under the image root), `image_bytes` (embedded), or an `error` for a record
    with several images (one image per record is what the model takes)."""
    image = _first(row, _IMAGE_KEYS)
    if isinstance(image, list):
        if len(image) > 1:
            return {"id": rid, "error": f"{len(image)} images in one record; one image per record is supported"}
        image = image[0] if image else None
    if isinstance(image, dict):  # HF datasets store images as {"path": ..., "bytes": ...}
        data = image.get("bytes")
        if data:
            return {"image": str(image.get("path") or f"{rid}.embedded"), "image_bytes": bytes(data)}
        image = image.get("path")
    if isinstance(image, (bytes, bytearray)):
        return {"image": f"{rid}.embedded", "image_bytes": bytes(image)}
    return {"image": None if image in (None, "") else str(image)}


def _caption_record(row: dict, rid: str) -> dict:
    caption = _first(row, _CAPTION_KEYS)
    if not isinstance(caption, str):
        return {"id": rid, "error": "no caption field (one of: " + ", ".join(_CAPTION_KEYS) + ")"}
    image = _image_fields(row, rid)
    if "error" in image:
        return image
    if image["image"] is None:
        return {"id": rid, "error": f"no image field (one of: {', '.join(_IMAGE_KEYS)})", "reason": "missing_image"}
    # A stable, varied instruction per record: the same input always gives the same shards.
    instruction = DESCRIBE_INSTRUCTIONS[zlib.crc32(rid.encode()) % len(DESCRIBE_INSTRUCTIONS)]
    return {
        "id": rid,
        **image,
        "turns": [{"role": "user", "content": f"<image>\n{instruction}"}, {"role": "assistant", "content": caption}],
    }


def read_records(path: str | Path, fmt: str) -> Iterator[dict]:
    """Every input row as a record; unreadable rows carry `error` instead of `turns`."""
    if fmt not in FORMATS:
        raise ValueError(f"--format: unknown format {fmt!r}; allowed: {', '.join(FORMATS)}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--input: {path} does not exist")
    for index, row in enumerate(_rows(path)):
        rid = _record_id(row, index)
        if not isinstance(row, dict):
            yield {"id": rid, "error": "record is not a mapping"}
        elif "__error__" in row:
            yield {"id": rid, "error": row["__error__"]}
        elif fmt == "captions":
            yield _caption_record(row, rid)
        else:
            turns = _first(row, _CONVERSATION_KEYS)
            if isinstance(turns, str):  # some exports store the conversation as a JSON string
                try:
                    turns = json.loads(turns)
                except json.JSONDecodeError:
                    turns = None
            if not isinstance(turns, list):
                yield {"id": rid, "error": "no conversation list (one of: " + ", ".join(_CONVERSATION_KEYS) + ")"}
                continue
            image = _image_fields(row, rid)
            yield {"id": rid, **image, "turns": turns} if "error" not in image else image
