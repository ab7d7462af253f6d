"""`vistralv-ray eval-compare A B`: two eval runs of one benchmark side by side, with paired significance.

Both runs are re-scored from their predictions.jsonl on the questions they share (so CIDEr-D's
document frequencies are the same for both), and every metric gets B - A with a paired-bootstrap 95%
interval and a two-sided p-value: the same resampled questions for both models, which is what makes a
small difference on a small benchmark readable. Written as a Markdown table and a PNG bar chart.
"""

from __future__ import annotations

import json
from pathlib import Path

from vistralv_ray.evaluation.benchmarks import get_benchmark
from vistralv_ray.evaluation.bootstrap import DEFAULT_RESAMPLES, paired_bootstrap
from vistralv_ray.evaluation.formats import Item
from vistralv_ray.evaluation.runner import METRICS_FILE, PREDICTIONS_FILE, read_predictions

SIGNIFICANCE = 0.05


def _load(run: Path) -> tuple[dict, dict[str, dict]]:
    run = Path(run).expanduser()
    if not (run / METRICS_FILE).is_file() or not (run / PREDICTIONS_FILE).is_file():
        raise FileNotFoundError(f"{run}: not an eval output directory (no {METRICS_FILE} / {PREDICTIONS_FILE})")
    return json.loads((run / METRICS_FILE).read_text()), read_predictions(run / PREDICTIONS_FILE)


def compare_runs(a: Path, b: Path, resamples: int = DEFAULT_RESAMPLES) -> dict:
    """{benchmark, questions, a, b, rows: [{metric, a, b, difference, ci95, p_value}]}."""
    metrics_a, rows_a = _load(a)
    metrics_b, rows_b = _load(b)
    name = metrics_a.get("benchmark")
    if name is None or name != metrics_b.get("benchmark"):
        raise ValueError(f"eval-compare: {a} is {name!r}, {b} is {metrics_b.get('benchmark')!r}: not one benchmark")
    if metrics_a.get("lang") != metrics_b.get("lang"):
        raise ValueError(f"eval-compare: languages differ ({metrics_a.get('lang')} and {metrics_b.get('lang')})")
    benchmark = get_benchmark(name)
    shared = [qid for qid in rows_a if qid in rows_b]
    if not shared:
        raise ValueError(f"eval-compare: {a} and {b} share no question")
    items = [
        Item(qid, None, rows_a[qid]["question"], rows_a[qid]["references"], rows_a[qid]["group"]) for qid in shared
    ]
    scores_a = benchmark.score([rows_a[q]["prediction"] for q in shared], items)
    scores_b = benchmark.score([rows_b[q]["prediction"] for q in shared], items)
    rows = []
    for metric in scores_a:
        paired = paired_bootstrap(scores_a[metric], scores_b[metric], resamples)
        rows.append({"metric": metric, "a": scores_a[metric].score(), "b": scores_b[metric].score(), **paired})
    return {
        "benchmark": name,
        "questions": len(shared),
        "only_a": len(rows_a) - len(shared),
        "only_b": len(rows_b) - len(shared),
        "a": str(a),
        "b": str(b),
        "rows": rows,
    }


def markdown_table(result: dict) -> str:
    lines = [
        f"# {result['benchmark']}: A = `{result['a']}`, B = `{result['b']}`",
        "",
        f"{result['questions']} shared questions (only in A: {result['only_a']}, only in B: {result['only_b']}); "
        f"paired bootstrap, * p < {SIGNIFICANCE}.",
        "",
        "| metric | A | B | B − A | 95% CI of B − A | p |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for r in result["rows"]:
        star = " *" if r["p_value"] is not None and r["p_value"] < SIGNIFICANCE else ""
        lo, hi = r["ci95"]
        lines.append(
            f"| {r['metric']} | {r['a']:.4f} | {r['b']:.4f} | {r['difference']:+.4f}{star} | "
            f"[{lo:+.4f}, {hi:+.4f}] | {r['p_value']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def write_chart(result: dict, path: Path) -> None:
    """Grouped bars of A and B per metric, a star over those whose difference is significant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(rows)), 3.5))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["a"] for r in rows], 0.4, label="A")
    ax.bar(x + 0.2, [r["b"] for r in rows], 0.4, label="B")
    for k, r in enumerate(rows):
        if r["p_value"] is not None and r["p_value"] < SIGNIFICANCE:
            ax.annotate("*", (k, max(r["a"], r["b"])), ha="center", va="bottom")
    ax.set_xticks(x, [r["metric"] for r in rows], rotation=30, ha="right")
    ax.set_title(f"{result['benchmark']} ({result['questions']} questions)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare(a: Path, b: Path, out: Path, resamples: int = DEFAULT_RESAMPLES) -> tuple[dict, str]:
    """Writes OUT/compare.md, OUT/compare.json and OUT/compare.png; returns (result, Markdown)."""
    result = compare_runs(Path(a), Path(b), resamples)
    table = markdown_table(result)
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(table, encoding="utf-8")
    (out / "compare.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    write_chart(result, out / "compare.png")
    return result, table
