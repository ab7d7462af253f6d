"""The placement record is a diagnostic: a storage fault writing it is a warning, never a failed
train worker or preprocessing actor."""

from __future__ import annotations

from types import SimpleNamespace

import ray

from vistralv_ray.data import placement, storage
from vistralv_ray.errors import StorageError


def fake_context(monkeypatch):
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(get_node_id=lambda: "node-a"))


def test_a_record_is_written_and_read_back(tmp_path, monkeypatch):
    fake_context(monkeypatch)
    assert placement.record_node(str(tmp_path), "train", rank=1, world_size=2)
    [entry] = placement.read_placement(str(tmp_path))
    assert entry["node_id"] == "node-a" and entry["role"] == "train" and entry["rank"] == 1


def test_a_storage_fault_is_a_warning_not_a_crash(tmp_path, monkeypatch, caplog):
    fake_context(monkeypatch)

    def denied(uri, data):
        raise StorageError(f"{uri}: access denied")

    monkeypatch.setattr(storage, "write_bytes", denied)
    assert placement.record_node(str(tmp_path), "preprocess") is False
    assert "could not record the preprocess node" in caplog.text and "access denied" in caplog.text
