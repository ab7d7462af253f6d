"""CPU preprocessing of shard rows (runs in Ray Data actors) and their collation into train batches.

`ShardPreprocessor` reads whole shards inside the actor and hands their rows, a few at a time, to
`Preprocessor`, which checks each record again (shards may come from elsewhere), decodes and resizes or
pads the image to uint8 and tokenizes + masks the conversation. A bad record is not dropped: it
travels on with its reason, and `PackingCollate` counts it in the batch it would have been part of,
so the training loop reports every rejection.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from ray.data.collate_fn import NumpyBatchCollateFn

from vistralv_ray.config.schema import DEFAULT_MAX_MESSAGE_CHARS, DEFAULT_MAX_RECORD_CHARS, ModelConfig
from vistralv_ray.data.images import decode_to_pixels, pixels_for_model
from vistralv_ray.data.packing import TrainBatch, layout_batch
from vistralv_ray.data.shards import interleaved_rows, read_row_group, record_key, row_group_units
from vistralv_ray.errors import RecordError
from vistralv_ray.text.conversation import normalize_messages


class Preprocessor:
    """Ray Data `map_batches` callable: shard rows -> input_ids, labels, uint8 pixels, reason."""

    def __init__(
        self,
        model_cfg: dict,
        max_pixels: int,
        skip_keys_uri: str | None = None,
        text_limits: tuple[int, int] = (DEFAULT_MAX_MESSAGE_CHARS, DEFAULT_MAX_RECORD_CHARS),
    ):
        from vistralv_ray.config.loader import _build
        from vistralv_ray.text.encoder import build_encoder

        self.model_cfg: ModelConfig = _build(ModelConfig, model_cfg, "model")
        self.encoder = build_encoder(self.model_cfg)  # once per actor: loading a tokenizer is slow
        # Pad colour: the image mean, as the export pads. Shards of `prepare --store-pixels` hold images
        # already at this size, square: decoded, they pass through unchanged (preflight checks the size).
        pixels = pixels_for_model(self.model_cfg)
        self.size, self.pad_fill = pixels.size, pixels.fill
        self.max_pixels = max_pixels
        self.text_limits = text_limits  # data.max_message_chars, data.max_record_chars
        # Records already trained on in a resumed epoch: left out here, before any decoding.
        self.skip_keys = load_keys(skip_keys_uri) if skip_keys_uri else frozenset()

    def __call__(self, batch: dict[str, Sequence], keys: Sequence[int] | None = None) -> dict[str, np.ndarray]:
        """`keys`: each row's resume key (`row_key`); without them, rows are keyed by their ids."""
        if keys is None:
            keys = [record_key(str(rid)) for rid in batch["id"]]
        keep = [i for i, key in enumerate(keys) if key not in self.skip_keys]
        out_ids, out_labels, out_pixels, has_image, reasons, details = [], [], [], [], [], []
        blank = np.zeros((self.size, self.size, 3), dtype=np.uint8)
        for i in keep:
            image = batch["image"][i]
            try:
                turns = [dict(m) for m in batch["messages"][i]]
                messages = normalize_messages(turns, image is not None, *self.text_limits)
                encoded = self.encoder.encode(messages)
                pixels = (
                    blank
                    if image is None
                    else decode_to_pixels(image, self.size, self.model_cfg.aspect, self.max_pixels, self.pad_fill)
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
            "key": np.asarray([keys[i] for i in keep], dtype=np.uint64),
            "input_ids": _ragged(out_ids),
            "labels": _ragged(out_labels),
            "pixel_values": np.stack(out_pixels) if keep else np.zeros((0, self.size, self.size, 3), np.uint8),
            "has_image": np.asarray(has_image, dtype=bool),
            "reject_reason": np.asarray(reasons, dtype=object),
            "reject_detail": np.asarray(details, dtype=object),
        }


class ShardPreprocessor:
    """Ray Data `map_batches` callable: row groups of shards -> preprocessed rows, `rows_per_call` at a time.

    Reading inside the actor keeps a single buffered stage (see `pipeline.shard_dataset`). Each call
    gets a few row groups (`data.shuffle_row_groups`, from `shards.row_group_units`), drawn from all
    shards in a new order every epoch; with `shuffle_seed` their rows are interleaved at random, so a
    global batch mixes many places of the corpus (a corpus sorted by source is not trained source by
    source). A shard that cannot be read is an error naming it.
    """

    def __init__(
        self,
        model_cfg: dict,
        max_pixels: int,
        rows_per_call: int,
        skip_keys_uri: str | None = None,
        shuffle_seed: int | None = None,
        placement_uri: str | None = None,
        text_limits: tuple[int, int] = (DEFAULT_MAX_MESSAGE_CHARS, DEFAULT_MAX_RECORD_CHARS),
    ):
        self.preprocessor = Preprocessor(model_cfg, max_pixels, skip_keys_uri, text_limits)
        self.rows_per_call = rows_per_call
        self.shuffle_seed = shuffle_seed
        if placement_uri:  # the node this actor runs on, once (`placement`)
            from vistralv_ray.data.placement import record_node

            record_node(placement_uri, "preprocess")

    def __call__(self, batch: dict[str, np.ndarray]):
        if "row_group" not in batch:  # whole shards, in order, one row group at a time
            for uri in batch["uri"]:
                try:
                    units = row_group_units([str(uri)])
                except Exception as e:
                    raise OSError(f"{uri}: cannot read the shard: {e}") from e
                for unit in units:
                    yield from self.rows(*read_row_group(unit["uri"], unit["row_group"], unit["first_row"]))
            return
        units = [(str(u), int(g), int(f)) for u, g, f in zip(batch["uri"], batch["row_group"], batch["first_row"])]
        yield from self.rows(*interleaved_rows(units, self.shuffle_seed))

    def rows(self, columns: dict[str, list], keys: list[int]):
        for start in range(0, len(keys), self.rows_per_call):
            chunk = {name: values[start : start + self.rows_per_call] for name, values in columns.items()}
            out = self.preprocessor(chunk, keys[start : start + self.rows_per_call])
            if len(out["id"]):  # a resumed epoch may skip every row of a chunk
                yield out


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
        ids, labels, images, sample_ids, sample_keys, rejected = [], [], [], [], [], []
        for i, rid in enumerate(batch["id"]):
            rid = str(rid)
            if batch["reject_reason"][i]:
                rejected.append((rid, str(batch["reject_reason"][i]), str(batch["reject_detail"][i])))
                continue
            ids.append(np.asarray(batch["input_ids"][i]))
            labels.append(np.asarray(batch["labels"][i]))
            images.append(batch["pixel_values"][i] if batch["has_image"][i] else None)
            sample_ids.append(rid)
            sample_keys.append(int(batch["key"][i]) if "key" in batch else record_key(rid))
        image_shape = tuple(batch["pixel_values"].shape[1:])
        out = layout_batch(ids, labels, images, self.pad_id, self.mode, self.pack_length, image_shape)
        out.sample_ids = sample_ids
        out.sample_keys = sample_keys
        out.rejected = rejected
        return out
