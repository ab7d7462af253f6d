"""CPU preprocessing of shard rows (runs in Ray Data actors) and their collation into train batches.

`ShardPreprocessor` reads whole shards inside the actor and hands their rows, a few at a time, to
`Preprocessor`, which checks each record again (shards may come from elsewhere), decodes and resizes or
pads the image to uint8 and tokenizes + masks the conversation. A bad record is not dropped: it
travels on with its reason, and `PackingCollate` counts it in the batch it would have been part of,
so the training loop reports every rejection.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
from ray.data.collate_fn import NumpyBatchCollateFn

from vistralv_ray.config.schema import ModelConfig
from vistralv_ray.data.images import decode_to_pixels
from vistralv_ray.data.packing import TrainBatch, layout_batch
from vistralv_ray.errors import RecordError
from vistralv_ray.text.conversation import normalize_messages


def record_key(record_id: str) -> int:
    """A compact key for a record id (resume bookkeeping keeps sets of these)."""
    return zlib.crc32(record_id.encode()) << 32 | zlib.adler32(record_id.encode())


class Preprocessor:
    """Ray Data `map_batches` callable: shard rows -> input_ids, labels, uint8 pixels, reason."""

    def __init__(self, model_cfg: dict, max_pixels: int, skip_keys_uri: str | None = None):
        from vistralv_ray.config.loader import _build
        from vistralv_ray.model.assembly import build_encoder, load_vision_config

        self.model_cfg: ModelConfig = _build(ModelConfig, model_cfg, "model")
        self.encoder = build_encoder(self.model_cfg)  # once per actor: loading a tokenizer is slow
        self.size = self.model_cfg.image_size or load_vision_config(self.model_cfg.vision_tower).image_size
        self.max_pixels = max_pixels
        # Records already trained on in a resumed epoch: left out here, before any decoding.
        self.skip_keys = load_keys(skip_keys_uri) if skip_keys_uri else frozenset()

    def __call__(self, batch: dict[str, Sequence]) -> dict[str, np.ndarray]:
        keep = [i for i, rid in enumerate(batch["id"]) if record_key(str(rid)) not in self.skip_keys]
        out_ids, out_labels, out_pixels, has_image, reasons, details = [], [], [], [], [], []
        blank = np.zeros((self.size, self.size, 3), dtype=np.uint8)
        for i in keep:
            image = batch["image"][i]
            try:
                messages = normalize_messages([dict(m) for m in batch["messages"][i]], has_image=image is not None)
                encoded = self.encoder.encode(messages)
                pixels = (
                    blank
                    if image is None
                    else decode_to_pixels(image, self.size, self.model_cfg.aspect, self.max_pixels)
                )
                out_ids.append(encoded.input_ids)
                out_labels.append(encoded.labels)
                out_pixels.append(pixels)
                has_image.append(image is not None)
                reasons.append("")
                details.append("")
            except RecordError as e:
                out_ids.append(np.zeros(0, dtype=np.int32))
                out_labels.append(np.zeros(0, dtype=np.int32))
                out_pixels.append(blank)
                has_image.append(False)
                reasons.append(e.reason)
                details.append(e.detail)
        return {
            "id": np.asarray([batch["id"][i] for i in keep], dtype=object),
            "input_ids": _ragged(out_ids),
            "labels": _ragged(out_labels),
            "pixel_values": np.stack(out_pixels) if keep else np.zeros((0, self.size, self.size, 3), np.uint8),
            "has_image": np.asarray(has_image, dtype=bool),
            "reject_reason": np.asarray(reasons, dtype=object),
            "reject_detail": np.asarray(details, dtype=object),
        }


class ShardPreprocessor:
    """Ray Data `map_batches` callable: shard URIs -> preprocessed rows, `rows_per_call` at a time.

    Reading inside the actor keeps a single buffered stage (see `pipeline.shard_dataset`); a shard
    is read one row group at a time (`prepare.SHARD_ROW_GROUP_ROWS`), not whole. A shard that
    cannot be read is an error naming it.
    """

    def __init__(self, model_cfg: dict, max_pixels: int, rows_per_call: int, skip_keys_uri: str | None = None):
        self.preprocessor = Preprocessor(model_cfg, max_pixels, skip_keys_uri)
        self.rows_per_call = rows_per_call

    def __call__(self, batch: dict[str, np.ndarray]):
        for uri in batch["uri"]:
            yield from self.shard(str(uri))

    def shard(self, uri: str):
        import pyarrow as pa
        import pyarrow.parquet as pq

        from vistralv_ray.data import storage
        from vistralv_ray.data.pipeline import SHARD_COLUMNS

        fs, path = storage.filesystem_for(uri)
        try:
            with fs.open_input_file(path) as f:
                for rows in pq.ParquetFile(f).iter_batches(batch_size=self.rows_per_call, columns=SHARD_COLUMNS):
                    out = self.preprocessor(rows.to_pydict())
                    if len(out["id"]):  # a resumed epoch may skip every row of a batch
                        yield out
        except (OSError, pa.ArrowException) as e:
            raise OSError(f"{uri}: cannot read the shard: {e}") from e


def save_keys(uri: str, keys) -> None:
    """Record keys (see `record_key`) to a .npy file, local or s3://."""
    import io

    from vistralv_ray.data import storage

    buf = io.BytesIO()
    np.save(buf, np.fromiter(keys, dtype=np.uint64))
    storage.write_bytes(uri, buf.getvalue())


def load_keys(uri: str) -> frozenset[int]:
    import io

    from vistralv_ray.data import storage

    if not storage.exists(uri):
        raise FileNotFoundError(f"{uri}: the keys of the records to skip are missing (written by rank 0 on resume)")
    return frozenset(int(k) for k in np.load(io.BytesIO(storage.read_bytes(uri))))


def _ragged(arrays: list[np.ndarray]) -> np.ndarray:
    out = np.empty(len(arrays), dtype=object)
    out[:] = arrays
    return out


class PackingCollate(NumpyBatchCollateFn):
    """Preprocessed rows -> one `TrainBatch` (packed or padded), keeping count of rejected rows."""

    def __init__(self, pad_id: int, mode: str, pack_length: int | None):
        self.pad_id = pad_id
        self.mode = mode
        self.pack_length = pack_length

    def __call__(self, batch: dict[str, np.ndarray]) -> TrainBatch:
        ids, labels, images, sample_ids, rejected = [], [], [], [], []
        for i, rid in enumerate(batch["id"]):
            rid = str(rid)
            if batch["reject_reason"][i]:
                rejected.append((rid, str(batch["reject_reason"][i]), str(batch["reject_detail"][i])))
                continue
            ids.append(np.asarray(batch["input_ids"][i]))
            labels.append(np.asarray(batch["labels"][i]))
            images.append(batch["pixel_values"][i] if batch["has_image"][i] else None)
            sample_ids.append(rid)
        image_shape = tuple(batch["pixel_values"].shape[1:])
        out = layout_batch(ids, labels, images, self.pad_id, self.mode, self.pack_length, image_shape)
        out.sample_ids = sample_ids
        out.rejected = rejected
        return out
