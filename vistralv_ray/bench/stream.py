"""Peak memory of the streaming pipeline for a dataset and one N times larger (the bounded-memory claim).

Each size runs in a fresh process (`python -m vistralv_ray.bench.stream SPEC`) that starts its own
local Ray cluster, streams the shards through `build_datasets` (read_parquet -> Preprocessor
actors) and collates them with `PackingCollate`, as a training worker does, while consuming more
slowly than the pipeline produces. The parent samples the whole process tree (driver, GCS, raylet,
read and preprocessing workers) with psutil and keeps the peak of the summed proportional set size
(PSS: shared pages, the object store's included, split between the processes that map them).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from vistralv_ray.logging import get_logger
from vistralv_ray.ray_runtime import init_ray

log = get_logger(__name__)

SAMPLE_INTERVAL_S = 0.5
STARTUP_TIMEOUT = "timed out during startup"  # Ray's message when a fresh node misses its 30 s deadline
CAPTION = "Một bức ảnh có nhiều hình màu trên nền chuyển sắc; các hình nằm rải rác, có hình tròn và hình vuông."


def write_corpus(work: Path, records: int, seed: int) -> tuple[Path, Path]:
    """A LLaVA JSON of `records` image records over synthetic 640x480 photos; (json, image root)."""
    from vistralv_ray.bench.inputs import synthetic_photos

    root = work / "images"
    root.mkdir(parents=True)
    photos = synthetic_photos(min(records, 32), seed=seed)
    for k, data in enumerate(photos):
        (root / f"photo-{k:03d}.jpg").write_bytes(data)
    rows = [
        {
            "id": f"r{i:06d}",
            "image": f"photo-{i % len(photos):03d}.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nMô tả bức ảnh."},
                {"from": "gpt", "value": CAPTION},
            ],
        }
        for i in range(records)
    ]
    path = work / "corpus.json"
    path.write_text(json.dumps(rows, ensure_ascii=False))
    return path, root


def replicate_shards(src: Path, dst: Path, factor: int) -> None:
    """`factor` full copies of every shard: a dataset `factor` times as large, byte for byte."""
    from vistralv_ray.data.storage import SHARD_MANIFEST

    dst.mkdir(parents=True)
    names = []
    for shard in sorted(src.glob("*.parquet")):
        for copy in range(factor):
            names.append(f"copy{copy:03d}-{shard.name}")
            shutil.copyfile(shard, dst / names[-1])
    if (src / SHARD_MANIFEST).is_file():
        # Written last, as `prepare` does: the pipeline takes a shard folder's list from its manifest.
        records = {s["name"]: s["records"] for s in json.loads((src / SHARD_MANIFEST).read_text())["shards"]}
        shards = [{"name": n, "records": records[n.split("-", 1)[1]]} for n in names]
        (dst / SHARD_MANIFEST).write_text(json.dumps({"replicated_from": str(src), "factor": factor, "shards": shards}))


def read_progress(path: Path | None) -> int:
    try:
        return int(path.read_text()) if path is not None else 0
    except (OSError, ValueError):
        return 0


def sample_tree(proc: subprocess.Popen, progress: Path | None = None) -> dict:
    """Peaks of the summed PSS and RSS (bytes) of `proc` and its descendants until it exits, the
    largest number of processes seen, which processes held the memory at the PSS peak, and the
    series of (records consumed so far, PSS) when the child reports its progress in `progress`."""
    root = psutil.Process(proc.pid)
    peak = {"pss": 0, "rss": 0, "processes": 0, "at_peak": {}, "series": []}
    while proc.poll() is None:
        pss = rss = 0
        by_name: dict[str, float] = {}
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for p in tree:
            try:
                info = p.memory_full_info()
                name = p.name()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            pss += getattr(info, "pss", info.rss)
            rss += info.rss
            by_name[name] = by_name.get(name, 0) + getattr(info, "pss", info.rss) / 2**20
        if pss > peak["pss"]:
            peak.update(pss=pss, at_peak={k: round(v) for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])})
        peak["rss"] = max(peak["rss"], rss)
        peak["processes"] = max(peak["processes"], len(tree))
        peak["series"].append((read_progress(progress), pss))
        time.sleep(SAMPLE_INTERVAL_S)
    return peak


def measure(spec: dict, attempts: int = 3) -> dict:
    """Run one streaming pass in a child process and return its counts with the tree's peak memory.

    A pass whose Ray node missed its fixed startup deadline (an overloaded machine, nothing to do
    with the pipeline) is retried; any other failure is raised.
    """
    for attempt in range(1, attempts + 1):
        started = time.perf_counter()
        with (
            tempfile.TemporaryDirectory() as tmp,
            tempfile.TemporaryFile("w+") as out,
            tempfile.TemporaryFile("w+") as err,
        ):
            progress = Path(tmp) / "progress"
            cmd = [sys.executable, "-m", "vistralv_ray.bench.stream", json.dumps({**spec, "progress": str(progress)})]
            proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
            peak = sample_tree(proc, progress)
            out.seek(0)
            err.seek(0)
            lines = out.read().strip().splitlines()
            if proc.returncode == 0 and lines:
                break
            stderr = err.read()
        if STARTUP_TIMEOUT not in stderr or attempt == attempts:
            raise RuntimeError(f"streaming pass failed (exit {proc.returncode}):\n{stderr[-4000:]}")
        log.warning("the Ray node of the streaming pass missed its startup deadline (machine busy?); retrying")
    result = json.loads(lines[-1])
    # Bounded memory shows as a plateau: the second half of the stream peaks no higher than the first.
    half = result["samples"] / 2
    first = [pss for done, pss in peak["series"] if 0 < done < half]
    second = [pss for done, pss in peak["series"] if done >= half]
    result.update(
        peak_pss_mb_first_half=max(first, default=0) / 2**20,
        peak_pss_mb_second_half=max(second, default=0) / 2**20,
        peak_pss_mb=peak["pss"] / 2**20,
        peak_rss_sum_mb=peak["rss"] / 2**20,
        max_processes=peak["processes"],
        pss_mb_by_process_at_peak=peak["at_peak"],
        wall_s=time.perf_counter() - started,
    )
    return result


def streaming_memory(
    records: int, factor: int, image_size: int, consume_delay_s: float, object_store_mb: int = 512, seed: int = 0
) -> dict:
    """Peak memory of the pipeline over `records` records and over `factor` times as many.

    The object store is fixed at `object_store_mb` (0: Ray's default, 30% of RAM): Ray Data
    buffers blocks up to a share of it when the consumer is slower than the pipeline, so the store
    size, not the dataset, sets the ceiling.
    """
    from vistralv_ray.data.prepare import PrepareOptions, prepare
    from vistralv_ray.model.tiny import make_tiny

    with tempfile.TemporaryDirectory(prefix="vistralv-bench-") as tmp:
        work = Path(tmp)
        assets = make_tiny(work / "tiny")
        corpus, images = write_corpus(work, records, seed)
        prepare(corpus, PrepareOptions(str(images), str(work / "x1"), shard_size=50), parallel=False, progress=False)
        replicate_shards(work / "x1", work / f"x{factor}", factor)
        runs = []
        for scale in (1, factor):
            shards = work / f"x{scale}"
            spec = {
                "shards": str(shards),
                "llm": str(assets["llm"]),
                "vision": str(assets["vision"]),
                "image_size": image_size,
                "batch_size": 8,
                "consume_delay_s": consume_delay_s,
                "object_store_mb": object_store_mb,
            }
            log.info("streaming %d records through the pipeline (x%d)", records * scale, scale)
            run = measure(spec)
            run["scale"] = scale
            run["dataset_bytes"] = sum(f.stat().st_size for f in shards.glob("*.parquet"))
            run["decoded_pixels_mb_if_materialised"] = run["records"] * image_size**2 * 3 / 2**20
            runs.append(run)
    small, large = runs
    return {
        "method": "fresh process per size; peak of summed PSS over the process tree, sampled every "
        f"{SAMPLE_INTERVAL_S}s; consumer sleeps {consume_delay_s}s per batch of 8; object store "
        + (f"{object_store_mb} MB" if object_store_mb else "Ray's default (30% of RAM)"),
        "runs": runs,
        "peak_growth": large["peak_pss_mb"] / small["peak_pss_mb"],
    }


def consume(spec: dict) -> dict:
    """Child side: stream the shards through the real pipeline and collate like a training worker."""
    import ray

    from vistralv_ray.config import config_from_dict
    from vistralv_ray.data.pipeline import apply_ray_data_env, build_datasets
    from vistralv_ray.data.preprocess import PackingCollate
    from vistralv_ray.text.encoder import build_tokenizer

    store = spec["object_store_mb"] << 20 or None  # 0: Ray's default, 30% of RAM
    apply_ray_data_env()
    init_ray(what="bench data", num_cpus=4, object_store_memory=store, include_dashboard=False)
    cfg = config_from_dict(
        {
            "model": {"language_model": spec["llm"], "vision_tower": spec["vision"], "image_size": spec["image_size"]},
            "data": {"train": [spec["shards"]], "shuffle": False, "per_device_batch": spec["batch_size"]},
        }
    )
    datasets, counts = build_datasets(cfg)
    tokenizer, _ = build_tokenizer(cfg.model)
    collate = PackingCollate(tokenizer.pad_token_id, "pack", None)
    samples = rejected = batches = 0
    progress = Path(spec["progress"])
    started = time.perf_counter()
    for batch in datasets["train"].iter_torch_batches(batch_size=spec["batch_size"], collate_fn=collate):
        samples += batch.num_samples
        rejected += len(batch.rejected)
        batches += 1
        progress.write_text(str(samples))
        time.sleep(spec["consume_delay_s"])
    seconds = time.perf_counter() - started
    ray.shutdown()
    return {
        "records": counts["train"],
        "samples": samples,
        "rejected": rejected,
        "batches": batches,
        "stream_s": seconds,
    }


if __name__ == "__main__":
    print(json.dumps(consume(json.loads(sys.argv[1]))))
