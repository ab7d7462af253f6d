"""Shuffling: row groups of all shards in a new order every epoch, interleaved per preprocessing call."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from vistralv_ray.bench.mixing import MixingOptions, measure_mixing
from vistralv_ray.data.prepare import SHARD_ROW_GROUP_ROWS, SHARD_SCHEMA
from vistralv_ray.data.shards import interleaved_rows, row_group_units, row_key


def _shard(path, ids, group_rows):
    message = [{"role": "user", "content": "Gì?"}, {"role": "assistant", "content": "Đỏ."}]
    rows = [{"id": i, "image": None, "messages": message} for i in ids]
    pq.write_table(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA), path, row_group_size=group_rows)
    return str(path)


def test_row_group_units_and_interleaving(tmp_path):
    a = _shard(tmp_path / "a.parquet", [f"a{i}" for i in range(10)], 4)
    b = _shard(tmp_path / "b.parquet", [f"b{i}" for i in range(6)], 4)
    units = row_group_units([a, b])
    assert [(u["uri"], u["row_group"], u["first_row"], u["rows"]) for u in units] == [
        (a, 0, 0, 4), (a, 1, 4, 4), (a, 2, 8, 2), (b, 0, 0, 4), (b, 1, 4, 2),
    ]  # fmt: skip
    call = [(a, 1, 4), (b, 0, 0), (a, 2, 8)]
    columns, keys = interleaved_rows(call, seed=None)
    assert columns["id"] == ["a4", "a5", "a6", "a7", "b0", "b1", "b2", "b3", "a8", "a9"]
    assert keys == [row_key(a, r) for r in range(4, 8)] + [row_key(b, r) for r in range(4)] + [
        row_key(a, 8),
        row_key(a, 9),
    ]
    mixed, mixed_keys = interleaved_rows(call, seed=7)
    assert sorted(mixed["id"]) == sorted(columns["id"]) and mixed["id"] != columns["id"]
    assert dict(zip(mixed["id"], mixed_keys)) == dict(zip(columns["id"], keys))  # a row keeps its key
    assert interleaved_rows(call, seed=7)[0]["id"] == mixed["id"]  # reproducible
    assert interleaved_rows(call[::-1], seed=7)[0]["id"] != mixed["id"]  # another draw: another order


def test_a_sorted_corpus_mixes_like_a_permutation(tmp_path):
    assert SHARD_ROW_GROUP_ROWS == MixingOptions().row_group_rows  # the bench measures what prepare writes
    result = measure_mixing(MixingOptions(records_per_subset=1000, shard_size=500, workers=1, per_device_batch=8))
    assert result["shards"] < 1.5  # a shard is one subset: a batch mostly holds one
    assert result["ours"] > 3 * result["shards"]
    assert result["ours"] > 0.8 * result["random"]
