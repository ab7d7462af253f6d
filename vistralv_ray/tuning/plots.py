"""The sweep's two pictures (matplotlib, Agg): final metric against base LR, and every trial's curves.

Diverged trials have no final metric: they are drawn as red crosses along the top of the first plot
so that the LR where training breaks stays visible next to the ones that worked.
"""

from __future__ import annotations

import math
from pathlib import Path

from vistralv_ray.tuning.records import TrialRecord

STYLE = {
    "completed": {"marker": "o", "color": "tab:blue"},
    "stopped_early": {"marker": "o", "color": "tab:orange", "facecolors": "none"},
    "diverged": {"marker": "x", "color": "tab:red"},
    "error": {"marker": "s", "color": "tab:gray"},
}
LABEL = {"completed": "completed", "stopped_early": "stopped early", "diverged": "diverged (NaN/inf)", "error": "error"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _batch_note(records: list[TrialRecord]) -> str:
    batches = sorted({(r.global_batch, r.lr_rule, r.reference_batch) for r in records})
    if len(batches) == 1:
        gb, rule, ref = batches[0]
        return f"global batch {gb}, {rule} rule, reference batch {ref}"
    return "several global batches"


def plot_metric_vs_lr(
    records: list[TrialRecord], metric: str, best: TrialRecord | None, sweep: str, path: Path
) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    finite = [r.final_metric for r in records if r.final_metric is not None]
    top = max(finite) if finite else 1.0
    bottom = min(finite) if finite else 0.0
    ceiling = top + 0.08 * max(top - bottom, abs(top), 1e-3)
    for status in ("completed", "stopped_early", "error", "diverged"):
        group = [r for r in records if r.status == status]
        if not group:
            continue
        ys = [ceiling if r.final_metric is None else r.final_metric for r in group]
        ax.scatter([r.base_lr for r in group], ys, s=50, label=LABEL[status], **STYLE[status])
    if best is not None:
        ax.scatter(
            [best.base_lr],
            [best.final_metric],
            marker="*",
            s=260,
            color="gold",
            edgecolors="black",
            zorder=5,
            label=f"best: base LR {best.base_lr:.3g}",
        )
    if any(r.final_metric is None for r in records):
        ax.axhline(ceiling, color="tab:red", linestyle=":", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("base learning rate")
    ax.set_ylabel(f"final {metric}")
    ax.set_title(f"{sweep}: final {metric} against base LR\n({_batch_note(records)})", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(records: list[TrialRecord], metric: str, path: Path) -> None:
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 5))
    cmap = plt.get_cmap("viridis")
    ordered = sorted(records, key=lambda r: r.base_lr)
    for i, r in enumerate(ordered):
        color = cmap(0.85 * i / max(len(ordered) - 1, 1))  # the top of viridis is too pale to see
        label = f"{r.base_lr:.3g} ({LABEL[r.status]})"
        style = "--" if r.status == "stopped_early" else "-"
        for ax, key in ((left, "loss"), (right, metric)):
            points = [(h["step"], h[key]) for h in r.history if h[key] is not None]
            if points:
                ax.plot(*zip(*points), style, color=color, marker=".", label=label)
        if r.status == "diverged" and r.history:
            finite = [h["loss"] for h in r.history if h["loss"] is not None]
            if finite:
                left.scatter([r.history[-1]["step"]], [finite[-1]], marker="x", s=70, color="tab:red", zorder=5)
    for ax, title in ((left, "training loss"), (right, metric)):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("step")
        ax.set_ylabel(title)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    handles, labels = left.get_legend_handles_labels()
    rows = math.ceil(len(handles) / 4)
    if handles:
        fig.legend(handles, labels, title="base LR", fontsize="x-small", loc="lower center", ncol=min(len(handles), 4))
    fig.tight_layout(rect=(0, min(0.05 + 0.045 * rows, 0.5) if handles else 0, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
