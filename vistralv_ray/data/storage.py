"""Local paths and `s3://` URIs behind one interface (pyarrow filesystems; s3fs underneath for S3).

Credentials, region and endpoint come from the standard AWS environment variables or profile;
`AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` point at MinIO, moto or another S3-compatible store.
"""

from __future__ import annotations

import fnmatch
import glob as globlib
import os
import re
from functools import lru_cache
from pathlib import Path

import pyarrow.fs as pafs


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def s3fs_options() -> dict:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}


@lru_cache(maxsize=4)
def _s3_filesystem(endpoint_key: str) -> pafs.FileSystem:
    import s3fs

    return pafs.PyFileSystem(pafs.FSSpecHandler(s3fs.S3FileSystem(**s3fs_options())))


def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path within it) for a local path or an s3:// URI."""
    if is_s3(uri):
        return _s3_filesystem(str(s3fs_options())), uri[len("s3://") :].rstrip("/")
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def exists(uri: str) -> bool:
    fs, path = filesystem_for(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem_for(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = filesystem_for(uri)
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def delete_file(uri: str) -> None:
    fs, path = filesystem_for(uri)
    fs.delete_file(path)


def list_parquet(uris: list[str]) -> list[str]:
    """Expand directories (and their manifests' shard lists) into Parquet file URIs, sorted."""
    out: list[str] = []
    for uri in uris:
        fs, path = filesystem_for(uri)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"data path {uri} does not exist")
        if info.type == pafs.FileType.File:
            out.append(uri)
            continue
        selector = pafs.FileSelector(path, recursive=True)
        files = sorted(i.path for i in fs.get_file_info(selector) if i.path.endswith(".parquet"))
        if not files:
            raise FileNotFoundError(f"data path {uri} holds no .parquet shards")
        prefix = "s3://" if is_s3(uri) else ""
        out += [prefix + f for f in files]
    return out


def is_glob(uri: str) -> bool:
    return any(c in uri for c in "*?[")


def list_dir(uri: str) -> list[str]:
    """The files directly in a directory (not in its sub-folders, not hidden), sorted."""
    fs, path = filesystem_for(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    prefix = "s3://" if is_s3(uri) else ""
    return sorted(prefix + i.path for i in infos if i.type == pafs.FileType.File and not i.base_name.startswith("."))


def _glob_regex(pattern: str) -> re.Pattern:
    # As the shell and Python's glob read it: `*` and `?` stay within a folder, `**/` spans folders.
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            end = pattern.find("]", i + 1) if pattern[i] == "[" else -1
            out.append(fnmatch.translate(pattern[i : end + 1])[4:-3] if end > 0 else re.escape(pattern[i]))
            i = end + 1 if end > 0 else i + 1
    return re.compile("".join(out) + r"\Z")


def glob(pattern: str) -> list[str]:
    """Files matching a glob (`**/` spans folders), local or s3://, sorted."""
    if not is_s3(pattern):
        matches = globlib.glob(os.path.expanduser(pattern), recursive=True)
        return sorted(str(Path(m).resolve()) for m in matches if Path(m).is_file())
    # S3 has no glob: list everything under the fixed part of the pattern, then match whole keys.
    fixed = pattern[: min(pattern.index(c) for c in "*?[" if c in pattern)].rsplit("/", 1)[0]
    fs, path = filesystem_for(fixed)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    regex = _glob_regex(pattern[len("s3://") :])
    return sorted("s3://" + i.path for i in infos if i.type == pafs.FileType.File and regex.match(i.path))
