"""Benchmark sub-commands: `bench data` and `bench train` (ours against baselines, in one run)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from vistralv_ray.cli.options import add_ray_address


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure the data pipeline or the training step against plain baselines")
    benches = p.add_subparsers(dest="bench", metavar="BENCH")
    p.set_defaults(func=lambda args: p.print_help() or 2)

    d = benches.add_parser("data", help="image preprocessing, packing efficiency, streaming memory")
    d.add_argument("--images", type=int, default=200, help="JPEGs per image-preprocessing method (default 200)")
    d.add_argument("--image-size", type=int, default=256, help="output side in pixels (default 256)")
    d.add_argument("--length-records", type=int, default=4000, help="records of the synthetic length mix")
    d.add_argument("--batch-size", type=int, default=8, help="per-device micro-batch (default 8)")
    d.add_argument("--world-size", type=int, default=8, help="workers LLaVA groups lengths over (default 8)")
    d.add_argument("--memory-records", type=int, default=120, help="records of the 1x dataset; 0 skips (c)")
    d.add_argument("--memory-factor", type=int, default=10, help="size of the large dataset, x (default 10)")
    d.add_argument(
        "--object-store-mb", type=int, default=256, help="object store of the memory runs (0: Ray's default)"
    )
    d.add_argument("--consume-delay", type=float, default=0.25, help="consumer seconds per batch (default 0.25)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
    add_ray_address(d)
    d.set_defaults(func=bench_data)

    t = benches.add_parser("train", help="our Ray Train + DeepSpeed step against a plain PyTorch loop")
    t.add_argument("--steps", type=int, default=60, help="measured steps after the warm-up (default 60)")
    t.add_argument("--warmup-steps", type=int, default=5)
    t.add_argument("--window", type=int, default=5, help="steps per logging window (default 5)")
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--stage", choices=["align", "finetune"], default="finetune")
    t.add_argument("--threads", type=int, default=1, help="torch threads in both loops (default 1)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs of ours and the plain loop, in turn; the overhead ratio is their median (default 1)",
    )
    t.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
    add_ray_address(t)
    t.set_defaults(func=bench_train)


def bench_data(args: argparse.Namespace) -> int:
    from vistralv_ray.bench.data import DataBenchOptions, run_data_bench

    opts = DataBenchOptions(
        images=args.images,
        image_size=args.image_size,
        length_records=args.length_records,
        batch_size=args.batch_size,
        world_size=args.world_size,
        memory_records=args.memory_records,
        memory_factor=args.memory_factor,
        object_store_mb=args.object_store_mb,
        consume_delay_s=args.consume_delay,
        seed=args.seed,
    )
    with contextlib.redirect_stdout(sys.stderr):  # Ray's own messages must not mix with the result
        result = run_data_bench(opts)
    print(json.dumps(result, indent=1, ensure_ascii=False) if args.json else format_data(result))
    return 0


def bench_train(args: argparse.Namespace) -> int:
    from vistralv_ray.bench.train import TrainBenchOptions, run_train_bench

    try:
        opts = TrainBenchOptions(
            steps=args.steps,
            warmup_steps=args.warmup_steps,
            window=args.window,
            batch_size=args.batch_size,
            stage=args.stage,
            threads=args.threads,
            seed=args.seed,
            repeats=args.repeats,
        )
    except ValueError as e:  # checked before anything starts
        print(f"error: {e}", file=sys.stderr)
        return 2
    with contextlib.redirect_stdout(sys.stderr):
        result = run_train_bench(opts)
    print(json.dumps(result, indent=1) if args.json else format_train(result))
    return 0


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join([line.format(*header), line.format(*("-" * w for w in widths))] + [line.format(*r) for r in rows])


def _machine(m: dict) -> str:
    gpu = m["gpu"] or "no GPU"
    return (
        f"machine: {m['cpus']} CPU cores, {gpu}, load average {m['load_average_1m']:.1f}; torch {m['torch']}, "
        f"ray {m['ray']}"
    )


def format_data(r: dict) -> str:
    im, pk, mem = r["images"], r["packing"], r["memory"]
    out = [_machine(r["machine"]), ""]
    out.append(
        f"(a) image preprocessing: {im['count']} JPEGs {im['source_size'][0]}x{im['source_size'][1]} "
        f"(~{im['mean_jpeg_bytes'] // 1024} KB) -> {im['output_size']} px; {im['aspect']}"
    )
    rows = [
        [
            name,
            f"{m['samples_per_s_per_core']:.0f}",
            f"{m['samples_per_s_wall']:.0f}",
            m["dtype"],
            f"{m['bytes_per_sample'] // 1024}",
        ]
        for name, m in im["methods"].items()
    ]
    out.append(_table(["method", "samples/s/core", "samples/s wall", "output", "KB/sample"], rows))
    out.append(f"ours vs HF SiglipImageProcessor (PIL), per core: x{im['speedup_per_core_vs_hf']:.2f}")
    pre = im.get("prepared")
    if pre:
        out.append(
            f"prepared_uint8: shards of `prepare --store-pixels` ({pre['format']} at {im['output_size']} px, "
            f"{pre['shard_kb_per_image']:.0f} KB/image in the shard against {pre['plain_shard_kb_per_image']:.0f} "
            f"for the originals), read and decoded each epoch: x{pre['speedup_per_core_vs_hf']:.2f} the reference "
            f"per core, x{pre['speedup_per_core_vs_ours']:.2f} ours, within {pre['max_level_difference_vs_hf']} "
            f"level(s); preparing costs {pre['prepare_ms_per_image']:.1f} ms/image once "
            f"(a plain prepare {pre['plain_prepare_ms_per_image']:.1f})"
        )
    out += [
        "",
        f"(b) non-padding token fraction, {pk['records']} synthetic records, micro-batch {pk['batch_size']}, "
        f"grouping over {pk['world_size']} workers",
    ]
    out.append(f"assumption: {pk['assumption']}")
    p50, p90, p99 = pk["p50_p90_p99_length"]
    out.append(f"lengths: mean {pk['mean_length']:.0f}, p50 {p50}, p90 {p90}, p99 {p99} tokens")
    names = {
        "pad": "plain padding (random batches)",
        "group": "length-grouped padding (LLaVA)",
        "pack_rows_of_max_length": f"packing, rows of {pk['max_length']}",
        "pack": "packing (default: one row)",
    }
    out.append(
        _table(["batching", "non-pad fraction"], [[names[k], f"{v:.3f}"] for k, v in pk["nonpad_fraction"].items()])
    )
    if mem is not None:
        out += ["", f"(c) streaming pipeline memory: {mem['method']}"]
        rows = [
            [
                f"x{m['scale']}",
                str(m["records"]),
                f"{m['dataset_bytes'] / 2**20:.0f}",
                f"{m['decoded_pixels_mb_if_materialised']:.0f}",
                f"{m['peak_pss_mb']:.0f}",
                f"{m['peak_pss_mb_first_half']:.0f} / {m['peak_pss_mb_second_half']:.0f}",
                f"{m['peak_rss_sum_mb']:.0f}",
                f"{m['stream_s']:.1f}",
            ]
            for m in mem["runs"]
        ]
        out.append(
            _table(
                [
                    "size",
                    "records",
                    "shards MB",
                    "pixels MB if held",
                    "peak PSS MB",
                    "1st / 2nd half of stream",
                    "peak RSS sum MB",
                    "stream s",
                ],
                rows,
            )
        )
        out.append(f"peak PSS growth for x{mem['runs'][1]['scale']} the data: x{mem['peak_growth']:.2f}")
    mix = r.get("mixing")
    if mix:
        out += ["", f"(d) shuffling: mean distinct subsets per global batch; {mix['corpus']}"]
        rows = [
            [
                f"{m['workers']} x {m['per_device_batch']}",
                f"{m['ours']:.2f}",
                f"{m['shards']:.2f}",
                f"{m['random']:.2f}",
            ]
            for m in mix["rows"]
        ]
        out.append(_table(["workers x batch", "ours", "whole shards (before)", "random permutation"], rows))
    return "\n".join(out)


def format_train(r: dict) -> str:
    o = r["options"]
    runs = f"{o['repeats']} runs each of ours and the plain loop, medians; " if o.get("repeats", 1) > 1 else ""
    out = [
        _machine(r["machine"]),
        f"model: {r['model']}; stage {o['stage']}, batch {o['batch_size']}, "
        f"{o['threads']} torch thread(s), {o['steps']} measured steps after {o['warmup_steps']} warm-up",
        f"{runs}the last two loops run window by window in turn in one process",
        "",
    ]
    rows = []
    loops = (
        ("ours (Ray Train + DeepSpeed, 1 worker, streaming data)", "ours"),
        ("plain PyTorch loop (batches in memory)", "plain_pytorch"),
        ("plain PyTorch loop (DataLoader worker, same preprocessing)", "plain_pytorch_dataloader"),
        ("DeepSpeed engine alone (batches in memory)", "deepspeed_in_process"),
        ("plain PyTorch loop (in turn with the DeepSpeed engine)", "plain_pytorch_interleaved"),
    )
    for name, key in loops:
        m = r[key]
        rows.append([name, f"{m['median_step_s'] * 1000:.1f}", f"{m['samples_per_s']:.1f}", f"{m['tokens_per_s']:.0f}"])
    out.append(_table(["loop", "median step ms", "samples/s", "tokens/s"], rows))
    ratios = r.get("overhead_ratios", [r["overhead_ratio"]])
    each = f" (runs: {', '.join(f'{x:.3f}' for x in ratios)})" if len(ratios) > 1 else ""
    out.append(f"overhead ratio (ours / plain median step): {r['overhead_ratio']:.3f}{each}")
    out.append(f"ours / plain with a DataLoader: {r['overhead_ratio_vs_dataloader']:.3f}")
    out.append(f"DeepSpeed engine alone / plain, in turn: {r['deepspeed_overhead_ratio']:.3f}")
    out.append(f"data-wait fraction reported by our loop: {r['ours']['data_wait_fraction']:.3f}")
    return "\n".join(out)
