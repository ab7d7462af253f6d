"""The streaming-memory benchmark end to end at a tiny size: child clusters, counts, a sampled peak."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_streaming_memory_streams_every_record_of_both_sizes():
    from vistralv_ray.bench.stream import streaming_memory

    out = streaming_memory(records=12, factor=2, image_size=64, consume_delay_s=0.0)
    small, large = out["runs"]
    assert (small["scale"], large["scale"]) == (1, 2)
    assert (small["records"], small["samples"]) == (12, 12) and (large["records"], large["samples"]) == (24, 24)
    assert small["rejected"] == large["rejected"] == 0
    assert large["dataset_bytes"] == 2 * small["dataset_bytes"]
    assert small["peak_pss_mb"] > 0 and out["peak_growth"] > 0  # no claim about the value at this size
