"""What a sweep leaves behind: one record per trial, `best.json`, `trials.csv` and two plots.

`best.json` holds the winning base LR with the global batch, rule and reference batch it was found
at, so that `vistralv-ray train CONFIG --set train.base_lr=@DIR/best.json` transfers it to any worker
count through the scaling rule. A trial is `completed`, `stopped_early` (by the scheduler),
`diverged` (NaN/inf loss) or `error`; only completed trials compete for best (stopped ones only when
none completed). On an `s3://` sweep directory they are written here first, then uploaded.
"""

from __future__ import annotations

import csv
import json
import math
import tempfile
from pathlib import Path

from vistralv_ray.data import storage
from vistralv_ray.training.driver import planned_steps
from vistralv_ray.training.scaling import lr_plan
from vistralv_ray.tuning.plots import plot_curves, plot_metric_vs_lr
from vistralv_ray.tuning.records import TrialRecord
from vistralv_ray.tuning.sweep import SweepSetup


def _finite(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _history(result, metric: str) -> list[dict]:
    frame = result.metrics_dataframe
    if frame is None or "step" not in frame:
        return []
    rows = []
    for row in frame.to_dict("records"):
        if _finite(row.get("step")) is None:
            continue  # not one of the trainer's reports
        diverged = bool(row.get("diverged", False))
        rows.append(
            {
                "step": int(row["step"]),
                "loss": _finite(row.get("loss")),
                metric: None if diverged else _finite(row.get(metric)),
                "diverged": diverged,
            }
        )
    return rows


def collect_trials(grid, setup: SweepSetup) -> list[TrialRecord]:
    """One record per trial of Tune's ResultGrid, in trial order."""
    metric = setup.space.scheduler.metric
    records = []
    for result in grid:
        trial_id = Path(result.path).name  # the sweep names trial directories by trial id
        params = {k: v for k, v in (result.config or {}).items() if k in setup.space.search}
        cfg = setup.config_of(params, trial_id)
        lr = lr_plan(cfg)
        history = _history(result, metric)
        last = result.metrics or {}
        diverged = bool(last.get("diverged")) or any(h["diverged"] for h in history)
        values = [h[metric] for h in history if h[metric] is not None]
        last_step = history[-1]["step"] if history else None
        total = planned_steps(cfg, setup.train_records)[1]
        if result.error is not None:
            status = "error"
        elif diverged:
            status = "diverged"
        elif last_step is not None and last_step >= total:
            status = "completed"
        else:
            status = "stopped_early"
        best = (min if setup.space.scheduler.mode == "min" else max)(values) if values else None
        records.append(
            TrialRecord(
                trial_id=trial_id,
                run_name=cfg.run_name,
                params=params,
                base_lr=cfg.train.base_lr,
                effective_lr=lr.effective_lr,
                global_batch=lr.global_batch,
                workers=lr.workers,
                per_device_batch=lr.per_device_batch,
                grad_accum=lr.grad_accum,
                lr_rule=lr.rule,
                reference_batch=lr.reference_batch,
                planned_steps=total,
                status=status,
                iterations=int(last.get("training_iteration", len(history))),
                last_step=last_step,
                final_metric=None if diverged or not history else history[-1][metric],
                best_metric=best,
                final_loss=history[-1]["loss"] if history else None,
                error=str(result.error).splitlines()[0] if result.error is not None else None,
                history=history,
            )
        )
    return sorted(records, key=lambda r: r.trial_id)


def pick_best(records: list[TrialRecord], mode: str) -> TrialRecord | None:
    """The best final metric among completed trials (among stopped-early ones when none completed)."""
    for status in ("completed", "stopped_early"):
        pool = [r for r in records if r.status == status and r.final_metric is not None]
        if pool:
            return (min if mode == "min" else max)(pool, key=lambda r: r.final_metric)
    return None


def best_summary(best: TrialRecord, sweep: str, metric: str) -> dict:
    """best.json: top-level fields named like the config fields they feed (`--set train.base_lr=@best.json`)."""
    return {
        "base_lr": best.base_lr,
        "effective_lr": best.effective_lr,
        "global_batch": best.global_batch,
        "workers": best.workers,
        "per_device_batch": best.per_device_batch,
        "grad_accum": best.grad_accum,
        "lr_rule": best.lr_rule,
        "reference_batch": best.reference_batch,
        "metric": metric,
        "value": best.final_metric,
        metric: best.final_metric,
        "trial_id": best.trial_id,
        "run_name": best.run_name,
        "status": best.status,
        "sweep": sweep,
        "params": best.params,
    }


def write_table(records: list[TrialRecord], metric: str, search_keys: list[str], path: Path) -> None:
    columns = [
        "trial_id",
        "run_name",
        "status",
        "base_lr",
        "effective_lr",
        "global_batch",
        "lr_rule",
        "reference_batch",
        *[k for k in search_keys if k != "train.base_lr"],
        "iterations",
        "last_step",
        "planned_steps",
        f"final_{metric}",
        f"best_{metric}",
        "final_loss",
        "error",
    ]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for r in records:
            values = {**r.__dict__, **r.params, f"final_{metric}": r.final_metric, f"best_{metric}": r.best_metric}
            writer.writerow(["" if values.get(c) is None else values[c] for c in columns])


def write_results(records: list[TrialRecord], setup: SweepSetup) -> dict[str, Path | str]:
    """best.json (when a trial qualifies), trials.csv and the plots; returns their paths (s3:// URIs
    for a sweep directory on S3)."""
    workdir = str(setup.workdir)
    if not storage.is_s3(workdir):
        return _write_results(records, setup, Path(workdir))
    with tempfile.TemporaryDirectory() as tmp:
        local = _write_results(records, setup, Path(tmp))
        uris = {}
        for key, path in local.items():
            uris[key] = storage.join(workdir, path.name)
            storage.write_bytes(uris[key], path.read_bytes())
    best_uri = storage.join(workdir, "best.json")
    if "best" not in uris and storage.exists(best_uri):
        storage.delete_file(best_uri)  # a stale best.json of an earlier sweep must not be taken for this one's
    return uris


def _write_results(records: list[TrialRecord], setup: SweepSetup, out: Path) -> dict[str, Path]:
    metric = setup.space.scheduler.metric
    paths = {
        "table": out / "trials.csv",
        "metric_plot": out / f"{metric}_vs_base_lr.png",
        "curves_plot": out / "loss_curves.png",
    }
    write_table(records, metric, list(setup.space.search), paths["table"])
    best = pick_best(records, setup.space.scheduler.mode)
    best_path = out / "best.json"
    if best is not None:
        best_path.write_text(json.dumps(best_summary(best, setup.space.name, metric), indent=2) + "\n")
        paths["best"] = best_path
    elif best_path.exists():
        best_path.unlink()  # a stale best.json of an earlier sweep must not be taken for this one's
    plot_metric_vs_lr(records, metric, best, setup.space.name, paths["metric_plot"])
    plot_curves(records, metric, paths["curves_plot"])
    return paths
