"""Input size limits and streaming: `prepare` reads its input as it builds shards (a JSON array is
decoded item by item, never loaded whole), and text over the character limits is rejected with its
reason in training as in `prepare` (tests/unit/test_prepare.py counts every reason in a manifest)."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest

import vistralv_ray.data.prepare as prepare_module
from vistralv_ray.data import sources
from vistralv_ray.data.prepare import PrepareOptions, prepare
from vistralv_ray.data.sources import json_array_items


def qa(question: str, answer: str = "Chào bạn.") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


class CountingStream:
    """A binary stream that counts the bytes read from it."""

    def __init__(self, stream, counter: dict):
        self.stream, self.counter = stream, counter

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.counter["bytes"] += len(data)
        return data

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stream.close()


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_prepare_builds_its_first_shard_before_the_input_is_read(tmp_path, monkeypatch, suffix):
    records = [{"id": f"r{i}", "conversations": qa(f"Câu {i}: " + "x" * 1000)} for i in range(3000)]
    src = tmp_path / f"data{suffix}"
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    src.write_text("\n".join(lines) if suffix == ".jsonl" else "[\n" + ",\n".join(lines) + "\n]")
    size = src.stat().st_size
    read = {"bytes": 0}
    real_open, real_build = sources._open_binary, prepare_module.build_shard
    monkeypatch.setattr(sources, "_open_binary", lambda uri: CountingStream(real_open(uri), read))
    read_at_build = []

    def build_shard(chunk, index, opts):
        read_at_build.append(read["bytes"])
        return real_build(chunk, index, opts)

    monkeypatch.setattr(prepare_module, "build_shard", build_shard)
    options = PrepareOptions(None, str(tmp_path / "out"), shard_size=100)
    manifest = prepare(src, options, parallel=False, progress=False)
    assert manifest["records_in"] == manifest["records_out"] == 3000 and len(read_at_build) == 30
    # The first shard was built with a fraction of the 3 MB file read (one 1 MiB chunk), the rest after.
    assert read_at_build[0] <= 1 << 20 < size // 2 and read["bytes"] == size
    assert read_at_build == sorted(read_at_build) and read_at_build[-1] > size // 2


def test_a_json_array_is_decoded_item_by_item_whatever_the_chunk_boundaries(tmp_path):
    items = [
        {"id": "đỏ", "text": "Màu gì?\u2028<image>\n" * 3, "nested": {"a": [1, 2.5, None, True]}},
        123456,
        -1.5e10,
        2.25e-3,
        "a string",
        False,
        None,
        [],
        {"long": "y" * 5000},
        7,
    ]
    for text in (json.dumps(items, ensure_ascii=False), json.dumps(items, ensure_ascii=False, indent=2)):
        data = b"\xef\xbb\xbf" + text.encode()  # with a byte-order mark
        for chunk in (1, 2, 3, 5, 64, 1 << 20):
            assert list(json_array_items(io.BytesIO(data), "x.json", chunk_chars=chunk)) == items, chunk
    # Memory holds one item and a chunk: the first item arrives after one chunk of a large file.
    big = ("[" + ",".join(json.dumps({"id": i, "text": "x" * 100}) for i in range(50_000)) + "]").encode()
    read = {"bytes": 0}
    first = next(json_array_items(CountingStream(io.BytesIO(big), read), "x.json", chunk_chars=4096))
    assert first["id"] == 0 and read["bytes"] == 4096 < len(big)


def test_text_over_the_character_limits_is_rejected_at_training_time(tiny_model_config):
    from vistralv_ray.data.preprocess import Preprocessor

    pre = Preprocessor(dataclasses.asdict(tiny_model_config), 25_000_000, text_limits=(100, 150))
    rows = {
        "fits": qa("x" * 60, "y" * 60),
        "long-message": qa("x" * 101),
        "long-record": qa("x" * 80, "y" * 80),
    }
    batch = {
        "id": list(rows),
        "image": [None] * 3,
        "messages": [np.asarray([{"role": t["from"], "content": t["value"]} for t in m]) for m in rows.values()],
    }
    out = pre(batch)
    reasons = dict(zip(out["id"], out["reject_reason"], strict=True))
    assert reasons == {"fits": "", "long-message": "text_too_long", "long-record": "text_too_long"}
    assert (
        "101 characters > 100" in out["reject_detail"][1] and "160 characters in all > 150" in out["reject_detail"][2]
    )


def test_the_limits_are_data_config_values_checked_like_the_others():
    from vistralv_ray.config import ConfigError, load_config

    cfg = load_config(None, ["data.max_message_chars=500", "data.max_record_chars=2000"])
    assert (cfg.data.max_message_chars, cfg.data.max_record_chars, cfg.data.max_image_pixels) == (500, 2000, 25_000_000)
    with pytest.raises(ConfigError, match="data.max_record_chars"):
        load_config(None, ["data.max_record_chars=0"])


def test_parallel_prepare_reads_ahead_two_chunks_per_cpu_but_never_the_whole_corpus():
    from vistralv_ray.data.prepare import MAX_CHUNKS_IN_FLIGHT, chunks_in_flight

    assert chunks_in_flight(1) == 2 and chunks_in_flight(8) == 16
    # A 64-node cluster (~6,000 CPUs) would otherwise hold ~12,000 chunks: the whole corpus.
    assert chunks_in_flight(6144) == MAX_CHUNKS_IN_FLIGHT == 64
