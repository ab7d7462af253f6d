"""S3 faults against a local moto server (127.0.0.1), in this process, no Ray: a missing object is a
record's `missing_image`; a server that goes away and comes back is retried; denied access, a wrong
endpoint, a missing bucket or a server that stays down stop `prepare` with a one-line error, exit 1,
and nothing written."""

from __future__ import annotations

import json
import logging
import socket
import time
import types
import uuid

import pytest
from PIL import Image

from vistralv_ray.cli.main import main
from vistralv_ray.data import storage
from vistralv_ray.data.prepare import PrepareOptions, prepare
from vistralv_ray.errors import StorageError

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def use_endpoint(monkeypatch, endpoint: str) -> None:
    import s3fs

    for key in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }.items():
        monkeypatch.setenv(key, value)
    storage._s3_filesystem.cache_clear()
    storage._s3fs.cache_clear()
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture()
def server(monkeypatch):
    """A moto server on a free loopback port, a fresh bucket with one image, short retry backoff."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    use_endpoint(monkeypatch, f"http://127.0.0.1:{port}")
    monkeypatch.setattr(storage, "S3_BACKOFF_S", 0.05)
    bucket = f"faults-{uuid.uuid4().hex[:8]}"
    client = boto3.client("s3")
    client.create_bucket(Bucket=bucket)
    image = storage_image()
    for i in range(12):
        client.put_object(Bucket=bucket, Key=f"images/{i}.jpg", Body=image)
    state = {"moto": moto, "port": port, "bucket": bucket, "client": client}
    yield state
    state["moto"].stop()
    storage._s3_filesystem.cache_clear()
    storage._s3fs.cache_clear()


def storage_image() -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 120, 200)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture()
def source(tmp_path):
    records = [
        {"id": f"r{i}", "image": f"{i}.jpg", "conversations": [{"from": "human", "value": "<image>\nGì?"},
                                                                 {"from": "gpt", "value": "Xanh."}]}
        for i in range(13)  # 12.jpg is not in the bucket
    ]  # fmt: skip
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records, ensure_ascii=False))
    return path


def cli_prepare(source, image_root: str, out) -> list[str]:
    return ["prepare", "--format", "llava", "--input", str(source), "--image-root", image_root, "--out", str(out)]


def assert_one_line_error(capsys, *words: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    return err


def test_a_missing_object_is_the_records_missing_image(server, source, tmp_path):
    manifest = prepare(
        source, PrepareOptions(f"s3://{server['bucket']}/images", str(tmp_path / "out")), parallel=False, progress=False
    )
    assert (manifest["records_out"], manifest["rejected"]) == (12, {"missing_image": 1})


def test_denied_reads_stop_prepare_with_one_line_and_nothing_written(server, source, tmp_path, capsys):
    bucket = server["bucket"]
    deny = {"Effect": "Deny", "Principal": "*", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{bucket}/*"}
    policy = {"Version": "2012-10-17", "Statement": [deny]}
    server["client"].put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))
    with pytest.raises(StorageError, match="access denied"):
        prepare(source, PrepareOptions(f"s3://{bucket}/images", str(tmp_path / "out")), parallel=False, progress=False)
    assert main([*cli_prepare(source, f"s3://{bucket}/images", tmp_path / "cli"), "--serial"]) == 1
    assert_one_line_error(capsys, "access denied", f"s3://{bucket}/images/0.jpg")
    assert not (tmp_path / "out").exists() and not (tmp_path / "cli").exists()


def test_a_bucket_that_does_not_exist_stops_prepare(server, source, tmp_path, capsys):
    assert main([*cli_prepare(source, "s3://no-such-bucket-here/images", tmp_path / "out"), "--serial"]) == 1
    assert_one_line_error(capsys, "the bucket does not exist")
    assert not (tmp_path / "out").exists()


def test_a_wrong_endpoint_stops_prepare_with_one_line(server, source, tmp_path, monkeypatch, capsys):
    use_endpoint(monkeypatch, f"http://127.0.0.1:{free_port()}")  # nothing listens there
    started = time.monotonic()
    assert main([*cli_prepare(source, f"s3://{server['bucket']}/images", tmp_path / "out"), "--serial"]) == 1
    assert_one_line_error(capsys, "still failing after 6 tries", "EndpointConnectionError")
    assert time.monotonic() - started < 30 and not (tmp_path / "out").exists()
    # An --out on the unreachable endpoint is the same one-line error, before anything is read.
    out = f"s3://{server['bucket']}/prepared"
    assert main([*cli_prepare(source, f"s3://{server['bucket']}/images", out), "--serial"]) == 1
    assert_one_line_error(capsys, "cannot look up", out)


def stop_after(server, monkeypatch, reads: int, restart_after_tries: int | None = None) -> None:
    """Stop the moto server once `reads` objects have been read (and start it again once that many
    tries of a read have failed: at the retry's backoff, in the reading thread, not after a guessed time)."""
    real, count, backoffs = storage.read_bytes, [], []

    def read(uri):
        if len(count) == reads:
            server["moto"].stop()
        count.append(uri)
        return real(uri)

    def backoff(seconds: float) -> None:
        backoffs.append(seconds)
        if len(backoffs) == restart_after_tries:
            from moto.server import ThreadedMotoServer

            # Same process, same port: moto keeps its buckets in memory across servers. start() returns
            # once the new server listens.
            server["moto"] = ThreadedMotoServer(ip_address="127.0.0.1", port=server["port"], verbose=False)
            server["moto"].start()
        time.sleep(seconds)

    monkeypatch.setattr(storage, "read_bytes", read)
    # storage's own `time` only (its retry backoff is its one use of it), not the time module of everyone.
    monkeypatch.setattr(storage, "time", types.SimpleNamespace(sleep=backoff))


def test_a_server_stopped_mid_run_stops_prepare_and_removes_its_shards(server, source, tmp_path, monkeypatch, capsys):
    stop_after(server, monkeypatch, reads=5)
    out = tmp_path / "out"
    assert main([*cli_prepare(source, f"s3://{server['bucket']}/images", out), "--serial", "--shard-size", "2"]) == 1
    assert_one_line_error(capsys, "still failing after 6 tries", "is the endpoint right and the server up?")
    assert not out.exists()  # the two shards written before the fault are gone


def test_a_server_back_within_the_retries_is_a_complete_run(server, source, tmp_path, monkeypatch):
    stop_after(server, monkeypatch, reads=5, restart_after_tries=2)  # back for the read's third try
    options = PrepareOptions(f"s3://{server['bucket']}/images", str(tmp_path / "out"), shard_size=2)
    manifest = prepare(source, options, parallel=False, progress=False)
    assert (manifest["records_out"], manifest["rejected"]) == (12, {"missing_image": 1})


def test_s3_output_is_complete_or_absent(server, source, tmp_path, monkeypatch):
    bucket, client = server["bucket"], server["client"]
    client.put_object(Bucket=bucket, Key="prepared/train2/other.txt", Body=b"a neighbour, not inside --out")
    real, writes = storage.write_bytes, []

    def failing(uri, data):
        if len(writes) == 3:
            raise OSError(5, "I/O error")
        writes.append(uri)
        real(uri, data)

    monkeypatch.setattr(storage, "write_bytes", failing)
    options = PrepareOptions(f"s3://{bucket}/images", f"s3://{bucket}/prepared/train", shard_size=2)
    with pytest.raises(OSError, match="I/O error"):
        prepare(source, options, parallel=False, progress=False)

    def keys(prefix):
        return sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []))

    assert len(writes) == 3 and keys("prepared/train/") == []  # the three shards uploaded were removed
    monkeypatch.setattr(storage, "write_bytes", real)
    manifest = prepare(source, options, parallel=False, progress=False)
    assert keys("prepared/train/") == sorted(
        [f"prepared/train/{s['name']}" for s in manifest["shards"]] + ["prepared/train/manifest.json"]
        + ["prepared/train/rejected.jsonl"]
    )  # fmt: skip
    assert storage.list_parquet([options.out]) == [f"{options.out}/{s['name']}" for s in manifest["shards"]]
    with pytest.raises(FileExistsError):
        prepare(source, options, parallel=False, progress=False)
