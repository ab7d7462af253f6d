"""The benchmarks' pure parts: length mix, non-padding fractions, window summaries, report shapes.

No timing is asserted anywhere: these check what is computed, not how fast the machine is.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from vistralv_ray.bench.data import llava_like_lengths, nonpad_fractions
from vistralv_ray.bench.train import TrainBenchOptions, summarise, windows_from_history


def test_length_mix_has_the_stated_shape():
    lengths = llava_like_lengths(5000, seed=1, image_tokens=256, max_length=2048)
    assert lengths.shape == (5000,) and lengths.min() >= 16 and lengths.max() <= 2048
    with_image = lengths[lengths >= 256 + 16]
    assert 0.9 < len(with_image) / len(lengths) <= 1.0
    text = lengths - 256  # most image records: 100-700 text tokens
    assert 0.75 < np.mean((text >= 100) & (text <= 700)) < 0.95
    assert (lengths > 1500).any(), "no long tail"
    np.testing.assert_array_equal(lengths, llava_like_lengths(5000, seed=1))


def test_packing_beats_grouping_beats_padding_on_the_mix():
    lengths = llava_like_lengths(2000, seed=0)
    f = nonpad_fractions(lengths, batch_size=8, world_size=8, max_length=2048, seed=0)
    assert f["pack"] > f["group"] > f["pad"]
    assert f["pack"] > 0.99 and f["pad"] < 0.7
    assert all(0 < v <= 1 for v in f.values())


def test_nonpad_fraction_counts_cells_of_our_layout():
    from vistralv_ray.bench.data import layout_nonpad_fraction

    lengths = np.array([8, 16, 24])
    assert layout_nonpad_fraction(lengths, [[0, 1]], "pad", None) == pytest.approx(24 / 32)
    assert layout_nonpad_fraction(lengths, [[0, 1, 2]], "pack", None) == pytest.approx(1.0)
    # Rows of at most 24 tokens: [24], [16, 8] -> 2 rows x 24 cells, all used.
    assert layout_nonpad_fraction(lengths, [[0, 1, 2]], "pack", 24) == pytest.approx(1.0)


def test_windows_from_history_drop_warmup_and_weight_by_time():
    history = [
        {"step": 5, "samples_per_s": 1.0, "tokens_per_s": 10.0, "data_wait_fraction": 0.9},  # warm-up
        {"step": 10, "samples_per_s": 40.0, "tokens_per_s": 4000.0, "data_wait_fraction": 0.0},  # 1 s
        {"step": 15, "samples_per_s": 20.0, "tokens_per_s": 2000.0, "data_wait_fraction": 0.3},  # 2 s
    ]
    out = windows_from_history(history, global_batch=8, warmup_steps=5)
    assert out["measured_steps"] == 10 and out["windows"] == 2
    assert out["median_step_s"] == pytest.approx((0.2 + 0.4) / 2)
    assert out["samples_per_s"] == pytest.approx(80 / 3)
    assert out["tokens_per_s"] == pytest.approx(8000 / 3)
    assert out["data_wait_fraction"] == pytest.approx(0.6 / 3)
    with pytest.raises(ValueError, match="warm-up"):
        windows_from_history(history[:1], global_batch=8, warmup_steps=5)


def test_bad_train_bench_options_are_refused_before_anything_runs(capsys):
    from vistralv_ray.cli.main import main

    assert main(["bench", "train", "--repeats", "0"]) == 2
    assert "--repeats: 0; allowed: >= 1" in capsys.readouterr().err
    assert main(["bench", "train", "--warmup-steps", "3", "--window", "5"]) == 2
    assert "--warmup-steps: 3; allowed: a multiple of --window (5)" in capsys.readouterr().err


def test_summarise_takes_the_median_of_per_step_times():
    out = summarise([1.0, 3.0, 2.0], [2, 2, 2], [16, 16, 16], [100, 100, 100])
    assert out["median_step_s"] == 1.0 and out["samples_per_s"] == pytest.approx(8.0)


def test_plain_loop_trains_the_same_batches(tiny_assets, demo_corpus, tmp_path):
    import torch

    from vistralv_ray.bench.train import (
        ShardBatches,
        bench_config,
        plain_batches,
        run_deepspeed_in_process,
        run_plain,
    )
    from vistralv_ray.data.prepare import PrepareOptions, prepare

    prepare(
        demo_corpus["train"],
        PrepareOptions(str(demo_corpus["images"]), str(tmp_path / "shards")),
        parallel=False,
        progress=False,
    )
    paths = {
        "llm": str(tiny_assets["llm"]),
        "vision": str(tiny_assets["vision"]),
        "shards": str(tmp_path / "shards"),
        "runs": str(tmp_path / "runs"),
    }
    opts = TrainBenchOptions(steps=2, warmup_steps=1, window=1, batch_size=4)
    cfg = bench_config(paths, opts)
    assert cfg.train.max_steps == 3 and cfg.train.log_every == 1 and cfg.data.progress_bars is False
    batches = plain_batches(cfg, 3)
    assert [b.num_samples for b in batches] == [4, 4, 4]
    assert len({id_ for b in batches for id_ in b.sample_ids}) == 12
    out = run_plain(cfg, opts)
    assert out["measured_steps"] == 2 and out["windows"] == 2 and out["tokens_per_s"] > 0
    loaded = list(torch.utils.data.DataLoader(ShardBatches(cfg, 3), batch_size=None, num_workers=1))
    assert [b.sample_ids for b in loaded] == [b.sample_ids for b in batches]  # the same batches, same order
    torch.testing.assert_close(loaded[1].input_ids, batches[1].input_ids)
    both = run_deepspeed_in_process(cfg, opts, batches)
    assert set(both) == {"deepspeed", "plain"}
    for loop in both.values():  # in turn over the same batches, the warm-up window left out of both
        assert loop["measured_steps"] == 2 and loop["windows"] == 2 and loop["samples_per_s"] > 0


def test_bench_data_json_has_the_expected_keys(capsys):
    from vistralv_ray.cli.bench import format_data
    from vistralv_ray.cli.main import main

    argv = ["bench", "data", "--json", "--images", "4", "--length-records", "200", "--memory-records", "0"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    headline = {
        "ours_samples_per_s_per_core",
        "reference_samples_per_s_per_core",
        "speedup",
        "prepared_samples_per_s_per_core",
        "prepared_speedup",
        "nonpad_fraction",
        "reference_nonpad_fraction",
        "peak_rss_mb_1x",
        "peak_rss_mb_10x",
    }
    assert set(result) == headline | {"machine", "options", "images", "packing", "memory", "mixing"}
    assert [(m["workers"], m["per_device_batch"]) for m in result["mixing"]["rows"]] == [(1, 8), (1, 16), (8, 16)]
    assert all(m["shards"] < m["ours"] <= m["random"] + 0.1 for m in result["mixing"]["rows"])
    assert result["speedup"] == pytest.approx(
        result["ours_samples_per_s_per_core"] / result["reference_samples_per_s_per_core"]
    )
    assert result["nonpad_fraction"] == result["packing"]["nonpad_fraction"]["pack"] > 0.97
    assert result["reference_nonpad_fraction"] == result["packing"]["nonpad_fraction"]["group"]
    assert result["peak_rss_mb_1x"] is None and result["peak_rss_mb_10x"] is None  # memory runs skipped
    methods = {"ours_uint8", "ours_then_normalise_float32", "hf_siglip_pil", "prepared_uint8"}
    assert set(result["images"]["methods"]) == methods
    prepared = result["images"]["prepared"]
    assert result["prepared_speedup"] == pytest.approx(
        result["prepared_samples_per_s_per_core"] / result["reference_samples_per_s_per_core"]
    )
    # Stored at the model's size, then decoded: the per-epoch path's pixels, so the same distance.
    assert prepared["max_level_difference_vs_hf"] == result["images"]["max_level_difference_vs_hf"] <= 2
    assert prepared["format"] == "PPM" and prepared["prepare_ms_per_image"] > 0
    for m in result["images"]["methods"].values():
        assert {"samples_per_s_per_core", "samples_per_s_wall", "bytes_per_sample", "dtype", "shape"} <= set(m)
    assert result["images"]["methods"]["ours_uint8"]["shape"] == [256, 256, 3]
    assert result["images"]["methods"]["prepared_uint8"]["shape"] == [256, 256, 3]
    assert result["images"]["methods"]["hf_siglip_pil"]["shape"] == [3, 256, 256]
    assert set(result["packing"]["nonpad_fraction"]) == {"pad", "group", "pack_rows_of_max_length", "pack"}
    assert "LLaVA-665K" in result["packing"]["assumption"] and result["memory"] is None
    table = format_data(result)
    assert "samples/s/core" in table and "non-pad fraction" in table and "(d) shuffling" in table
    assert "prepare --store-pixels" in table


def test_train_report_table():
    from vistralv_ray.cli.bench import format_train

    loop = {"median_step_s": 0.1, "samples_per_s": 80.0, "tokens_per_s": 9000.0}
    result = {
        "machine": {"cpus": 2, "gpu": None, "load_average_1m": 1.0, "torch": "x", "ray": "y"},
        "options": {"stage": "finetune", "batch_size": 8, "threads": 1, "steps": 20, "warmup_steps": 5, "repeats": 3},
        "model": "tiny",
        "ours": {**loop, "median_step_s": 0.13, "data_wait_fraction": 0.01},
        "plain_pytorch": loop,
        "plain_pytorch_dataloader": {**loop, "median_step_s": 0.125},
        "deepspeed_in_process": {**loop, "median_step_s": 0.102},
        "plain_pytorch_interleaved": {**loop, "median_step_s": 0.1},
        "overhead_ratio": 1.3,
        "overhead_ratios": [1.2, 1.3, 1.4],
        "overhead_ratio_vs_dataloader": 1.04,
        "deepspeed_overhead_ratio": 1.02,
    }
    text = format_train(result)
    assert "overhead ratio (ours / plain median step): 1.300 (runs: 1.200, 1.300, 1.400)" in text and "130.0" in text
    assert "DeepSpeed engine alone / plain, in turn: 1.020" in text and "102.0" in text
    assert "ours / plain with a DataLoader: 1.040" in text and "125.0" in text
    assert "3 runs each of ours and the plain loop" in text


def test_memory_sampler_sees_the_process_tree_and_shards_replicate(tmp_path, monkeypatch):
    from vistralv_ray.bench import stream
    from vistralv_ray.bench.stream import replicate_shards, sample_tree

    # The grandchild holds 50 MB until the sampler has taken a whole sample after the memory was
    # there (a handshake through two files, each wait with a deadline), not for a guessed time.
    ready, release = tmp_path / "ready", tmp_path / "release"
    grandchild = (
        f"import pathlib, time\nx = b'x' * (50 << 20)\npathlib.Path({str(ready)!r}).touch()\n"
        "deadline = time.monotonic() + 120\n"
        f"while not pathlib.Path({str(release)!r}).exists() and time.monotonic() < deadline:\n    time.sleep(0.01)\n"
    )
    code = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {grandchild!r}]).wait()"
    ready_seen, read_progress = [], stream.read_progress

    def after_each_sample(path):  # sample_tree calls it once a sample, after reading the tree's memory
        if ready_seen:  # this sample began after the grandchild said it held the memory
            release.touch()
        elif ready.exists():
            ready_seen.append(True)
        return read_progress(path)

    monkeypatch.setattr(stream, "read_progress", after_each_sample)
    proc = subprocess.Popen([sys.executable, "-c", code])
    peak = sample_tree(proc)
    assert release.exists()  # released by the sampler, not by the grandchild's deadline
    assert peak["rss"] >= 50 << 20 and peak["pss"] > 0  # the grandchild's 50 MB are in the tree's sum
    assert peak["processes"] == 2 and sum(peak["at_peak"].values()) > 0

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "part-00000.parquet").write_bytes(b"x" * 10)
    replicate_shards(tmp_path / "src", tmp_path / "x3", 3)
    assert sorted(p.name for p in (tmp_path / "x3").iterdir()) == [f"copy{c:03d}-part-00000.parquet" for c in range(3)]


def test_cli_defaults_are_the_options_defaults():
    from vistralv_ray.bench.data import DataBenchOptions
    from vistralv_ray.bench.train import TrainBenchOptions
    from vistralv_ray.cli.main import build_parser

    data = build_parser().parse_args(["bench", "data"])
    want = DataBenchOptions()
    for flag, field in (
        ("memory_records", "memory_records"),
        ("object_store_mb", "object_store_mb"),
        ("consume_delay", "consume_delay_s"),
        ("images", "images"),
        ("image_size", "image_size"),
        ("length_records", "length_records"),
        ("memory_factor", "memory_factor"),
    ):
        assert getattr(data, flag) == getattr(want, field), flag
    train = build_parser().parse_args(["bench", "train"])
    for field in ("steps", "warmup_steps", "window", "batch_size", "stage", "threads", "repeats"):
        assert getattr(train, field) == getattr(TrainBenchOptions(), field), field
