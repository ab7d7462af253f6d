"""Batch layout: pack several samples per row (or pad one per row) so little compute goes to padding.

Packed rows carry position ids that restart at 0 for every sample and no attention mask:
transformers then confines attention to each sample (flash-attention varlen on GPU, a block-diagonal
mask with SDPA/eager). Targets are shifted per sample, so no sample ever predicts its neighbour's
first token, and the loss of a packed batch equals the loss of the same samples unpacked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

IGNORE_INDEX = -100
PAD_MULTIPLE = 8


def pack_sequences(lengths: list[int], capacity: int | None) -> list[list[int]]:
    """Group sample indices into rows of at most `capacity` tokens (first-fit decreasing).

    `capacity=None` puts every sample in one row. Within a row, samples keep their input order.
    """
    if capacity is None:
        return [list(range(len(lengths)))] if lengths else []
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if lengths[i] > capacity:
            raise ValueError(f"sample of {lengths[i]} tokens does not fit a row of {capacity}")
        for r, space in enumerate(free):
            if lengths[i] <= space:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    return [sorted(row) for row in rows]


def shifted_targets(labels: np.ndarray) -> np.ndarray:
    """target[t] is the label of token t+1 within the same sample; the last position predicts nothing."""
    out = np.full_like(labels, IGNORE_INDEX)
    out[:-1] = labels[1:]
    return out


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass
class TrainBatch:
    """One micro-batch on its way to the model; `pixel_values` stay uint8 until the device."""

    input_ids: torch.Tensor  # [rows, T] int64
    targets: torch.Tensor  # [rows, T] int64, already shifted
    position_ids: torch.Tensor  # [rows, T] int64
    attention_mask: torch.Tensor | None  # [rows, T] for padded rows; None for packed rows
    pixel_values: torch.Tensor  # [images, H, W, 3] uint8, in the order image tokens appear
    num_samples: int
    num_tokens: int  # non-padding tokens
    num_target_tokens: int
    sum_sq_lengths: int = 0  # sum of squared sample lengths: the attention cost of packed samples
    sample_ids: list[str] = field(default_factory=list)
    sample_keys: list[int] = field(default_factory=list)  # resume keys (`preprocess.row_key`), one per sample
    rejected: list[tuple[str, str, str]] = field(default_factory=list)  # (id, reason, detail)

    @property
    def nonpad_fraction(self) -> float:
        cells = self.input_ids.numel()
        return self.num_tokens / cells if cells else 0.0

    def to(self, device: torch.device | str) -> TrainBatch:
        def move(t):
            return None if t is None else t.to(device, non_blocking=True)

        return TrainBatch(
            input_ids=move(self.input_ids),
            targets=move(self.targets),
            position_ids=move(self.position_ids),
            attention_mask=move(self.attention_mask),
            pixel_values=move(self.pixel_values),
            num_samples=self.num_samples,
            num_tokens=self.num_tokens,
            num_target_tokens=self.num_target_tokens,
            sum_sq_lengths=self.sum_sq_lengths,
            sample_ids=self.sample_ids,
            sample_keys=self.sample_keys,
            rejected=self.rejected,
        )


def layout_batch(
    input_ids: list[np.ndarray],
    labels: list[np.ndarray],
    images: list[np.ndarray | None],
    pad_id: int,
    mode: str,
    pack_length: int | None,
    image_shape: tuple[int, int, int],
) -> TrainBatch:
    """Lay samples out as packed (`mode="pack"`) or padded (`mode="pad"`) rows."""
    lengths = [len(x) for x in input_ids]
    rows = pack_sequences(lengths, pack_length) if mode == "pack" else [[i] for i in range(len(lengths))]
    width = _round_up(max((sum(lengths[i] for i in row) for row in rows), default=0), PAD_MULTIPLE)
    n_rows = len(rows)
    ids = np.full((n_rows, width), pad_id, dtype=np.int64)
    targets = np.full((n_rows, width), IGNORE_INDEX, dtype=np.int64)
    positions = np.zeros((n_rows, width), dtype=np.int64)
    mask = np.zeros((n_rows, width), dtype=np.int64) if mode == "pad" else None
    order: list[int] = []
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            n = lengths[i]
            ids[r, start : start + n] = input_ids[i]
            targets[r, start : start + n] = shifted_targets(np.asarray(labels[i]))
            positions[r, start : start + n] = np.arange(n)
            if mask is not None:
                mask[r, start : start + n] = 1
            start += n
            order.append(i)
        # The padding tail is its own segment (positions restart), so it never attends to samples.
        positions[r, start:] = np.arange(width - start)
    pixels = [images[i] for i in order if images[i] is not None]
    pixel_values = np.stack(pixels) if pixels else np.zeros((0, *image_shape), dtype=np.uint8)
    return TrainBatch(
        input_ids=torch.from_numpy(ids),
        targets=torch.from_numpy(targets),
        position_ids=torch.from_numpy(positions),
        attention_mask=None if mask is None else torch.from_numpy(mask),
        pixel_values=torch.from_numpy(pixel_values),
        num_samples=len(lengths),
        num_tokens=int(sum(lengths)),
        num_target_tokens=int((targets != IGNORE_INDEX).sum()),
        sum_sq_lengths=int(sum(n * n for n in lengths)),
    )


def length_grouped_batches(lengths: list[int], batch_size: int, world_size: int, seed: int = 0) -> list[list[int]]:
    """LLaVA's length grouping (the reference): megabatches of world x batch samples sorted by length."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(lengths))
    mega = batch_size * world_size
    batches = []
    for s in range(0, len(perm), mega):
        group = sorted(perm[s : s + mega].tolist(), key=lambda i: -lengths[i])
        batches += [group[k : k + batch_size] for k in range(0, len(group), batch_size)]
    return batches
