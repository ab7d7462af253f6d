"""`prepare` on Ray tasks (one per shard) failing midway: the error that stopped it is the one raised,
no task is still writing when the output is cleaned up, and nothing of the run is left in --out."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from vistralv_ray.data.prepare import PrepareOptions, TooManyRejections, prepare
from vistralv_ray.errors import RecordError

pytestmark = pytest.mark.integration


def qa():
    return [{"from": "human", "value": "<image>\nMàu gì?"}, {"from": "gpt", "value": "Đỏ."}]


@pytest.fixture()
def images(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(root / "a.jpg")
    return root


def test_a_strict_failure_in_one_task_leaves_no_shard_of_the_others(ray_local, tmp_path, images):
    records = [{"id": f"r{i}", "image": "a.jpg", "conversations": qa()} for i in range(40)]
    records[-1]["image"] = "missing.jpg"  # in the last of eight shards: the others are written first
    src = tmp_path / "data.json"
    src.write_text(json.dumps(records))
    out = tmp_path / "out"
    with pytest.raises(RecordError, match="record 'r39': missing_image"):
        prepare(src, PrepareOptions(str(images), str(out), shard_size=5, strict=True), progress=False)
    assert not out.exists()


def test_too_many_rejections_across_tasks_stop_the_run(ray_local, tmp_path, images):
    records = [{"id": f"r{i}", "image": f"{i}.jpg", "conversations": qa()} for i in range(300)]
    src = tmp_path / "data.json"
    src.write_text(json.dumps(records))
    out = tmp_path / "out"
    opts = PrepareOptions(str(images), str(out), shard_size=50, max_rejected_fraction=0.5)
    with pytest.raises(TooManyRejections, match="missing_image"):
        prepare(src, opts, progress=False)
    assert not out.exists()
