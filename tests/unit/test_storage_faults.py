"""S3 fault handling in `storage`, with a stand-in client: throttling, timeouts and dropped connections
are retried with bounded, growing backoff; a missing object is FileNotFoundError at once; denied access,
missing credentials or a fault that outlasts the retries are a StorageError."""

from __future__ import annotations

import errno

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError, ReadTimeoutError

from vistralv_ray.data import storage
from vistralv_ray.errors import StorageError


class FlakyClient:
    """`cat_file` raises the given faults in turn, then returns the object's bytes."""

    def __init__(self, *faults: BaseException):
        self.faults = list(faults)
        self.calls = 0

    def cat_file(self, path):
        self.calls += 1
        if self.faults:
            raise self.faults.pop(0)
        return b"object"


@pytest.fixture()
def sleeps(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(storage.time, "sleep", slept.append)
    return slept


def use(monkeypatch, client: FlakyClient) -> FlakyClient:
    monkeypatch.setattr(storage, "_s3_client", lambda fs: client)
    return client


def throttled() -> ClientError:
    return ClientError({"Error": {"Code": "SlowDown", "Message": "Please reduce your request rate."}}, "GetObject")


TRANSIENT = {
    "slow-down": throttled,
    "throttling": lambda: ClientError({"Error": {"Code": "Throttling"}}, "GetObject"),
    "s3fs-ebusy": lambda: OSError(errno.EBUSY, "SlowDown"),  # what s3fs makes of a 503
    "timeout": lambda: TimeoutError("read timed out"),
    "read-timeout": lambda: ReadTimeoutError(endpoint_url="http://s3"),
    "refused": lambda: EndpointConnectionError(endpoint_url="http://s3"),
    "reset": lambda: ConnectionResetError(errno.ECONNRESET, "reset by peer"),
}


@pytest.mark.parametrize("name", list(TRANSIENT))
def test_transient_faults_are_retried_until_the_read_succeeds(monkeypatch, sleeps, name):
    client = use(monkeypatch, FlakyClient(TRANSIENT[name](), TRANSIENT[name]()))
    assert storage.read_bytes("s3://bucket/key") == b"object"
    assert client.calls == 3 and len(sleeps) == 2


def test_a_fault_that_outlasts_the_retries_is_a_storage_error_after_bounded_backoff(monkeypatch, sleeps):
    client = use(monkeypatch, FlakyClient(*[throttled() for _ in range(20)]))
    with pytest.raises(StorageError, match=r"cannot read s3://bucket/key: S3 at .* still failing after 6 tries"):
        storage.read_bytes("s3://bucket/key")
    assert client.calls == storage.S3_ATTEMPTS == 6
    nominal = [0.5, 1, 2, 4, 8]
    assert all(0.75 * n <= s <= 1.25 * n for s, n in zip(sleeps, nominal, strict=True)), sleeps


def test_a_missing_object_is_not_retried(monkeypatch, sleeps):
    client = use(monkeypatch, FlakyClient(FileNotFoundError("bucket/key")))
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("s3://bucket/key")
    assert client.calls == 1 and not sleeps


@pytest.mark.parametrize(
    "fault, message",
    [
        (PermissionError("Forbidden"), "access denied"),
        (NoCredentialsError(), "NoCredentialsError"),
        (ValueError("Invalid endpoint: htp:/s3"), "Invalid endpoint"),
    ],
)
def test_permanent_faults_are_a_storage_error_at_once(monkeypatch, sleeps, fault, message):
    client = use(monkeypatch, FlakyClient(fault))
    with pytest.raises(StorageError, match=message):
        storage.read_bytes("s3://bucket/key")
    assert client.calls == 1 and not sleeps


def test_an_unreadable_object_is_left_to_the_caller(monkeypatch, sleeps):
    # Not transient, not a storage-wide fault: prepare makes it the record's `unreadable_image`.
    client = use(monkeypatch, FlakyClient(OSError(errno.EINVAL, "InvalidObjectState")))
    with pytest.raises(OSError, match="InvalidObjectState"):
        storage.read_bytes("s3://bucket/key")
    assert client.calls == 1 and not sleeps


class ObjectThatResets:
    """An s3fs-like client whose object stream resets the connection once, after `fail_at` bytes."""

    def __init__(self, data: bytes, fail_at: int, fault: BaseException):
        self.data, self.fail_at, self.fault = data, fail_at, fault
        self.opened_at: list[int] = []

    def open(self, path, mode):
        client = self

        class Stream:
            def __init__(self):
                self.pos = 0

            def seek(self, offset):
                self.pos = offset
                client.opened_at.append(offset)

            def read(self, size=-1):
                end = len(client.data) if size < 0 else min(len(client.data), self.pos + size)
                if client.fault is not None and end > client.fail_at:
                    fault, client.fault = client.fault, None
                    raise fault
                chunk = client.data[self.pos : end]
                self.pos = end
                return chunk

            def close(self):
                pass

        return Stream()


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_connection_reset_mid_object_reopens_it_where_the_reading_stopped(monkeypatch, sleeps, suffix):
    """`prepare` streams its S3 input; a reset in the middle of the object is retried from the offset
    already read (every record once, none twice), not the end of the command."""
    import json

    from vistralv_ray.data import sources

    records = [{"id": str(i), "text": "x" * 300} for i in range(20_000)]  # ~6.6 MB: several 1 MiB reads
    if suffix == ".jsonl":
        data = "\n".join(json.dumps(r) for r in records).encode()
    else:
        data = json.dumps(records).encode()
    client = ObjectThatResets(data, fail_at=len(data) // 2, fault=ConnectionResetError(errno.ECONNRESET, "reset"))
    use(monkeypatch, client)
    monkeypatch.setattr(storage, "filesystem_for", lambda uri: (None, "bucket/input" + suffix))
    rows = list(sources._rows("s3://bucket/input" + suffix))
    assert [r["id"] for r in rows] == [r["id"] for r in records]
    assert client.opened_at[0] == 0 and len(client.opened_at) == 2 and 0 < client.opened_at[1] <= len(data) // 2
    assert len(sleeps) == 1


def test_a_read_that_keeps_failing_is_one_storage_error(monkeypatch, sleeps):
    class Down:
        def open(self, path, mode):
            raise ConnectionRefusedError(errno.ECONNREFUSED, "refused")

    use(monkeypatch, Down())
    monkeypatch.setattr(storage, "filesystem_for", lambda uri: (None, "bucket/input.jsonl"))
    with pytest.raises(StorageError, match="still failing after"), storage.open_stream("s3://bucket/input.jsonl") as f:
        f.read(10)
