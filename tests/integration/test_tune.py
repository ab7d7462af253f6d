"""`vistralv-ray tune` on the tiny model and a real local Ray cluster: a 4-trial sweep where ASHA stops
poor trials, a diverging trial is recorded (not crashed), and best.json, the table and the plots appear."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest
import yaml

from vistralv_ray.cli.main import main
from vistralv_ray.config import dump_config, load_config

pytestmark = pytest.mark.integration

# Align trains only the projector, and the language model's RMSNorm renormalises whatever it emits:
# even base LR 1e4 keeps the loss finite. 1e20 overflows float32 in the projector after one step, so
# the eval loss of that step and the next training loss are NaN.
DIVERGING_LR = 1e20
# Trials start in this order, two at a time: 2e-5 starts after both others have reported at the
# first rung and is clearly worse there (it barely moves), so ASHA stops it whatever the timing.
# ASHA's stop reaches a trial a moment after its report: with 2 steps the trial could finish its
# second step first (reports 0.5 s apart; seen once in CI), with 4 steps it has three more to go.
STEPS = 4
GRID = [4e-3, 2e-3, 2e-5, DIVERGING_LR]


def wait_for_free_cpus(ray, total: float, timeout_s: float = 60.0) -> float:
    """Stopped trials must leave nothing behind on the shared session cluster."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        free = ray.available_resources().get("CPU", 0.0)
        if free >= total - 1e-6:
            return free
        time.sleep(1.0)
    return ray.available_resources().get("CPU", 0.0)


def test_sweep_stops_poor_trials_records_divergence_and_writes_results(
    ray_local, run_config, tiny_shards, tmp_path, capsys, monkeypatch
):
    from matplotlib.figure import Figure

    figures, savefig = {}, Figure.savefig  # file name -> the figure saved there (the plots are drawn here)
    monkeypatch.setattr(
        Figure,
        "savefig",
        lambda fig, path, *a, **kw: figures.update({Path(path).name: fig}) or savefig(fig, path, *a, **kw),
    )
    cfg = run_config(
        f"data.eval=[{tiny_shards['eval']}]",
        "model.max_length=128",
        f"train.max_steps={STEPS}",
        "train.lr_rule=linear",
        "train.reference_batch=8",
        "run.name=users-own-run",
    )
    config_path = tmp_path / "tiny.yaml"
    dump_config(cfg, config_path)
    space = {
        "name": "tiny-test",
        # One worker x 4: global batch 4, so each trial trains at base_lr x 4/8.
        "trial": {"scaling.workers": 1, "train.log_every": 1, "train.eval_every": 1, "train.checkpoint_every": 2},
        "search": {"train.base_lr": {"grid": GRID}},
        "scheduler": {"name": "asha", "metric": "eval_loss", "mode": "min", "grace_period": 1, "reduction_factor": 2},
    }
    space_path = tmp_path / "space.yaml"
    space_path.write_text(yaml.safe_dump(space))
    workdir = tmp_path / "sweep"
    total_cpus = ray_local.cluster_resources()["CPU"]

    # One trial at a time, in grid order: ASHA keeps the first trial to reach a rung, so with trials
    # racing the poor 2e-5 one sometimes got there first and ran to the end (seen in CI).
    argv = ["tune", str(config_path), "--space", str(space_path), "--workdir", str(workdir), "--max-concurrent", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out

    with open(workdir / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    by_lr = {float(r["base_lr"]): r for r in rows}
    assert sorted(by_lr) == sorted(GRID), rows
    for lr, row in by_lr.items():
        assert float(row["effective_lr"]) == pytest.approx(lr * 4 / 8) and row["global_batch"] == "4", row
    diverged = by_lr[DIVERGING_LR]
    assert diverged["status"] == "diverged" and diverged["final_eval_loss"] == "", diverged
    assert by_lr[2e-5]["status"] == "stopped_early" and int(by_lr[2e-5]["last_step"]) < STEPS, rows
    completed = [r for r in rows if r["status"] == "completed"]
    # The first trial at a rung always goes on, so at least one runs to the end.
    assert completed and all(r["last_step"] == r["planned_steps"] == str(STEPS) for r in completed), rows

    best = json.loads((workdir / "best.json").read_text())
    winner = next(r for r in rows if r["trial_id"] == best["trial_id"])
    assert winner["status"] == "completed" and best["base_lr"] in (4e-3, 2e-3)
    assert best["value"] == pytest.approx(min(float(r["final_eval_loss"]) for r in completed))
    assert (best["global_batch"], best["lr_rule"], best["reference_batch"], best["metric"]) == (
        4,
        "linear",
        8,
        "eval_loss",
    )
    # The plots show the trials: each at its base LR, by status, with its final eval loss.
    (ax,) = figures["eval_loss_vs_base_lr.png"].axes
    plotted = {c.get_label(): sorted((float(x), float(y)) for x, y in c.get_offsets()) for c in ax.collections}
    for status, label in (("completed", "completed"), ("stopped_early", "stopped early")):
        expected = sorted((float(r["base_lr"]), float(r["final_eval_loss"])) for r in rows if r["status"] == status)
        assert flat(plotted.get(label, [])) == pytest.approx(flat(expected)), (label, plotted)
    assert [x for x, _ in plotted["diverged (NaN/inf)"]] == [DIVERGING_LR]
    assert flat(plotted[f"best: base LR {best['base_lr']:.3g}"]) == pytest.approx([best["base_lr"], best["value"]])
    left, right = figures["loss_curves.png"].axes
    finished = [r for r in rows if r["status"] != "diverged"]
    assert {line.get_label() for line in right.lines} >= {
        f"{float(r['base_lr']):.3g} ({'stopped early' if r['status'] == 'stopped_early' else r['status']})"
        for r in finished
    }
    for line in right.lines:  # eval loss at steps 1.., one point per report
        assert list(line.get_xdata()) == list(range(1, len(line.get_xdata()) + 1)), line.get_label()
    assert len(left.lines) >= len(finished)

    # Every trial ran as its own run under the sweep directory, grouped by sweep; the user's run is untouched.
    run_dirs = sorted((workdir / "runs").iterdir())
    assert [d.name for d in run_dirs] == sorted(r["run_name"] for r in rows)
    for run_dir in run_dirs:
        trial_cfg = load_config(run_dir / "config.yaml")
        assert trial_cfg.run.wandb_group == "tiny-test" and trial_cfg.scaling.workers == 1
    assert not (tmp_path / "runs" / "users-own-run").exists()

    assert f"--set train.base_lr=@{workdir / 'best.json'}" in out
    assert wait_for_free_cpus(ray_local, total_cpus) >= total_cpus - 1e-6, ray_local.available_resources()


def flat(points) -> list[float]:
    """(x, y) points as one list: pytest.approx compares flat sequences only."""
    return [v for point in points for v in point]
