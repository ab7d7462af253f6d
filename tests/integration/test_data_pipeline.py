"""Round trip: LLaVA JSON -> `prepare` shards -> Ray Data preprocessing actors -> training batches.

The loss must fall on exactly the assistant answers and their `</s>`, for image and text-only
records alike, however the batch is laid out; and every input record must end up either in a
batch or counted as rejected (by `prepare` or by the preprocessing actors), never lost.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from vistralv_ray.config import config_from_dict
from vistralv_ray.data.packing import IGNORE_INDEX
from vistralv_ray.data.prepare import REJECTED, PrepareOptions, prepare
from vistralv_ray.data.preprocess import PackingCollate

pytestmark = pytest.mark.integration


def turns(*pairs: str) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(pairs)]


@pytest.fixture(scope="module")
def source(demo_corpus, tmp_path_factory) -> Path:
    records = json.loads(Path(demo_corpus["train"]).read_text())[:10]
    records += [
        {"id": "text-one", "conversations": turns("Xin chào, bạn khỏe không?", "Tôi khỏe, cảm ơn bạn.")},
        # Multi-turn, ending in a question without an answer: that turn is dropped, not the record.
        {
            "id": "text-multi",
            "conversations": turns(
                "Một cộng một bằng mấy?", "Bằng hai.", "Còn hai cộng hai?", "Bằng bốn.", "Cảm ơn nhé?"
            ),
        },
        {
            "id": "text-system",
            "conversations": [
                {"from": "system", "value": "Trả lời thật ngắn."},
                *turns("Thủ đô Việt Nam là gì?", "Hà Nội."),
            ],
        },
        {"id": "image-missing", "image": "nope.jpg", "conversations": turns("<image>\nMàu gì?", "Màu đỏ.")},
        {"id": "roles-swapped", "conversations": [{"from": "gpt", "value": "Chào."}, {"from": "human", "value": "?"}]},
        {"id": "empty-answer", "conversations": turns("Bạn là ai?", "   ")},
        # Within `prepare`'s checks (no model given), but over max_length once tokenized: the
        # preprocessing actors reject it and the batch it travels in counts it.
        {"id": "text-too-long", "conversations": turns("Kể một câu chuyện dài.", " ".join(["một con mèo"] * 200))},
    ]
    path = tmp_path_factory.mktemp("roundtrip") / "mixed.json"
    path.write_text(json.dumps(records, ensure_ascii=False))
    return path


class BothLayouts(NumpyBatchCollateFn):
    """One pipeline pass, both layouts of each batch: one sample per row, and packed."""

    def __init__(self, pad_id: int):
        self.pad = PackingCollate(pad_id, "pad", None)
        self.pack = PackingCollate(pad_id, "pack", None)

    def __call__(self, batch):
        return self.pad(batch), self.pack(batch)


def supervised_runs(tokenizer, targets: np.ndarray) -> list[str]:
    """Decoded runs of consecutive target tokens: one per assistant turn."""
    runs, current = [], []
    for t in [*targets.tolist(), IGNORE_INDEX]:
        if t != IGNORE_INDEX:
            current.append(t)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs


def test_targets_are_exactly_the_answers_and_every_record_is_accounted_for(
    ray_local, source, demo_corpus, tiny_assets, tmp_path
):
    from vistralv_ray.data.pipeline import build_datasets
    from vistralv_ray.text.encoder import build_tokenizer

    out = tmp_path / "shards"
    manifest = prepare(source, PrepareOptions(str(demo_corpus["images"]), str(out), shard_size=5), progress=False)
    cfg = config_from_dict(
        {
            "model": {
                "language_model": str(tiny_assets["llm"]),
                "vision_tower": str(tiny_assets["vision"]),
                "template": "vistral",
                "aspect": "pad",
                "max_length": 256,
            },
            "data": {"train": [str(out)], "shuffle": False, "preprocess_cpus_per_actor": 0.5, "max_block_mb": 2},
        }
    )
    datasets, counts = build_datasets(cfg)
    assert counts["train"] == manifest["records_out"]
    # The block cap travels with the dataset's own context (Ray Train executes the split with it).
    assert datasets["train"].context.target_max_block_size == 2 << 20
    tokenizer = build_tokenizer(cfg.model)[0]
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    records = {r["id"]: r for r in json.loads(source.read_text())}
    answers = {rid: [t["value"] for t in r["conversations"] if t["from"] == "gpt"] for rid, r in records.items()}

    seen, rejected_in_batches = [], {}
    collate = BothLayouts(tokenizer.pad_token_id)
    for padded, packed in datasets["train"].iter_torch_batches(batch_size=4, collate_fn=collate):
        assert padded.sample_ids == packed.sample_ids and padded.rejected == packed.rejected
        rejected_in_batches.update({rid: reason for rid, reason, _ in padded.rejected})
        seen += padded.sample_ids
        # One sample per row: its target runs are its answers, each followed by </s>, nothing else.
        expected_runs = []
        for row, rid in enumerate(padded.sample_ids):
            want = [f" {a} {tokenizer.eos_token}" for a in answers[rid]]
            assert supervised_runs(tokenizer, padded.targets[row].numpy()) == want, rid
            expected_runs += want
            n_image_tokens = int((padded.input_ids[row] == image_id).sum())
            assert n_image_tokens == (16 if "image" in records[rid] else 0), rid
        assert padded.pixel_values.shape[0] == sum("image" in records[rid] for rid in padded.sample_ids)
        assert padded.pixel_values.dtype == torch.uint8  # normalised on the device, not here
        # Packed: split rows where positions restart; the same answers, however they were packed.
        packed_runs, starts = [], 0
        for row in range(packed.input_ids.shape[0]):
            positions = packed.position_ids[row].numpy()
            bounds = [*np.flatnonzero(positions == 0).tolist(), len(positions)]
            for a, b in zip(bounds, bounds[1:]):
                starts += int(packed.input_ids[row, a] == tokenizer.bos_token_id)
                packed_runs += supervised_runs(tokenizer, packed.targets[row, a:b].numpy())
        assert Counter(packed_runs) == Counter(expected_runs)
        assert starts == packed.num_samples == padded.num_samples
        assert packed.num_target_tokens == padded.num_target_tokens

    rejected_by_prepare = {r["id"]: r["reason"] for r in map(json.loads, (out / REJECTED).read_text().splitlines())}
    assert rejected_by_prepare == {
        "image-missing": "missing_image",
        "roles-swapped": "roles_out_of_order",
        "empty-answer": "empty_text",
    }
    assert rejected_in_batches == {"text-too-long": "too_long"}
    assert len(seen) == len(set(seen))
    assert sorted([*seen, *rejected_in_batches, *rejected_by_prepare]) == sorted(records)
    assert {"text-one", "text-multi", "text-system"} <= set(seen)
