"""`bench data`: our data path against its baselines, measured side by side in one run.

Three figures: (a) image preprocessing throughput per CPU core, our decode path (the exported
processor's pixels, uint8 out) against transformers' PIL `SiglipImageProcessor`, with the largest
pixel difference between the two, and the path of shards prepared at the model's size (`prepare
--store-pixels`: read from the shard and decoded each epoch) beside the one-time cost of preparing
them; (b) the share of batch cells
that hold real tokens with our packing, with LLaVA's length grouping and with plain padding, on a
synthetic length mix shaped like LLaVA-665K; (c) peak memory of the streaming Ray Data pipeline
for a dataset and for one ten times larger (`bench.stream`).
"""

from __future__ import annotations

import io
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vistralv_ray.bench.inputs import machine, synthetic_photos
from vistralv_ray.data.images import PAD_FILL, StoredPixels, decode_to_pixels, pad_to_square
from vistralv_ray.data.packing import layout_batch, length_grouped_batches
from vistralv_ray.logging import get_logger

log = get_logger(__name__)

# The synthetic length mix (b): what it imitates, stated in every report.
IMAGE_FRACTION = 0.94  # LLaVA-665K: ~40K text-only (ShareGPT) records of 665K
TEXT_MEDIAN, TEXT_SIGMA = 260, 0.55  # log-normal text tokens: 90% between ~105 and ~640
TAIL_FRACTION = 0.05  # long multi-turn conversations, uniform from 700 tokens to max_length
LENGTH_MIX_ASSUMPTION = (
    f"LLaVA-665K-like mix: {IMAGE_FRACTION:.0%} of records carry one image (+image tokens), the rest are "
    f"text-only; text tokens log-normal, median {TEXT_MEDIAN} (90% between ~105 and ~640), plus a "
    f"{TAIL_FRACTION:.0%} long tail uniform from 700 to max_length; totals capped at max_length"
)


@dataclass
class DataBenchOptions:
    images: int = 200  # JPEGs per image-preprocessing method
    source_width: int = 640  # COCO-like source photos
    source_height: int = 480
    image_size: int = 256  # output side (SigLIP-256)
    length_records: int = 4000  # records of the synthetic length mix
    batch_size: int = 8  # per-device micro-batch
    world_size: int = 8  # LLaVA groups lengths over world x batch samples
    image_tokens: int = 256
    max_length: int = 2048
    memory_records: int = 120  # records of the 1x dataset for (c); 0 skips it
    memory_factor: int = 10
    # Per batch: a consumer slower than the pipeline (~0.15 s a batch of 8 on 2 cores), as a training
    # step is (the tiny model's takes ~0.4 s here), so Ray Data has reason to buffer ahead.
    consume_delay_s: float = 0.25
    # Ray's object store in the memory runs: Ray Data buffers up to half of it, so it sets the ceiling.
    object_store_mb: int = 256
    seed: int = 0


def _hf_processor(size: int):
    from transformers import SiglipImageProcessorPil  # the PIL ("slow") backend: no torchvision here

    return SiglipImageProcessorPil(
        size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=3
    )


def image_methods(size: int, hf_batch: int = 16) -> dict[str, Callable[[list[bytes]], list[np.ndarray]]]:
    """name -> function from JPEG bytes to model-ready pixels, for the same square-padded output."""
    processor = _hf_processor(size)

    def ours(photos):
        return [decode_to_pixels(p, size, "pad") for p in photos]

    def ours_normalised(photos):
        # What the accelerator does with our uint8 pixels, done here to compare equal outputs.
        return [((x.astype(np.float32) / 127.5) - 1.0).transpose(2, 0, 1) for x in ours(photos)]

    def hf(photos):
        # LLaVA's path: full decode, pad to square with the mean (expand2square), then the processor.
        out = []
        for k in range(0, len(photos), hf_batch):
            images = [pad_to_square(Image.open(io.BytesIO(p)).convert("RGB")) for p in photos[k : k + hf_batch]]
            out += list(processor(images=images, return_tensors="np")["pixel_values"])
        return out

    return {"ours_uint8": ours, "ours_then_normalise_float32": ours_normalised, "hf_siglip_pil": hf}


def level_difference(photos: list[bytes], size: int, ours: list[np.ndarray] | None = None) -> int:
    """Largest difference, in levels of 255, between our pixels (`ours`, else our decode of `photos`)
    and the reference's on `photos`."""
    methods = image_methods(size)
    ours = methods["ours_uint8"](photos) if ours is None else ours
    reference = methods["hf_siglip_pil"](photos)
    # The reference normalises with mean 0.5 and std 0.5 (`_hf_processor`): back to levels.
    return max(
        int(np.abs(o.astype(np.int32) - np.rint((r.transpose(1, 2, 0) * 0.5 + 0.5) * 255)).max())
        for o, r in zip(ours, reference, strict=True)
    )


PREPARED_TURNS = [{"from": "human", "value": "<image>\nẢnh gì?"}, {"from": "gpt", "value": "Một bức ảnh."}]


def prepare_shard(photos: list[bytes], folder: str, pixels: StoredPixels | None) -> dict:
    """One shard of `photos` written by `prepare`'s own code (`pixels`: as `--store-pixels` stores
    them; None: the original bytes), and the CPU time that took per image: a cost paid once."""
    from vistralv_ray.data.prepare import PrepareOptions, build_shard

    records = [
        {"id": f"p{i}", "image": f"p{i}.jpg", "image_bytes": p, "turns": PREPARED_TURNS} for i, p in enumerate(photos)
    ]
    cpu = time.process_time()
    shard = build_shard(records, 0, PrepareOptions(None, folder, pixels=pixels))
    cpu = time.process_time() - cpu
    assert shard.records == len(photos), "a benchmark photo was rejected"
    path = f"{folder}/{shard.name}"
    return {
        "path": path,
        "ms_per_image": cpu / len(photos) * 1000,
        "bytes_per_image": Path(path).stat().st_size / len(photos),
    }


def read_prepared(path: str, size: int) -> list[np.ndarray]:
    """What a training epoch does with a prepared shard: read each row group, decode (no resize)."""
    from vistralv_ray.data.shards import read_row_group, row_group_units

    out = []
    for unit in row_group_units([path]):
        columns, _ = read_row_group(unit["uri"], unit["row_group"], unit["first_row"])
        out += [decode_to_pixels(image, size, "pad") for image in columns["image"]]
    return out


def prepared_throughput(photos: list[bytes], size: int, epochs: int = 5) -> dict:
    """Prepared shards (`prepare --store-pixels`): the one-time cost per image, against a plain
    prepare, and the per-epoch path (shard read + decode, `epochs` times) per core, on the same photos."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pixels = StoredPixels(size, "pad", PAD_FILL)
        with tempfile.TemporaryDirectory(prefix="bench-prepared-") as folder:
            plain = prepare_shard(photos, f"{folder}/plain", None)
            stored = prepare_shard(photos, f"{folder}/pixels", pixels)
            # Bytes from distinct photos only: the shard's zstd would store a repeated photo (the
            # benchmark cycles a few) almost for free.
            distinct = list(dict.fromkeys(photos))
            plain_kb = prepare_shard(distinct, f"{folder}/plain-distinct", None)["bytes_per_image"] / 1024
            stored_kb = prepare_shard(distinct, f"{folder}/pixels-distinct", pixels)["bytes_per_image"] / 1024
            read_prepared(stored["path"], size)  # warm-up: the file in the page cache, imports
            cpu, wall = time.process_time(), time.perf_counter()
            for _ in range(epochs):  # ~10x faster than the other paths: a longer loop, a steadier figure
                out = read_prepared(stored["path"], size)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        torch.set_num_threads(threads)
    return {
        "pixels": out,
        "method": {
            "samples_per_s_per_core": epochs * len(photos) / max(cpu, 1e-9),
            "samples_per_s_wall": epochs * len(photos) / max(wall, 1e-9),
            "bytes_per_sample": int(out[0].nbytes),
            "dtype": str(out[0].dtype),
            "shape": list(out[0].shape),
        },
        "format": pixels.format,
        "prepare_ms_per_image": stored["ms_per_image"],
        "plain_prepare_ms_per_image": plain["ms_per_image"],
        "shard_kb_per_image": stored_kb,
        "plain_shard_kb_per_image": plain_kb,
    }


def image_throughput(photos: list[bytes], size: int) -> dict[str, dict]:
    """Samples per CPU-second (one single-threaded loop = one core) and per wall second, per method."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # our resize runs a torch kernel: one core means one thread
    try:
        return _image_throughput(photos, size)
    finally:
        torch.set_num_threads(threads)


def _image_throughput(photos: list[bytes], size: int) -> dict[str, dict]:
    results = {}
    for name, method in image_methods(size).items():
        method(photos[:4])  # warm-up: imports, processor caches
        cpu, wall = time.process_time(), time.perf_counter()
        out = method(photos)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        results[name] = {
            "samples_per_s_per_core": len(photos) / max(cpu, 1e-9),
            "samples_per_s_wall": len(photos) / max(wall, 1e-9),
            "bytes_per_sample": int(out[0].nbytes),
            "dtype": str(out[0].dtype),
            "shape": list(out[0].shape),
        }
    return results


def llava_like_lengths(n: int, seed: int = 0, image_tokens: int = 256, max_length: int = 2048) -> np.ndarray:
    """Sample lengths (text + image tokens) of the synthetic mix described by LENGTH_MIX_ASSUMPTION."""
    rng = np.random.default_rng(seed)
    text = rng.lognormal(np.log(TEXT_MEDIAN), TEXT_SIGMA, n)
    tail = rng.random(n) < TAIL_FRACTION
    text[tail] = rng.uniform(700, max_length, int(tail.sum()))
    has_image = rng.random(n) < IMAGE_FRACTION
    total = np.maximum(np.round(text), 16) + image_tokens * has_image
    return np.minimum(total, max_length).astype(np.int64)


def layout_nonpad_fraction(lengths: np.ndarray, batches: list[list[int]], mode: str, pack_length: int | None) -> float:
    """Real tokens / batch cells when `batches` are laid out by our `layout_batch`."""
    tokens = cells = 0
    for batch in batches:
        ids = [np.zeros(int(lengths[i]), dtype=np.int32) for i in batch]
        out = layout_batch(ids, ids, [None] * len(ids), 0, mode, pack_length, (1, 1, 3))
        tokens += out.num_tokens
        cells += out.input_ids.numel()
    return tokens / cells if cells else 0.0


def nonpad_fractions(
    lengths: np.ndarray, batch_size: int, world_size: int, max_length: int, seed: int = 0
) -> dict[str, float]:
    """Non-padding fraction of each batching strategy on the same samples."""
    perm = np.random.default_rng(seed).permutation(len(lengths)).tolist()
    random_batches = [perm[k : k + batch_size] for k in range(0, len(perm), batch_size)]
    grouped = length_grouped_batches(lengths.tolist(), batch_size, world_size, seed)
    return {
        "pad": layout_nonpad_fraction(lengths, random_batches, "pad", None),
        "group": layout_nonpad_fraction(lengths, grouped, "pad", None),
        "pack_rows_of_max_length": layout_nonpad_fraction(lengths, random_batches, "pack", max_length),
        "pack": layout_nonpad_fraction(lengths, random_batches, "pack", None),
    }


def packing_report(opts: DataBenchOptions) -> dict:
    lengths = llava_like_lengths(opts.length_records, opts.seed, opts.image_tokens, opts.max_length)
    return {
        "assumption": LENGTH_MIX_ASSUMPTION,
        "records": int(len(lengths)),
        "batch_size": opts.batch_size,
        "world_size": opts.world_size,
        "image_tokens": opts.image_tokens,
        "max_length": opts.max_length,
        "mean_length": float(lengths.mean()),
        "p50_p90_p99_length": [int(np.percentile(lengths, q)) for q in (50, 90, 99)],
        "nonpad_fraction": nonpad_fractions(lengths, opts.batch_size, opts.world_size, opts.max_length, opts.seed),
    }


def run_data_bench(opts: DataBenchOptions) -> dict:
    """All three measurements; every figure comes from this run."""
    log.info(
        "image preprocessing: %d JPEGs %dx%d -> %d px",
        opts.images,
        opts.source_width,
        opts.source_height,
        opts.image_size,
    )
    photos = synthetic_photos(opts.images, opts.source_width, opts.source_height, opts.seed)
    methods = image_throughput(photos, opts.image_size)
    ours, hf = methods["ours_uint8"], methods["hf_siglip_pil"]
    difference = level_difference(photos[:32], opts.image_size)
    log.info(
        "prepared shards: %d images stored at %d px, read and decoded as an epoch does", opts.images, opts.image_size
    )
    prepared = prepared_throughput(photos, opts.image_size)
    methods["prepared_uint8"] = prepared.pop("method")
    prepared_pixels = prepared.pop("pixels")
    prepared["max_level_difference_vs_hf"] = level_difference(photos[:32], opts.image_size, prepared_pixels[:32])
    prepared["speedup_per_core_vs_hf"] = (
        methods["prepared_uint8"]["samples_per_s_per_core"] / hf["samples_per_s_per_core"]
    )
    prepared["speedup_per_core_vs_ours"] = (
        methods["prepared_uint8"]["samples_per_s_per_core"] / ours["samples_per_s_per_core"]
    )
    images = {
        "count": opts.images,
        "source_size": [opts.source_width, opts.source_height],
        "mean_jpeg_bytes": int(np.mean([len(p) for p in photos])),
        "output_size": opts.image_size,
        "aspect": f"pad (square, mean fill) then bicubic resize, in every method; ours within {difference} "
        "level(s) of 255 of the reference's pixels",
        "max_level_difference_vs_hf": difference,
        "methods": methods,
        "speedup_per_core_vs_hf": ours["samples_per_s_per_core"] / hf["samples_per_s_per_core"],
        "prepared": prepared,
    }
    log.info("packing: %d synthetic lengths", opts.length_records)
    packing = packing_report(opts)
    memory = None
    if opts.memory_records > 0:
        from vistralv_ray.bench.stream import streaming_memory

        memory = streaming_memory(
            opts.memory_records,
            opts.memory_factor,
            opts.image_size,
            opts.consume_delay_s,
            opts.object_store_mb,
            opts.seed,
        )
    log.info("shuffling: distinct subsets per global batch on a corpus sorted by subset")
    mixing = mixing_report(opts.seed)
    fractions = packing["nonpad_fraction"]
    runs = memory["runs"] if memory else [None, None]
    # The headline figures (ours against the LLaVA-style reference), then the details they come from.
    return {
        "ours_samples_per_s_per_core": ours["samples_per_s_per_core"],
        "reference_samples_per_s_per_core": hf["samples_per_s_per_core"],
        "speedup": images["speedup_per_core_vs_hf"],
        # Shards prepared at the model's size (`prepare --store-pixels`): the per-epoch path against the
        # same reference decoding the originals; preparing them is a one-time cost (images.prepared).
        "prepared_samples_per_s_per_core": methods["prepared_uint8"]["samples_per_s_per_core"],
        "prepared_speedup": prepared["speedup_per_core_vs_hf"],
        "nonpad_fraction": fractions["pack"],
        "reference_nonpad_fraction": fractions["group"],
        # Peak PSS summed over the process tree (RSS would count shared pages, the object store's
        # among them, once per process); null when the memory runs were skipped.
        "peak_rss_mb_1x": runs[0]["peak_pss_mb"] if runs[0] else None,
        "peak_rss_mb_10x": runs[1]["peak_pss_mb"] if runs[1] else None,
        "machine": machine(),
        "options": asdict(opts),
        "images": images,
        "packing": packing,
        "memory": memory,
        "mixing": mixing,
    }


# (d): global batches of Vistral-V's own run (1 GPU x 8), one GPU x 16 and LLaVA's 8 x 16.
MIXING_SHAPES = ((1, 8), (1, 16), (8, 16))


def mixing_report(seed: int) -> dict:
    """Mean distinct source subsets per global batch on a corpus sorted by subset (`bench.mixing`)."""
    from vistralv_ray.bench.mixing import MixingOptions, measure_mixing

    rows = []
    for workers, batch in MIXING_SHAPES:
        r = measure_mixing(MixingOptions(workers=workers, per_device_batch=batch, seed=seed))
        rows.append({"workers": workers, "per_device_batch": batch, **{k: r[k] for k in ("ours", "shards", "random")}})
    opts = MixingOptions()
    corpus = f"{opts.subsets} subsets x {opts.records_per_subset} records sorted by subset, shards of {opts.shard_size}"
    return {"corpus": corpus, "rows": rows}
