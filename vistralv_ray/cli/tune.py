"""`vistralv-ray tune`: a Ray Tune sweep of the base learning rate (and whatever else the space varies).

Each trial is a full TorchTrainer run; ASHA stops poor ones early. The winner's base LR goes to a
real run of any size with `vistralv-ray train CONFIG --set train.base_lr=@DIR/best.json`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vistralv_ray.cli.options import add_ray_address


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="sweep the base LR with Ray Tune + ASHA; writes best.json, trials.csv and plots")
    p.add_argument("config", help="run config YAML the trials start from (e.g. jobs/align.yaml)")
    p.add_argument("--space", required=True, type=Path, help="search space YAML (e.g. tune_spaces/base_lr_align.yaml)")
    p.add_argument("--samples", type=int, help="number of samples (default: the space's `samples`)")
    p.add_argument(
        "--workdir",
        help="where the sweep writes everything, a local folder or an s3:// URI (on a multi-node cluster: "
        "s3://, every node writes there) (default: sweeps/<space name>)",
    )
    p.add_argument("--max-concurrent", type=int, help="at most this many trials at once (default: what fits)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of CONFIG for every trial",
    )
    add_ray_address(p)
    p.set_defaults(func=tune)


def tune(args: argparse.Namespace) -> int:
    import json

    from vistralv_ray.config import load_config
    from vistralv_ray.data import storage
    from vistralv_ray.tuning.results import collect_trials, write_results
    from vistralv_ray.tuning.space import load_space
    from vistralv_ray.tuning.sweep import prepare_sweep, run_sweep

    cfg = load_config(args.config, args.overrides)
    space = load_space(args.space)
    workdir = args.workdir or str(Path("sweeps") / space.name)
    setup = prepare_sweep(cfg, space, workdir, args.samples, args.max_concurrent)
    print(
        f"sweep {space.name}: {setup.samples} sample(s), at most {setup.max_concurrent} "
        f"trial(s) at once, ASHA max_t {setup.max_t} reports -> {setup.workdir}"
    )
    grid = run_sweep(setup)
    records = collect_trials(grid, setup)
    paths = write_results(records, setup)

    metric = space.scheduler.metric
    print(f"\n{'trial':<14} {'status':<14} {'base_lr':>10} {'effective_lr':>13} {'steps':>7} {'final ' + metric:>16}")
    for r in records:
        value = "-" if r.final_metric is None else f"{r.final_metric:.4f}"
        print(
            f"{r.trial_id:<14} {r.status:<14} {r.base_lr:>10.3g} {r.effective_lr:>13.3g} "
            f"{r.last_step if r.last_step is not None else '-':>7} {value:>16}"
        )
    print(f"\ntrials table: {paths['table']}")
    print(f"plots:        {paths['metric_plot']}\n              {paths['curves_plot']}")
    print(f"trial runs:   {setup.runs_dir}")
    if "best" not in paths:
        print("no trial finished with a finite metric: no best.json written")
        return 1
    found = json.loads(storage.read_bytes(str(paths["best"])))
    print(
        f"best:         {paths['best']} (trial {found['trial_id']}: base LR {found['base_lr']:.4g}, "
        f"{metric} {found['value']:.4f} at global batch {found['global_batch']}, {found['lr_rule']} rule)"
    )
    print("use it:       " + transfer_command(args, cfg, found, paths["best"]))
    return 0


def transfer_command(args: argparse.Namespace, cfg, best: dict, best_path: Path | str) -> str:
    """The `train` command that takes the tuned base LR (and the rule it was found with, where it differs).

    `@FILE` reads a local best.json; a sweep on S3 gets the values themselves (`@` reads local files only).
    """
    local = "://" not in str(best_path)

    def value(field: str) -> str:
        return f"@{best_path}" if local else str(best[field])

    sets = [f"train.base_lr={value('base_lr')}"]
    if best["lr_rule"] != cfg.train.lr_rule:
        sets.append(f"train.lr_rule={value('lr_rule')}")
    if best["reference_batch"] != cfg.reference_batch:
        sets.append(f"train.reference_batch={value('reference_batch')}")
    sets += [
        o for o in args.overrides if not o.startswith(("train.base_lr=", "train.lr_rule=", "train.reference_batch="))
    ]
    return f"vistralv-ray train {args.config} " + " ".join(f"--set {s}" for s in sets)
