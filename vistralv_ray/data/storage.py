"""Local paths and `s3://` URIs behind one interface (pyarrow filesystems; s3fs underneath for S3).

Credentials, region and endpoint come from the standard AWS environment variables or profile;
`AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` point at MinIO, moto or another S3-compatible store.

Faults: reading and writing whole objects tells a missing object (FileNotFoundError) from storage
that cannot be used (StorageError: access denied, a bucket that does not exist, an endpoint that stays
unreachable); throttling, timeouts and dropped connections are retried with backoff first. Writes are
all or nothing: a local file is written under a temporary name and renamed, an S3 object is one upload.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import glob as globlib
import json
import os
import random
import re
import time
import uuid
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import pyarrow.fs as pafs

from vistralv_ray.errors import StorageError
from vistralv_ray.logging import get_logger

log = get_logger(__name__)

# `prepare` writes it last, so a shard directory without it is an interrupted (incomplete) output.
SHARD_MANIFEST = "manifest.json"
# Tries of one S3 call before a transient fault (throttling, timeout, dropped connection) becomes a
# StorageError, and the backoff between them: 0.5, 1, 2, 4, 8 s (+/- 25%), about 15 s in all.
S3_ATTEMPTS = 6
S3_BACKOFF_S = 0.5
S3_BACKOFF_MAX_S = 8.0
# S3 error codes (and what s3fs turns them into) that say "try again later".
_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequests",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
    "500",
    "502",
    "503",
    "504",
    "429",
}
_TRANSIENT_ERRNOS = {errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED, errno.EAGAIN, 121}  # EREMOTEIO


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def s3fs_options() -> dict:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}


@lru_cache(maxsize=4)
def _s3_filesystem(endpoint_key: str) -> pafs.FileSystem:
    import s3fs

    return pafs.PyFileSystem(pafs.FSSpecHandler(s3fs.S3FileSystem(**s3fs_options())))


@lru_cache(maxsize=4)
def _s3fs(endpoint_key: str):
    """The s3fs client for whole-object reads and writes, without botocore's or s3fs's own retries:
    `_with_retries` is then the one bounded retry policy, and a fault reaches it as what it is (the
    pyarrow wrapper reports any failed open, a refused connection too, as a missing file)."""
    import s3fs

    config = {"retries": {"max_attempts": 1, "mode": "standard"}, "connect_timeout": 10, "read_timeout": 60}
    client = s3fs.S3FileSystem(**s3fs_options(), config_kwargs=config, skip_instance_cache=True)
    client.retries = 1  # a class attribute (5), not a constructor argument
    return client


def _s3_client(fs: pafs.FileSystem):
    """The s3fs client for whole-object calls when `fs` is our s3fs-backed filesystem; None for any
    other (a stand-in a test puts in its place): those calls then go through pyarrow's API."""
    if isinstance(fs, pafs.PyFileSystem) and isinstance(fs.handler, pafs.FSSpecHandler):
        return _s3fs(str(s3fs_options()))
    return None


def _error_code(e: BaseException) -> str:
    response = getattr(e, "response", None)
    if isinstance(response, dict):
        error = response.get("Error", {})
        return str(error.get("Code") or response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    return ""


def _is_transient(e: BaseException) -> bool:
    """Throttling, timeouts and connection faults: worth another try. Missing objects and denied
    access are not (they do not change by waiting)."""
    if isinstance(e, (FileNotFoundError, PermissionError)):
        return False
    if isinstance(e, (TimeoutError, ConnectionError)):
        return True
    if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
        return True
    for err in (e, e.__cause__, e.__context__):
        if err is None:
            continue
        if _error_code(err) in _TRANSIENT_CODES:
            return True
        # botocore's EndpointConnectionError / ConnectTimeoutError / ReadTimeoutError / ConnectionClosedError,
        # aiohttp's ClientConnectionError, fsspec's FSTimeoutError: matched by name, none of them is imported here.
        names = {k.__name__ for k in type(err).__mro__}
        if names & {"ConnectionError", "HTTPClientError", "ClientConnectionError", "FSTimeoutError", "TimeoutError"}:
            return True
    return False


def _with_retries(call: Callable, uri: str, what: str):
    """`call()`, retried with backoff while the fault is transient; a fault that outlasts the tries,
    denied access or a missing bucket is a StorageError; a missing object stays FileNotFoundError."""
    for attempt in range(1, S3_ATTEMPTS + 1):
        try:
            return call()
        except FileNotFoundError as e:
            if "NoSuchBucket" in {
                _error_code(e.__cause__),
                type(e.__cause__).__name__,
            } or "bucket does not exist" in str(e):
                raise StorageError(f"cannot {what} {uri}: the bucket does not exist") from e
            raise
        except PermissionError as e:
            raise StorageError(
                f"cannot {what} {uri}: access denied ({e}); check the credentials and bucket policy"
            ) from e
        except Exception as e:
            if not _is_transient(e):
                if isinstance(e, OSError):
                    raise  # the caller's to judge (an unreadable object is one record's problem)
                # No credentials, a malformed endpoint URL...: the storage cannot be used at all.
                raise StorageError(f"cannot {what} {uri}: {type(e).__name__}: {e}") from e
            if attempt == S3_ATTEMPTS:
                endpoint = s3fs_options().get("client_kwargs", {}).get("endpoint_url") or "AWS's default endpoint"
                raise StorageError(
                    f"cannot {what} {uri}: S3 at {endpoint} still failing after {attempt} tries "
                    f"({type(e).__name__}: {e}); is the endpoint right and the server up?"
                ) from e
            delay = min(S3_BACKOFF_S * 2 ** (attempt - 1), S3_BACKOFF_MAX_S) * random.uniform(0.75, 1.25)
            log.warning(
                "%s %s: %s: %s; retry %d of %d in %.1fs",
                what,
                uri,
                type(e).__name__,
                e,
                attempt,
                S3_ATTEMPTS - 1,
                delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path within it) for a local path or an s3:// URI."""
    if is_s3(uri):
        return _s3_filesystem(str(s3fs_options())), uri[len("s3://") :].rstrip("/")
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def exists(uri: str) -> bool:
    fs, path = filesystem_for(uri)
    if is_s3(uri) and (client := _s3_client(fs)):
        client.invalidate_cache(path)  # s3fs remembers listings: the answer must be today's
        return _with_retries(lambda: client.exists(path), uri, "look up")
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    """The whole file or object; FileNotFoundError when it is not there, StorageError when S3 cannot be used."""
    fs, path = filesystem_for(uri)
    if is_s3(uri) and (client := _s3_client(fs)):
        return _with_retries(lambda: client.cat_file(path), uri, "read")
    with fs.open_input_stream(path) as f:
        return f.read()


class _RetryingObjectReader:
    """An S3 object read front to back as a stream, each read retried like any other S3 call
    (`_with_retries`): a fault in the middle of the object re-opens it at the offset already read,
    so a connection reset 3 GB into a JSON file costs one retry, not the whole `prepare`."""

    def __init__(self, client, path: str, uri: str):
        self._client, self._path, self._uri = client, path, uri
        self._file = None
        self._offset = 0

    def read(self, size: int = -1) -> bytes:
        def attempt() -> bytes:
            if self._file is None:
                self._file = self._client.open(self._path, "rb")
                self._file.seek(self._offset)
            try:
                return self._file.read(size)
            except Exception:
                self.close()  # the next try opens the object again at self._offset
                raise

        data = _with_retries(attempt, self._uri, "read")
        self._offset += len(data)
        return data

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(Exception):
                self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_stream(uri: str):
    """A binary stream of a file or object, read as it is consumed (S3 reads retried, see above)."""
    fs, path = filesystem_for(uri)
    if is_s3(uri) and (client := _s3_client(fs)):
        return _RetryingObjectReader(client, path, uri)
    return fs.open_input_stream(path)


def temporary_name(path: str) -> str:
    """A hidden sibling of `path` to write it under before the rename: listings skip dot files, and
    the unique suffix keeps two writers of the same file apart."""
    head, _, name = path.rpartition("/")
    return f"{head}/.{name}.tmp-{uuid.uuid4().hex[:12]}"


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file: it is either there complete or not there (never half-written)."""
    fs, path = filesystem_for(uri)
    parent = path.rsplit("/", 1)[0]
    if is_s3(uri):
        if client := _s3_client(fs):
            # One upload (multi-part for large data): the object appears when it completes, never partial.
            _with_retries(lambda: client.pipe_file(path, data), uri, "write")
            return
        fs.create_dir(parent, recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    fs.create_dir(parent, recursive=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        # Also on KeyboardInterrupt (a cancelled Ray task): no temporary file is left behind.
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def delete_file(uri: str) -> None:
    fs, path = filesystem_for(uri)
    fs.delete_file(path)


def list_parquet(uris: list[str]) -> list[str]:
    """Expand directories into Parquet file URIs, the shards their manifests list, sorted.

    A folder's shards are taken from its `manifest.json`, which `prepare` writes last: a folder of
    .parquet files without one is an interrupted output (or not ours) and is refused, so a partial
    directory is never read as a complete data set. A file named directly is used as it is.
    """
    out: list[str] = []
    for uri in uris:
        fs, path = filesystem_for(uri)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"data path {uri} does not exist")
        if info.type == pafs.FileType.File:
            out.append(uri)
            continue
        prefix = "s3://" if is_s3(uri) else ""
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        folders = {
            i.path.rsplit("/", 1)[0] for i in infos if i.path.endswith(".parquet") and not i.base_name.startswith(".")
        }
        if not folders:
            raise FileNotFoundError(f"data path {uri} holds no .parquet shards")
        manifests = {i.path.rsplit("/", 1)[0] for i in infos if i.base_name == SHARD_MANIFEST}
        unlisted = sorted(folders - manifests)
        if unlisted:
            raise FileNotFoundError(
                f"data path {prefix + unlisted[0]} holds .parquet files but no {SHARD_MANIFEST}: an interrupted "
                "`prepare` leaves none; prepare the data again (or name the .parquet files themselves)"
            )
        present = {i.path for i in infos}
        for folder in sorted(folders):
            manifest = json.loads(read_bytes(prefix + f"{folder}/{SHARD_MANIFEST}"))
            shards = [f"{folder}/{s['name']}" for s in manifest.get("shards", [])]
            missing = [s for s in shards if s not in present]
            if missing:
                raise FileNotFoundError(
                    f"data path {prefix + folder}: shard {missing[0]} of its {SHARD_MANIFEST} is missing"
                )
            out += [prefix + s for s in sorted(shards)]
    return out


def list_tree(uri: str) -> list[str]:
    """Every file under a directory or prefix (sub-folders and hidden files too); [] if there is none."""
    fs, path = filesystem_for(uri)
    if is_s3(uri):
        if client := _s3_client(fs):
            client.invalidate_cache(path)
            return sorted("s3://" + p for p in _with_retries(lambda: client.find(path), uri, "list"))
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        return sorted("s3://" + i.path for i in infos if i.type == pafs.FileType.File)
    if not Path(path).is_dir():
        return [uri] if Path(path).exists() else []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File)


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
