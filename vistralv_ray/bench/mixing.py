"""How close the training stream comes to a global permutation, on a corpus sorted by source subset.

A corpus prepared from several subsets one after the other (Vista's subsets, LLaVA's mix) has its
shards sorted by subset. The measure: the mean number of distinct subsets in a global batch, for
  ours     row groups drawn in a random order every epoch (what `randomize_block_order` does to the
           `shards.row_group_units` dataset), `data.shuffle_row_groups` of them interleaved per
           preprocessing call (`shards.interleaved_rows`, the code the actors run), calls handed to the
           workers in turn, each worker's local shuffle buffer of `data.shuffle_buffer` rows;
  shards   the previous scheme: whole shards in a random order, read row by row, a local buffer of
           4 x the per-device batch;
  random   a true random permutation of the corpus.
Records are text-only: their order is what is measured, and no image is decoded for it.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vistralv_ray.data.shards import interleaved_rows, row_group_units


@dataclass
class MixingOptions:
    subsets: int = 8
    records_per_subset: int = 4000
    shard_size: int = 2000  # prepare's default
    row_group_rows: int = 64  # prepare.SHARD_ROW_GROUP_ROWS
    workers: int = 8
    per_device_batch: int = 16  # global batch 128, LLaVA's finetune batch
    shuffle_row_groups: int = 16  # data.shuffle_row_groups
    shuffle_buffer: int = 256  # data.shuffle_buffer
    rows_per_call: int = 32  # data.map_batch_size: rows per preprocessed block
    epochs: int = 2
    seed: int = 0


def write_sorted_corpus(root: Path, opts: MixingOptions) -> list[str]:
    """Shards of a corpus sorted by subset, written as `prepare` writes them."""
    from vistralv_ray.data.prepare import SHARD_SCHEMA

    ids = [f"s{s}-{i}" for s in range(opts.subsets) for i in range(opts.records_per_subset)]
    message = [{"role": "user", "content": "Câu hỏi?"}, {"role": "assistant", "content": "Trả lời."}]
    files = []
    for n, start in enumerate(range(0, len(ids), opts.shard_size)):
        rows = [{"id": rid, "image": None, "messages": message} for rid in ids[start : start + opts.shard_size]]
        path = root / f"part-{n:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA), path, row_group_size=opts.row_group_rows)
        files.append(str(path))
    return files


def _local_shuffle(stream: list[str], buffer: int, batch: int, rng: np.random.Generator) -> list[list[str]]:
    """Micro-batches as a local shuffle buffer hands them out: once it holds `buffer` + `batch` rows,
    a batch drawn at random from it; at the end, the rest at random."""
    pool: list[str] = []
    batches = []
    for row in stream:
        pool.append(row)
        if len(pool) >= buffer + batch:
            picks = set(rng.choice(len(pool), batch, replace=False).tolist())
            batches.append([pool[i] for i in sorted(picks)])
            pool = [r for i, r in enumerate(pool) if i not in picks]
    rng.shuffle(pool)
    batches += [pool[i : i + batch] for i in range(0, len(pool) - batch + 1, batch)]
    return batches


def _global_batches(blocks: list[list[str]], opts: MixingOptions, buffer: int, rng) -> list[list[str]]:
    """Blocks handed to the workers in turn; a global batch is every worker's micro-batch of one step."""
    per_worker = [[row for block in blocks[w :: opts.workers] for row in block] for w in range(opts.workers)]
    micro = [_local_shuffle(rows, buffer, opts.per_device_batch, rng) for rows in per_worker]
    steps = min(len(m) for m in micro)
    return [[row for m in micro for row in m[s]] for s in range(steps)]


def _chunks(rows: list[str], size: int) -> list[list[str]]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def ours_order(files: list[str], opts: MixingOptions, epoch: int) -> list[list[str]]:
    units = row_group_units(files)
    rng = np.random.default_rng([opts.seed, epoch])
    order = [units[i] for i in rng.permutation(len(units))]
    blocks = []
    for start in range(0, len(order), opts.shuffle_row_groups):
        call = [(u["uri"], u["row_group"], u["first_row"]) for u in order[start : start + opts.shuffle_row_groups]]
        columns, _ = interleaved_rows(call, opts.seed)
        blocks += _chunks(columns["id"], opts.rows_per_call)
    return _global_batches(blocks, opts, opts.shuffle_buffer, rng)


def shards_order(files: list[str], opts: MixingOptions, epoch: int) -> list[list[str]]:
    rng = np.random.default_rng([opts.seed, epoch])
    blocks = []
    for i in rng.permutation(len(files)):
        ids = pq.read_table(files[i], columns=["id"]).column("id").to_pylist()
        blocks += _chunks(ids, opts.rows_per_call)
    return _global_batches(blocks, opts, 4 * opts.per_device_batch, rng)


def random_order(files: list[str], opts: MixingOptions, epoch: int) -> list[list[str]]:
    ids = [i for f in files for i in pq.read_table(f, columns=["id"]).column("id").to_pylist()]
    rng = np.random.default_rng([opts.seed, epoch])
    ids = [ids[i] for i in rng.permutation(len(ids))]
    size = opts.workers * opts.per_device_batch
    return [ids[i : i + size] for i in range(0, len(ids) - size + 1, size)]


def distinct_subsets(batches: list[list[str]]) -> float:
    return float(np.mean([len({rid.split("-")[0] for rid in batch}) for batch in batches]))


def measure_mixing(opts: MixingOptions) -> dict:
    """Mean distinct subsets per global batch for ours, the per-shard scheme and a random permutation."""
    with tempfile.TemporaryDirectory(prefix="vistralv-mixing-") as tmp:
        files = write_sorted_corpus(Path(tmp), opts)
        result = {}
        for name, order in (("ours", ours_order), ("shards", shards_order), ("random", random_order)):
            per_epoch = [distinct_subsets(order(files, opts, epoch)) for epoch in range(opts.epochs)]
            result[name] = round(float(np.mean(per_epoch)), 3)
    global_batch = opts.workers * opts.per_device_batch
    result["expected_random"] = round(opts.subsets * (1 - (1 - 1 / opts.subsets) ** global_batch), 3)
    result["global_batch"] = global_batch
    result["options"] = asdict(opts)
    return result
