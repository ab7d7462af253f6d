"""Ray Data pipelines from Parquet shards (local or S3) to preprocessed rows, streamed to training.

shard URIs -> ShardPreprocessor actors on CPUs (read, decode, resize/pad, tokenize, mask) -> the trainer's
`get_dataset_shard(...).iter_torch_batches(collate_fn=PackingCollate)`. Everything streams: the
dataset is never materialised, so memory stays bounded whatever its size.
"""

from __future__ import annotations

import dataclasses
import os

import pyarrow.parquet as pq

from vistralv_ray.config.schema import Config
from vistralv_ray.data import storage
from vistralv_ray.data.shards import row_group_units

# Ray 2.60's read_parquet (eval reads its shards with it) starts RAY_DATA_PARQUET_FOOTER_NUM_ACTORS
# (default 32) footer-reading actors, each a Python process, every time a dataset executes. On a 2-core
# machine that took the first batch of a 240-file read from 6 s to 32 s; two actors, each with 128
# concurrent reads, list thousands of shards quickly.
# Arrow's default allocator (jemalloc) keeps freed pages: a worker reading shards grew by ~300 MB
# more over a 10x longer stream with it than with the system allocator.
# The variables must reach Ray's workers.
RAY_DATA_ENV = {"RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "2", "ARROW_DEFAULT_MEMORY_POOL": "system"}


def apply_ray_data_env() -> None:
    """Before a local `ray.init`: its processes inherit these (a value already set is kept)."""
    for key, value in RAY_DATA_ENV.items():
        os.environ.setdefault(key, value)


def shard_files(uris: list[str]) -> list[str]:
    if not uris:
        raise FileNotFoundError("no data given: set data.train (and data.eval) to shard files or directories")
    return storage.list_parquet(uris)


def count_records(files: list[str]) -> int:
    """Rows in the shards, read from the Parquet footers only."""
    total = 0
    for uri in files:
        fs, path = storage.filesystem_for(uri)
        with fs.open_input_file(path) as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total


def shard_dataset(units: list[dict], cfg: Config, shuffle: bool):
    """One row per shard row group (`shards.row_group_units`): the preprocessing actors read the shards.

    Reading them in a separate Ray Data stage (`read_parquet`) let Ray 2.60 read ahead of a slow
    consumer into the next stage's queue, past the pipeline's object-store budget: the reading
    worker grew to ~1 GB and the store spilled on a 10x longer stream. With the read inside the
    actor, only preprocessed blocks are buffered, and Ray Data's budget bounds those.
    """
    import ray.data

    ds = ray.data.from_items(units, override_num_blocks=len(units))
    if shuffle:  # a new row-group order every epoch, reproducible from the seed
        seed = ray.data.RandomSeedConfig(seed=cfg.train.seed, reseed_after_execution=True)
        ds = ds.randomize_block_order(seed=seed)
    return ds


def preprocess(ds, cfg: Config, shuffle: bool, skip_keys_uri: str | None = None, placement_uri: str | None = None):
    import ray.data

    from vistralv_ray.data.preprocess import ShardPreprocessor

    return ds.map_batches(
        ShardPreprocessor,
        fn_constructor_kwargs={
            "model_cfg": dataclasses.asdict(cfg.model),
            "max_pixels": cfg.data.max_image_pixels,
            "rows_per_call": cfg.data.map_batch_size,
            "skip_keys_uri": skip_keys_uri,
            "shuffle_seed": cfg.train.seed if shuffle else None,
            "placement_uri": placement_uri,
            "text_limits": (cfg.data.max_message_chars, cfg.data.max_record_chars),
        },
        batch_size=cfg.data.shuffle_row_groups if shuffle else 1,  # row groups per call, interleaved
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.data.preprocess_actors),
        num_cpus=cfg.data.preprocess_cpus_per_actor,
        resources=cfg.data.preprocess_resources or None,
    )


def build_datasets(
    cfg: Config, resume_skip_uri: str | None = None, placement_uri: str | None = None
) -> tuple[dict, dict[str, int]]:
    """The Ray datasets for `TorchTrainer(datasets=...)` and their record counts.

    With `resume_skip_uri`, a third dataset, `train_resume`, is the training data without the
    records whose keys the file at that URI lists (written by rank 0 after it restored a
    checkpoint, read by the preprocessing actors when the dataset starts). Filtering before Ray
    Train splits the data keeps the rest of a resumed epoch evenly spread over the workers. Ray
    Train creates a dataset's split only when a worker asks for it, so a run that does not resume
    never executes it. With `placement_uri`, every preprocessing actor records its node there
    (`placement.record_node`).
    """
    datasets, counts = {}, {}
    for name, uris, shuffle in (("train", cfg.data.train, cfg.data.shuffle), ("eval", cfg.data.eval, False)):
        if not uris:
            continue
        units = row_group_units(shard_files(uris))
        counts[name] = sum(u["rows"] for u in units)
        datasets[name] = _configure(
            preprocess(shard_dataset(units, cfg, shuffle), cfg, shuffle, placement_uri=placement_uri), cfg
        )
        if name == "train" and resume_skip_uri:
            resumed = preprocess(shard_dataset(units, cfg, shuffle), cfg, shuffle, resume_skip_uri, placement_uri)
            datasets["train_resume"] = _configure(resumed, cfg)
    if "train" not in datasets:
        raise FileNotFoundError("data.train: no training shards given")
    return datasets, counts


def _configure(ds, cfg: Config):
    # Each dataset carries its own copy of the DataContext, which Ray Train's split executes
    # with: setting it here leaves other pipelines in this process as they are.
    ds.context.enable_progress_bars = cfg.data.progress_bars

    ds.context.target_max_block_size = cfg.data.max_block_mb << 20
    return ds


def ingest_options(cfg: Config, names) -> dict:
    """Ray Train's execution options per dataset (Train replaces each dataset's own with these): Ray
    Data's ingest defaults, and for data that is not shuffled, its order kept. Ray Data otherwise hands
    blocks on as they finish, and a resumed run trained the rest of a shard in another order than an
    uninterrupted one."""
    import ray.train

    options = {}
    for name in names:
        opts = ray.train.DataConfig.default_ingest_options()
        opts.preserve_order = not (cfg.data.shuffle and name.startswith("train"))
        options[name] = opts
    return options
