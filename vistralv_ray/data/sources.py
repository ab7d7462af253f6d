"""Source formats -> one record shape: `{"id", "image" (relative path or None), "turns"}`, plus
`image_bytes` where the source embeds the image itself (HF datasets' `{"bytes", "path"}`).

Formats: `llava` (LLaVA JSON or JSON lines), `vista` (Vista Parquet / JSON lines rows with a
conversation list and an image; `data/layouts.py` holds the conventions of each published subset),
`captions` (image + caption pairs, WIT / ShareGPT4V style, turned into one-turn "describe the image"
conversations). An input is a file, a directory of parts or a glob, local or `s3://`; parts are
read in sorted order. Reading never drops a record: a row that cannot be understood becomes a record
with an `error` (and a `reason`, `malformed_record` unless said) that `prepare` rejects and counts.
"""

from __future__ import annotations

import codecs
import json
import posixpath
import re
import unicodedata
import zlib
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vistralv_ray.data import storage
from vistralv_ray.data.demo import DESCRIBE_INSTRUCTIONS
from vistralv_ray.data.layouts import CAPTION_COLUMNS, FORMATS, RowLayout, SourceError, get_layout
from vistralv_ray.text.templates import IMAGE_TOKEN

__all__ = ["FORMATS", "SourceError", "SourceReader", "list_parts", "read_records"]

PART_SUFFIXES = (".parquet", ".json", ".jsonl", ".ndjson")
PARQUET_BATCH_ROWS = 256
_ITEM_END = re.compile(r"[ \t\n\r]*[,\]]")  # what follows an array item
# HF dataset folders name parts `<split>-00000-of-00002.parquet`; one directory may hold several splits.
_SPLIT_PREFIX = re.compile(r"^(train|validation|valid|val|test|dev)(?=[-_.])", re.IGNORECASE)


def list_parts(input_path: str | Path) -> list[str]:
    """The data files of `--input` in reading order: a file, a directory's parts or a glob's matches."""
    uri = str(input_path)
    if storage.is_glob(uri) and not storage.exists(uri):
        parts = [p for p in storage.glob(uri) if p.lower().endswith(PART_SUFFIXES)]
        if not parts:
            raise FileNotFoundError(f"--input: no {'/'.join(PART_SUFFIXES)} file matches {uri}")
        return parts
    fs, path = storage.filesystem_for(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"--input: {uri} does not exist")
    if info.type == pafs.FileType.File:
        return [uri if storage.is_s3(uri) else path]
    parts = [p for p in storage.list_dir(uri) if p.lower().endswith(PART_SUFFIXES)]
    if not parts:
        raise FileNotFoundError(f"--input: {uri} holds no {'/'.join(PART_SUFFIXES)} file (sub-folders are not read)")
    splits = sorted({m.group(1).lower() for p in parts if (m := _SPLIT_PREFIX.match(posixpath.basename(p)))})
    if len(splits) > 1:
        # Reading them all would train on the validation split without a word.
        split = "train" if "train" in splits else splits[0]
        example = storage.join(uri, f"{split}-*{posixpath.splitext(parts[0])[1]}")
        raise SourceError(f"--input: {uri} holds parts of several splits ({', '.join(splits)}); pass one: {example!r}")
    return parts


def _open_binary(uri: str):
    """A binary stream of a local file or an S3 object, read as it is consumed (S3 reads retried)."""
    if storage.is_s3(uri):
        return storage.open_stream(uri)
    return Path(uri).open("rb")


def _rows(uri: str) -> Iterator[object]:
    """Rows of a JSON array, a JSON lines file or a Parquet file, local or on S3, streamed: a row is
    yielded as soon as it is read, and only the rows not yet consumed are held. A file that cannot
    be read as a whole (not JSON, not an array, not Parquet) is a SourceError, one line."""
    suffix = posixpath.splitext(uri)[1].lower()
    if suffix == ".parquet":
        fs, path = storage.filesystem_for(uri)
        try:
            with fs.open_input_file(path) as f:
                # Small batches: rows may embed their image bytes.
                for batch in pq.ParquetFile(f).iter_batches(batch_size=PARQUET_BATCH_ROWS):
                    yield from batch.to_pylist()
        except pa.ArrowException as e:
            raise SourceError(f"{uri}: not a readable Parquet file: {e}") from None
        return
    with _open_binary(uri) as f:
        if suffix in (".jsonl", ".ndjson"):
            yield from _json_lines(_binary_lines(f))
        else:
            yield from json_array_items(f, uri)


def _binary_lines(f, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
    """Lines split on b"\\n" only (str.splitlines would also cut a line at a U+2028 inside a JSON string)."""
    rest = b""
    while chunk := f.read(chunk_bytes):
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest


def json_array_items(f, uri: str, chunk_chars: int = 1 << 20) -> Iterator[object]:
    """The items of the JSON array in binary stream `f`, decoded one by one as the text arrives
    (`json.JSONDecoder.raw_decode` on a growing window): memory holds one item and one chunk, not
    the file. SourceError (one line) for text that is not UTF-8, not JSON or not an array."""
    text = codecs.getincrementaldecoder("utf-8-sig")()  # a byte-order mark is skipped
    decoder = json.JSONDecoder()
    buf, pos, offset, eof, read = "", 0, 0, False, 0  # offset: characters dropped before buf

    def more(want: int = chunk_chars) -> bool:
        nonlocal buf, pos, offset, eof, read
        if eof:
            return False
        data = f.read(want)
        try:
            piece = text.decode(data, final=not data)
        except UnicodeDecodeError as e:
            where = read - len(text.getstate()[0]) + e.start
            raise SourceError(f"{uri}: not UTF-8 text (byte {where}); JSON input must be UTF-8") from None
        read += len(data)
        eof = not data
        offset, buf, pos = offset + pos, buf[pos:] + piece, 0
        return True

    def skip_space() -> bool:
        """Past whitespace to the next character; False at the end of the file."""
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\n\r":
                pos += 1
            if pos < len(buf) or not more():
                return pos < len(buf)

    def not_json(what: str) -> SourceError:
        return SourceError(f"{uri}: not JSON ({what} at character {offset + pos})")

    if not skip_space():
        raise not_json("an empty file")
    if buf[pos] != "[":
        while more():
            pass
        try:
            found = type(json.loads(buf[pos:])).__name__
        except RecursionError:
            raise SourceError(f"{uri}: JSON nested too deeply to read") from None
        except json.JSONDecodeError as e:
            raise SourceError(f"{uri}: not JSON ({e.msg} at character {offset + pos + e.pos})") from None
        raise SourceError(
            f"{uri}: expected a JSON array of records (LLaVA format), found a {found}; "
            "JSON lines (one record a line) need the .jsonl suffix"
        )
    pos += 1
    first = True
    while True:
        if not skip_space():
            raise not_json("the file ends inside the array")
        if buf[pos] == "]":
            pos += 1
            if skip_space():
                raise not_json("extra data after the array")
            return
        if not first:
            if buf[pos] != ",":
                raise not_json("expected ',' or ']'")
            pos += 1
            if not skip_space():
                raise not_json("the file ends inside the array")
        while True:
            try:
                item, end = decoder.raw_decode(buf, pos)
            except RecursionError:
                raise SourceError(f"{uri}: JSON nested too deeply to read") from None
            except json.JSONDecodeError as e:
                # The item goes on in the next chunk: read as much again as is held, so that an item
                # longer than a chunk is decoded a few times, not once per chunk.
                if more(max(chunk_chars, len(buf) - pos)):
                    continue
                raise SourceError(f"{uri}: not JSON ({e.msg} at character {offset + e.pos})") from None
            if not _ITEM_END.match(buf, end) and more():
                continue  # a number at the chunk's end ("1.5e") may go on in the next one
            break
        pos, first = end, False
        yield item


def _json_lines(lines) -> Iterator[object]:
    """One record per line, each decoded on its own: a line that is not UTF-8 or not JSON is one
    malformed record, and the lines after it are read as usual."""
    for line_no, raw in enumerate(lines, 1):
        if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # a UTF-8 byte-order mark
        if not raw.strip():
            continue
        try:
            yield json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            yield {"__error__": f"line {line_no} is not UTF-8 (byte {e.start})", "__line__": line_no}
        except json.JSONDecodeError as e:
            yield {"__error__": f"line {line_no} is not JSON: {e.msg}", "__line__": line_no}
        except RecursionError:
            yield {"__error__": f"line {line_no}: JSON nested too deeply", "__line__": line_no}


def _plain(value):
    """Python lists for what readers other than ours hand over: numpy arrays (pandas), pyarrow scalars."""
    if hasattr(value, "as_py"):
        return value.as_py()
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return value.tolist()
    return list(value) if isinstance(value, tuple) else value


def _first(row: dict, keys: tuple[str, ...]):
    for key in keys:
        if row.get(key) is not None:
            return _plain(row[key])
    return None


def _missing_image(rid: str, detail: str) -> dict:
    return {"id": rid, "error": detail, "reason": "missing_image"}


def _image_fields(row: dict, rid: str, layout: RowLayout) -> dict:
    """`image` (a name under the image root), `image_bytes` (embedded), or an `error`: several images
    (one image per record is what the model takes), or no image where the layout says there is one."""
    if layout.image_pattern:
        absent = [c for c in layout.pattern_columns if row.get(c) in (None, "")]
        if absent:
            return _missing_image(rid, f"--image-pattern {layout.image_pattern!r}: no value in column {absent[0]!r}")
        return {"image": layout.image_pattern.format(**{c: str(row[c]) for c in layout.pattern_columns})}
    image = _first(row, layout.image_columns)
    if isinstance(image, list):
        if len(image) > 1:
            return {"id": rid, "error": f"{len(image)} images in one record; one image per record is supported"}
        image = image[0] if image else None
    if isinstance(image, dict):  # HF datasets store images as {"path": ..., "bytes": ...}
        data, path = image.get("bytes"), image.get("path")
        if path is not None and not isinstance(path, str):
            return {"id": rid, "error": f"image path is a {type(path).__name__}, not text"}
        if data is not None and not isinstance(data, (bytes, bytearray)):
            return {"id": rid, "error": f"embedded image bytes are a {type(data).__name__}, not bytes"}
        if data:
            return {"image": path or f"{rid}.embedded", "image_bytes": bytes(data)}
        image = path
    if isinstance(image, (bytes, bytearray)):
        return {"image": f"{rid}.embedded", "image_bytes": bytes(image)}
    if image not in (None, ""):
        if not isinstance(image, str):  # a number or a mapping is not a file name: str() would invent one
            return {"id": rid, "error": f"image field is a {type(image).__name__}, not a path"}
        return {"image": image}
    # A named but empty image field is a record that lost its image, not a text-only record.
    if layout.image_required or any(k in row and row[k] is not None for k in layout.image_columns):
        columns = ", ".join(layout.image_columns)
        return _missing_image(rid, f"no image in column(s) {columns} (row has: {', '.join(map(str, row))})")
    return {"image": None}


def _placeholder_regex(placeholders: tuple[str, ...]) -> re.Pattern | None:
    # Both Unicode forms: `ả` may come precomposed or as `a` + a combining hook above.
    forms = {unicodedata.normalize(f, p) for p in placeholders for f in ("NFC", "NFD")}
    return re.compile("|".join(map(re.escape, sorted(forms))), re.IGNORECASE) if forms else None


def _replace_placeholders(turns: list, regex: re.Pattern) -> list:
    return [
        {k: regex.sub(IMAGE_TOKEN, v) if k in ("content", "value") and isinstance(v, str) else v for k, v in t.items()}
        if isinstance(t, dict)
        else t
        for t in turns
    ]


def _conversation_record(row: dict, rid: str, layout: RowLayout, placeholders: re.Pattern | None) -> dict:
    turns = _first(row, layout.conversation_columns)
    if isinstance(turns, str):  # some exports store the conversation as a JSON string
        try:
            turns = _plain(json.loads(turns))
        except json.JSONDecodeError:
            turns = None
    if not isinstance(turns, list):
        wanted, has = ", ".join(layout.conversation_columns), ", ".join(map(str, row))
        return {"id": rid, "error": f"no conversation list in column(s) {wanted} (row has: {has})"}
    if placeholders is not None:
        turns = _replace_placeholders(turns, placeholders)
    image = _image_fields(row, rid, layout)
    return {"id": rid, **image, "turns": turns} if "error" not in image else image


def _caption_record(row: dict, rid: str, layout: RowLayout) -> dict:
    caption = _first(row, CAPTION_COLUMNS)
    if not isinstance(caption, str):
        return {"id": rid, "error": "no caption field (one of: " + ", ".join(CAPTION_COLUMNS) + ")"}
    image = _image_fields(row, rid, layout)
    if "error" in image:
        return image
    # A stable, varied instruction per record: the same input always gives the same shards.
    instruction = DESCRIBE_INSTRUCTIONS[zlib.crc32(rid.encode()) % len(DESCRIBE_INSTRUCTIONS)]
    return {
        "id": rid,
        **image,
        "turns": [{"role": "user", "content": f"<image>\n{instruction}"}, {"role": "assistant", "content": caption}],
    }


class SourceReader:
    """Every row of every part as a record, in order; after reading, `records_per_part` counts them.

    A row without an id gets `row-N` (its index in its part), prefixed with the part's name when
    there are several parts, so ids stay unique across parts.
    """

    def __init__(self, input_path: str | Path, fmt: str, layout: RowLayout | None = None):
        if fmt not in FORMATS:
            raise SourceError(f"--format: unknown format {fmt!r}; allowed: {', '.join(FORMATS)}")
        self.fmt = fmt
        self.layout = layout or get_layout(fmt)
        self.parts = list_parts(input_path)
        self.records_per_part: dict[str, int] = {}

    def _labels(self) -> list[str]:
        if len(self.parts) == 1:
            return [""]
        names = [posixpath.basename(p) for p in self.parts]
        return [f"{n}:" for n in (names if len(set(names)) == len(names) else self.parts)]

    def __iter__(self) -> Iterator[dict]:
        placeholders = _placeholder_regex(self.layout.placeholders)
        wanted = set(self.layout.pattern_columns)
        seen: set[str] = set()
        columns: list[str] = []  # of the first row, to say what the input has instead
        for part, label in zip(self.parts, self._labels()):
            count = 0
            for index, row in enumerate(_rows(part)):
                count += 1
                rid = f"{label}row-{index}"
                if isinstance(row, dict) and row.get("id") not in (None, ""):
                    rid = str(row["id"])
                if not isinstance(row, dict):
                    yield {"id": rid, "error": "record is not a mapping"}
                    continue
                seen.update(wanted & row.keys())
                columns = columns or list(map(str, row))
                if "__error__" in row:
                    yield {"id": rid, "error": row["__error__"]}
                    continue
                try:
                    if self.fmt == "captions":
                        yield _caption_record(row, rid, self.layout)
                    else:
                        yield _conversation_record(row, rid, self.layout, placeholders)
                except Exception as e:  # a row shape no check above foresaw: one rejection, not a crashed run
                    yield {"id": rid, "error": f"cannot read the row: {type(e).__name__}: {e}"}
            self.records_per_part[part] = count
        if wanted - seen and columns:
            # Every record would be rejected for the same reason: that is a wrong flag, not bad data.
            raise SourceError(
                f"--image-pattern {self.layout.image_pattern!r}: column {sorted(wanted - seen)[0]!r} "
                f"is in no row of the input (its rows have: {', '.join(columns)})"
            )


def read_records(path: str | Path, fmt: str, layout: RowLayout | None = None) -> Iterator[dict]:
    """Every input row as a record; unreadable rows carry `error` instead of `turns`."""
    yield from SourceReader(path, fmt, layout)
