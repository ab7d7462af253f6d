"""`vistralv-ray eval --benchmark NAME`: a benchmark's questions through Ray Data batch inference, scored.

The driver reads the benchmark's file (`formats.py`), asks every question through model actors that
share `EvalPredictor`'s prompt rendering and batched greedy generation (left padding: an answer does not
depend on the batch it was in), cleans the answers, and scores them with the benchmark's official
metrics plus a bootstrap 95% interval each. With `--blank-images` every question with an image is asked
again on a blank image and scored the same way under `blank_image_` names: what a model gets without
looking is the floor its real score should stand clear of.

Predictions are appended to OUT/predictions.jsonl as they arrive; a rerun with the same model,
benchmark, data and settings (OUT/run.json) asks only the questions not answered yet.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from vistralv_ray.errors import RecordError
from vistralv_ray.evaluation.benchmarks import Benchmark, clean_answer, get_benchmark
from vistralv_ray.evaluation.bootstrap import DEFAULT_RESAMPLES, bootstrap_interval
from vistralv_ray.evaluation.formats import Item
from vistralv_ray.inference.evaluate import BLANK_COLOUR, EvalPredictor, progress_bar
from vistralv_ray.logging import get_logger
from vistralv_ray.ray_runtime import init_ray

log = get_logger(__name__)

BLANK_PREFIX = "blank_image_"
PREDICTIONS_FILE, METRICS_FILE, RUN_FILE = "predictions.jsonl", "metrics.json", "run.json"


class BenchmarkPredictor(EvalPredictor):
    """A Ray Data actor: a batch of {id, image, prompt} in, the cleaned answer (and the blank-image
    answer) of each out. No teacher-forced loss: a benchmark scores answers only."""

    def __init__(
        self,
        model_dir: str,
        max_new_tokens: int = 32,
        device: str = "auto",
        chat_template: str | None = None,
        blank_images: bool = False,
    ):
        from PIL import Image

        from vistralv_ray.inference.models import generation_kwargs, load_model

        self.loaded = load_model(model_dir, device)
        if chat_template is not None:
            self.loaded.processor.chat_template = chat_template
        self.generate_kwargs = generation_kwargs(max_new_tokens, 0.0, 1.0)
        self.blank = Image.new("RGB", (64, 64), BLANK_COLOUR)
        self.blank_images = blank_images

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from vistralv_ray.data.images import open_checked, to_rgb

        rows: dict[str, list] = {k: [] for k in ("id", "raw_prediction", "blank_prediction", "reject_reason")}
        prompts, images, asked = [], [], []
        for rid, image_bytes, question in zip(batch["id"], batch["image"], batch["prompt"], strict=True):
            rows["id"].append(str(rid))
            rows["raw_prediction"].append("")
            rows["blank_prediction"].append(None)
            try:
                image = to_rgb(open_checked(image_bytes)) if image_bytes is not None else None
            except RecordError as e:  # counted in metrics.json, never a crash of the whole eval
                log.warning("question %r rejected: %s", str(rid), e)
                rows["reject_reason"].append(e.reason)
                continue
            rows["reject_reason"].append("")
            content = f"<image>\n{question}" if image is not None else str(question)
            prompts.append(self.prompt([{"role": "user", "content": content}]))
            images.append(image)
            asked.append(len(rows["id"]) - 1)
        for i, answer in zip(asked, self.answer(prompts, images), strict=True):
            rows["raw_prediction"][i] = answer
        if self.blank_images:
            with_image = [k for k, im in enumerate(images) if im is not None]
            answers = self.answer([prompts[k] for k in with_image], [self.blank] * len(with_image))
            for k, answer in zip(with_image, answers, strict=True):
                rows["blank_prediction"][asked[k]] = answer
        return rows


def resolve_chat_template(model_dir: str | Path, template: str | None) -> str | None:
    """The template to put on the processor: None to keep the model's own; an error when it has none
    and `--template` names none (never a silent fallback to some other model's format)."""
    from transformers import AutoProcessor

    from vistralv_ray.config import ConfigError
    from vistralv_ray.text.templates import get_chat_template

    if template:
        path = Path(template).expanduser()
        if path.is_file():
            return path.read_text(encoding="utf-8")
        if template not in ("vistral", "plain"):
            raise ConfigError(f"--template {template!r}: not a Jinja file, nor one of vistral, plain")
        return get_chat_template(template)
    if not getattr(AutoProcessor.from_pretrained(str(model_dir)), "chat_template", None):
        raise ConfigError(
            f"{model_dir}: the processor has no chat template; pass --template vistral, plain, or a Jinja file"
        )
    return None


def score_report(
    benchmark: Benchmark, predictions: list[str], items: list[Item], prefix: str = "", resamples: int = 1000
) -> tuple[dict, dict]:
    """(metric -> value, metric -> 95% interval), per group too where the benchmark has groups."""
    values, intervals = {}, {}
    scores = benchmark.score(predictions, items)
    for name, item_scores in scores.items():
        values[prefix + name] = item_scores.score()
        intervals[prefix + name] = bootstrap_interval(item_scores, resamples)
    groups = sorted({item.group for item in items})
    if benchmark.group_label and len(groups) > 1:
        first = next(iter(scores))
        for group in groups:
            index = [k for k, item in enumerate(items) if item.group == group]
            sub = benchmark.score([predictions[k] for k in index], [items[k] for k in index])[first]
            name = f"{prefix}{first}_{benchmark.group_label}_{group}"
            values[name], intervals[name] = sub.score(), bootstrap_interval(sub, resamples)
    return values, intervals


def read_predictions(path: Path) -> dict[str, dict]:
    rows = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                rows[row["id"]] = row
    return rows


def run_benchmark(
    model_dir: str | Path,
    benchmark: str,
    data: str,
    out: str | Path,
    images: str | None = None,
    lang: str = "vi",
    template: str | None = None,
    blank_images: bool = False,
    actors: int = 1,
    cpus_per_actor: float | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 32,
    limit: int | None = None,
    resamples: int = DEFAULT_RESAMPLES,
    progress: bool | None = None,
) -> dict:
    """Answer and score a benchmark; writes OUT/predictions.jsonl, OUT/metrics.json, returns the metrics.
    `progress`: the questions-done bar (None: where stderr is a terminal)."""
    started = time.time()
    bench = get_benchmark(benchmark)
    chat_template = resolve_chat_template(model_dir, template)
    loaded = bench.read(Path(data).expanduser(), images, lang)
    items = loaded.items[:limit] if limit else loaded.items
    if not items:
        raise ValueError(f"--data: no usable questions in {data} (rejected: {loaded.rejected})")
    if len({item.id for item in items}) != len(items):
        raise ValueError(f"--data: {data} has repeated question ids")

    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    settings = {
        "model": str(model_dir),
        "benchmark": benchmark,
        "data": str(data),
        "lang": lang,
        "template": template,
        "max_new_tokens": max_new_tokens,
    }
    done = {}
    if (out / RUN_FILE).is_file() and json.loads((out / RUN_FILE).read_text()) == settings:
        done = {k: r for k, r in read_predictions(out / PREDICTIONS_FILE).items() if _complete(r, blank_images)}
        log.info("%s: %d of %d questions already answered; asking the rest", out, len(done), len(items))
    (out / RUN_FILE).write_text(json.dumps(settings, indent=1))
    with (out / PREDICTIONS_FILE).open("w", encoding="utf-8") as f:  # keep only what this run can resume from
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in done.values())

    rejected = dict(loaded.rejected)
    todo = [item for item in items if item.id not in done]
    if todo:
        # Questions done / total, counting those a resumed run answered before.
        with progress_bar(len(items), len(items) - len(todo), f"eval {benchmark}", enabled=progress) as bar:
            rows = _predict(
                model_dir,
                bench,
                todo,
                out,
                chat_template,
                blank_images,
                actors,
                cpus_per_actor,
                batch_size,
                max_new_tokens,
                on_answer=bar.update,
            )
        for row in rows:
            if row.get("reject_reason"):
                rejected[row["reject_reason"]] = rejected.get(row["reject_reason"], 0) + 1
    answered = read_predictions(out / PREDICTIONS_FILE)
    scored = [item for item in items if item.id in answered]
    predictions = [answered[item.id]["prediction"] for item in scored]
    metrics: dict = {"benchmark": benchmark, "model": str(model_dir), "data": str(data), "questions": len(scored)}
    values, intervals = score_report(bench, predictions, scored, resamples=resamples)
    metrics.update(values)
    blank = [(item, answered[item.id]["blank_prediction"]) for item in scored]
    blank = [(item, p) for item, p in blank if p is not None]
    if blank_images:
        metrics[f"{BLANK_PREFIX}questions"] = len(blank)
        b_values, b_intervals = score_report(
            bench, [p for _, p in blank], [item for item, _ in blank], BLANK_PREFIX, resamples
        )
        metrics.update(b_values)
        intervals.update(b_intervals)
    metrics.update({"ci95": intervals, "rejected": rejected, "seconds": round(time.time() - started, 1)})
    if bench.name == "mtvqa":
        metrics["lang"] = lang
    # Sorted by the benchmark's own order, so that two runs' files line up.
    with (out / PREDICTIONS_FILE).open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(answered[item.id], ensure_ascii=False) + "\n" for item in scored)
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=1, ensure_ascii=False))
    return metrics


def _complete(row: dict, blank_images: bool) -> bool:
    return not blank_images or row.get("blank_prediction") is not None


def _predict(
    model_dir,
    bench,
    items,
    out,
    chat_template,
    blank_images,
    actors,
    cpus_per_actor,
    batch_size,
    max_new_tokens,
    on_answer=lambda n: None,
) -> list[dict]:
    """Ask `items` with Ray Data; each answered row is appended to predictions.jsonl as it arrives
    (and counted with `on_answer(1)`)."""
    import math

    import ray

    if not ray.is_initialized():
        from vistralv_ray.data.pipeline import apply_ray_data_env

        apply_ray_data_env()
        init_ray(what="eval", num_cpus=os.cpu_count(), include_dashboard=False)
    by_id = {item.id: item for item in items}
    records = [{"id": item.id, "image": item.image, "prompt": bench.prompt(item)} for item in items]
    ds = ray.data.from_items(records, override_num_blocks=max(1, math.ceil(len(records) / batch_size)))
    gpus = ray.cluster_resources().get("GPU", 0)
    cpus = cpus_per_actor or max(1.0, (ray.cluster_resources().get("CPU", 1) - 1.0) / actors)
    answers = ds.map_batches(
        BenchmarkPredictor,
        fn_constructor_kwargs={
            "model_dir": str(Path(model_dir).resolve()),
            "max_new_tokens": max_new_tokens,
            "chat_template": chat_template,
            "blank_images": blank_images,
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if gpus >= 1 else 0,
        num_cpus=cpus,
    )
    rows = []
    with (out / PREDICTIONS_FILE).open("a", encoding="utf-8") as f:
        for row in answers.iter_rows():
            row = {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
            rows.append(row)
            on_answer(1)
            if row["reject_reason"]:
                continue
            item = by_id[row["id"]]
            blank = row["blank_prediction"]
            line = {
                "id": item.id,
                "group": item.group,
                "question": item.question,
                "references": item.references,
                "prediction": clean_answer(row["raw_prediction"]),
                "raw_prediction": row["raw_prediction"],
                "blank_prediction": clean_answer(blank) if blank is not None else None,
            }
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
            f.flush()
    return rows
