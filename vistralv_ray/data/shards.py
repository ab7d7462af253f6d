"""Prepared shards as the training pipeline reads them: their columns, their row groups, row keys.

A shard is a Parquet file of `SHARD_COLUMNS` written in row groups (`prepare.SHARD_ROW_GROUP_ROWS`
rows each). The pipeline's unit of work and of shuffling is one row group; a row is known by its shard
and its index in the shard (`row_key`), which stays the same in every epoch and after a restart.
"""

from __future__ import annotations

import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vistralv_ray.data import storage

SHARD_COLUMNS = ["id", "image", "messages"]


def record_key(record_id: str) -> int:
    """A compact 64-bit key for a string (resume bookkeeping keeps sets of these)."""
    return zlib.crc32(record_id.encode()) << 32 | zlib.adler32(record_id.encode())


def row_key(shard_uri: str, row: int) -> int:
    """The key of one shard row: unique where source ids are not (LLaVA's finetune JSON gives one
    image's several conversations the same id), and the same in every epoch and after a restart."""
    return record_key(f"{shard_uri}#{row}")


def row_group_units(files: list[str]) -> list[dict]:
    """One unit per row group of every shard, from the Parquet footers: uri, row_group, first_row, rows."""
    units = []
    for uri in files:
        fs, path = storage.filesystem_for(uri)
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
        first = 0
        for group in range(meta.num_row_groups):
            rows = meta.row_group(group).num_rows
            if rows:
                units.append({"uri": uri, "row_group": group, "first_row": first, "rows": rows})
            first += rows
    return units


def read_row_group(uri: str, group: int, first_row: int) -> tuple[dict[str, list], list[int]]:
    """One row group of a shard as columns, and its rows' keys; a shard that cannot be read is an
    OSError naming it."""
    fs, path = storage.filesystem_for(uri)
    try:
        with fs.open_input_file(path) as f:
            table = pq.ParquetFile(f).read_row_group(group, SHARD_COLUMNS)
    except (OSError, pa.ArrowException) as e:
        raise OSError(f"{uri}: cannot read the shard: {e}") from e
    return table.to_pydict(), [row_key(uri, first_row + j) for j in range(table.num_rows)]


def interleaved_rows(units: list[tuple[str, int, int]], seed: int | None) -> tuple[dict[str, list], list[int]]:
    """The rows of several row groups, (uri, row_group, first_row) each; with a seed, interleaved in a
    random order drawn from the seed and the units (reproducible, and another order every epoch, since
    the units come in a new order every epoch)."""
    columns: dict[str, list] = {name: [] for name in SHARD_COLUMNS}
    keys: list[int] = []
    for uri, group, first in units:
        part, part_keys = read_row_group(uri, group, first)
        for name in SHARD_COLUMNS:
            columns[name] += part[name]
        keys += part_keys
    if seed is not None and keys:
        drawn = record_key(",".join(f"{u}#{g}" for u, g, _ in units))
        order = np.random.default_rng([seed, drawn]).permutation(len(keys))
        columns = {name: [values[i] for i in order] for name, values in columns.items()}
        keys = [keys[i] for i in order]
    return columns, keys
