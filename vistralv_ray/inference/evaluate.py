"""`vistralv-ray eval`: batch inference with Ray Data over LLaVA JSON or prepared shards.

Model actors (`map_batches` with an actor pool, one GPU each when there are GPUs) load the exported
model with plain transformers and, for every record, compute the teacher-forced loss of its answers
and answer each of its questions with the real image. Every question that accuracy counts is asked
again with a blank image in place of its own (a question without an image keeps its answer: there is
nothing to blank): accuracy against blank-image accuracy on the same questions shows how much the model
really looks at the image. Prompts end with the template's generation prompt, as a user's would.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from vistralv_ray.errors import RecordError
from vistralv_ray.logging import get_logger
from vistralv_ray.ray_runtime import init_ray

log = get_logger(__name__)

SHARD_COLUMNS = ["id", "image", "messages"]
READ_CPUS = 0.25
SHORT_ANSWER_WORDS = 6  # answers up to this long count towards accuracy
BLANK_COLOUR = (255, 255, 255)


def progress_bar(total: int, done: int = 0, desc: str = "eval", unit: str = "question", enabled: bool | None = None):
    """Done / total on stderr as answers arrive, like training's bar: drawn where stderr is a terminal
    unless `enabled` says otherwise (`--progress` / `--no-progress`); job logs get the log lines."""
    import sys

    from tqdm import tqdm

    show = sys.stderr.isatty() if enabled is None else enabled
    return tqdm(total=total, initial=done, desc=desc, unit=unit, file=sys.stderr, disable=not show, dynamic_ncols=True)


def is_shards(path: str) -> bool:
    from vistralv_ray.data import storage

    p = Path(path).expanduser()
    return storage.is_s3(path) or p.is_dir() or p.suffix == ".parquet"


def load_eval_records(path: str, image_root: str | None = None) -> tuple[list[dict], dict[str, int]]:
    """Records {id, image (bytes or None), messages (JSON)} of a LLaVA JSON file, and rejected counts
    by reason. (Shards are not loaded here: Ray Data streams them, see `eval_dataset`.)"""
    p = Path(path).expanduser()
    from vistralv_ray.data.sources import read_records
    from vistralv_ray.text.conversation import normalize_messages

    roots = [Path(image_root).expanduser()] if image_root else [p.parent, p.parent / "images"]
    records, rejected = [], {}
    for row in read_records(p, "llava"):
        try:
            if "error" in row:
                raise RecordError("malformed_record", row["error"])
            image = _read_image(row["image"], roots) if row.get("image") else None
            messages = normalize_messages(row["turns"], has_image=image is not None)
        except RecordError as e:
            rejected[e.reason] = rejected.get(e.reason, 0) + 1
            log.warning("eval record %r rejected: %s", row["id"], e)
            continue
        records.append({"id": row["id"], "image": image, "messages": json.dumps(messages, ensure_ascii=False)})
    return records, rejected


def _read_image(name: str, roots: list[Path]) -> bytes:
    for root in roots:
        candidate = (root / name).resolve()
        if candidate.is_relative_to(root.resolve()) and candidate.is_file():
            return candidate.read_bytes()
    raise RecordError("missing_image", f"image {name!r} not found under {', '.join(map(str, roots))}")


def eval_dataset(data: str, image_root: str | None, batch_size: int, limit: int | None):
    """(Ray dataset of records, number of records, rejected counts). Shards (local or s3://) stream
    from `read_parquet` like training data; a LLaVA JSON file is read here, its images included."""
    import ray.data

    if is_shards(data):
        from vistralv_ray.data import storage
        from vistralv_ray.data.pipeline import count_records, shard_files

        files = shard_files([data])
        fs, _ = storage.filesystem_for(files[0])
        paths = [storage.filesystem_for(f)[1] for f in files]
        # Reads take a sliver of a CPU: the model actors hold the rest (see `evaluate`).
        ds = ray.data.read_parquet(paths, filesystem=fs, columns=SHARD_COLUMNS, num_cpus=READ_CPUS)
        total = count_records(files)
        if limit:
            ds, total = ds.limit(limit), min(total, limit)
        return ds, total, {}
    records, rejected = load_eval_records(data, image_root)
    records = records[:limit] if limit else records
    blocks = max(1, math.ceil(len(records) / batch_size))
    return ray.data.from_items(records, override_num_blocks=blocks) if records else None, len(records), rejected


def _messages(value) -> list[dict]:
    """A record's messages: JSON text (from LLaVA JSON) or the shards' list of {role, content}."""
    if isinstance(value, str):
        return json.loads(value)
    return [{"role": m["role"], "content": m["content"]} for m in value]


def is_short_answer(reference: str) -> bool:
    """Whether a question counts towards accuracy (and so towards its blank-image control)."""
    return len(str(reference).split()) <= SHORT_ANSWER_WORDS


def questions_of(messages: list[dict]) -> list[tuple[list[dict], str, str]]:
    """(prompt messages, question, reference answer) for every assistant turn, earlier answers as history."""
    out = []
    for i, msg in enumerate(messages):
        if msg["role"] == "assistant" and i > 0:
            question = messages[i - 1]["content"].replace("<image>", "").strip()
            out.append((messages[:i], question, msg["content"]))
    return out


class EvalPredictor:
    """A Ray Data actor: one model per actor, a batch of records in, one row per question out."""

    def __init__(self, model_dir: str, max_new_tokens: int = 32, device: str = "auto"):
        from PIL import Image

        from vistralv_ray.inference.models import generation_kwargs, load_model
        from vistralv_ray.text.conversation import ConversationEncoder

        self.loaded = load_model(model_dir, device)
        config = self.loaded.model.config
        max_positions = getattr(config.text_config, "max_position_embeddings", 32768)
        self.encoder = ConversationEncoder(
            self.loaded.tokenizer, self.loaded.processor.chat_template, config.image_seq_length, max_positions
        )
        self.generate_kwargs = generation_kwargs(max_new_tokens, 0.0, 1.0)
        self.blank = Image.new("RGB", (64, 64), BLANK_COLOUR)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from vistralv_ray.data.images import open_checked, to_rgb
        from vistralv_ray.text.conversation import normalize_messages

        rows: dict[str, list] = {
            k: []
            for k in (
                "id",
                "turn",
                "question",
                "reference",
                "prediction",
                "blank_prediction",
                "loss_sum",
                "loss_tokens",
                "has_image",
                "reject_reason",
            )
        }
        prompts, images, asked, counted = [], [], [], []
        for rid, image_bytes, raw_messages in zip(batch["id"], batch["image"], batch["messages"], strict=True):
            image, loss_sum, loss_tokens = None, 0.0, 0
            try:
                image = to_rgb(open_checked(image_bytes)) if image_bytes is not None else None
                messages = normalize_messages(_messages(raw_messages), has_image=image is not None)
                loss_sum, loss_tokens = self.answer_loss(messages, image)
                record_prompts = [
                    (turn, question, reference, self.prompt(prompt))
                    for turn, (prompt, question, reference) in enumerate(questions_of(messages))
                ]
            except RecordError as e:  # counted in metrics.json, never a crash of the whole eval
                log.warning("eval record %r rejected: %s", str(rid), e)
                image, record_prompts, reason = None, [(-1, "", "", None)], e.reason
            else:
                reason = ""
            for turn, question, reference, prompt in record_prompts:
                rows["id"].append(str(rid))
                rows["turn"].append(turn)
                rows["question"].append(question)
                rows["reference"].append(reference)
                rows["loss_sum"].append(loss_sum if turn == 0 else 0.0)
                rows["loss_tokens"].append(loss_tokens if turn == 0 else 0)
                rows["has_image"].append(image is not None)
                rows["reject_reason"].append(reason)
                if prompt is not None:
                    asked.append(len(rows["id"]) - 1)
                    counted.append(is_short_answer(reference))
                    prompts.append(prompt)
                    images.append(image)
        rows["prediction"] = [""] * len(rows["id"])
        rows["blank_prediction"] = [None] * len(rows["id"])
        for i, text in zip(asked, self.answer(prompts, images), strict=True):
            rows["prediction"][i] = text
        # The control asks exactly the questions accuracy counts, each with its own prompt.
        with_image = [k for k, im in enumerate(images) if im is not None and counted[k]]
        blank_answers = self.answer([prompts[k] for k in with_image], [self.blank] * len(with_image))
        for k, text in zip(with_image, blank_answers, strict=True):
            rows["blank_prediction"][asked[k]] = text
        for k, im in enumerate(images):
            if im is None and counted[k]:  # no image to blank: the same prompt, the same greedy answer
                rows["blank_prediction"][asked[k]] = rows["prediction"][asked[k]]
        return rows

    def prompt(self, messages: list[dict]) -> str:
        """The rendered conversation up to a question, ending where the answer starts (for a `native`
        template, its assistant header: the generation prompt)."""
        return self.loaded.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    @torch.no_grad()
    def answer(self, prompts: list[str], images: list) -> list[str]:
        from vistralv_ray.inference.models import model_inputs

        if not prompts:
            return []
        inputs = model_inputs(self.loaded, prompts, [im for im in images if im is not None])
        out = self.loaded.model.generate(**inputs, **self.generate_kwargs)
        new = out[:, inputs["input_ids"].shape[1] :]
        return [t.strip() for t in self.loaded.tokenizer.batch_decode(new, skip_special_tokens=True)]

    @torch.no_grad()
    def answer_loss(self, messages: list[dict], image) -> tuple[float, int]:
        """Summed cross-entropy of the answer tokens (and their </s>) of the whole conversation."""
        encoded = self.encoder.encode(messages)
        device = self.loaded.device
        ids = torch.as_tensor(encoded.input_ids, dtype=torch.long, device=device)[None]
        labels = torch.as_tensor(encoded.labels, dtype=torch.long, device=device)[None]
        kwargs = {}
        if image is not None:
            pixels = self.loaded.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
            kwargs["pixel_values"] = pixels.to(device, self.loaded.model.dtype)
        logits = self.loaded.model(input_ids=ids, **kwargs).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum")
        return float(loss), int((labels[0, 1:] != -100).sum())


def evaluate(
    model_dir: str | Path,
    data: str,
    out: str | Path,
    image_root: str | None = None,
    actors: int = 1,
    cpus_per_actor: float | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 32,
    limit: int | None = None,
    progress: bool | None = None,
) -> dict:
    """Run the model over `data`; writes OUT/predictions.jsonl and OUT/metrics.json, returns the metrics.
    `progress`: the records-done bar (None: where stderr is a terminal)."""
    import ray

    started = time.time()
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    if not ray.is_initialized():
        from vistralv_ray.data.pipeline import apply_ray_data_env

        apply_ray_data_env()
        init_ray(what="eval", num_cpus=os.cpu_count(), include_dashboard=False)
    ds, n_records, rejected = eval_dataset(data, image_root, batch_size, limit)
    if ds is None or n_records == 0:
        raise ValueError(f"--data: no usable records in {data} (rejected: {rejected})")
    gpus = ray.cluster_resources().get("GPU", 0)
    # The actors take the CPUs (torch threads), less room for the reads and Ray Data's own tasks.
    cpus = cpus_per_actor or max(1.0, (ray.cluster_resources().get("CPU", 1) - 1.0) / actors)
    predictions = ds.map_batches(
        EvalPredictor,
        fn_constructor_kwargs={"model_dir": str(Path(model_dir).resolve()), "max_new_tokens": max_new_tokens},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if gpus >= 1 else 0,
        num_cpus=cpus,
    )
    rows, seen = [], set()
    # A record's questions come out of one actor call together: the bar counts records done.
    with progress_bar(n_records, desc="eval", unit="record", enabled=progress) as bar:
        for row in predictions.iter_rows():
            rows.append(row)
            if row["id"] not in seen:
                seen.add(row["id"])
                bar.update(1)
    rows.sort(key=lambda r: (r["id"], r["turn"]))
    metrics = summarize(rows, rejected)
    metrics.update(
        {
            "model": str(model_dir),
            "data": str(data),
            "records": n_records + sum(rejected.values()),
            "seconds": round(time.time() - started, 1),
        }
    )
    with (out / "predictions.jsonl").open("w", encoding="utf-8") as f:
        for r in rows:
            if r["reject_reason"]:
                continue
            line = {k: r[k] for k in ("id", "turn", "question", "reference", "prediction", "blank_prediction")}
            f.write(json.dumps(_plain(line), ensure_ascii=False) + "\n")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, ensure_ascii=False))
    return metrics


def summarize(rows: list[dict], rejected: dict[str, int]) -> dict:
    from vistralv_ray.inference.models import answer_matches

    rejected = dict(rejected)
    for r in rows:
        if r.get("reject_reason"):
            rejected[r["reject_reason"]] = rejected.get(r["reject_reason"], 0) + 1
    rows = [r for r in rows if not r.get("reject_reason")]
    loss_sum = sum(float(r["loss_sum"]) for r in rows)
    tokens = sum(int(r["loss_tokens"]) for r in rows)
    loss = loss_sum / tokens if tokens else float("nan")
    short = [r for r in rows if is_short_answer(r["reference"])]
    # Counted from what the control really answered: a question it missed shows as a count below accuracy's.
    blank_set = [r for r in short if r["blank_prediction"] is not None]
    correct = sum(answer_matches(r["reference"], r["prediction"]) for r in short)
    blank_correct = sum(answer_matches(r["reference"], r["blank_prediction"]) for r in blank_set)
    return {
        "questions": len(rows),
        "short_answer_questions": len(short),
        "blank_image_questions": len(blank_set),
        "blank_image_replaced": sum(bool(r["has_image"]) for r in blank_set),
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)) if tokens else float("nan"),
        "answer_tokens": tokens,
        "accuracy": correct / len(short) if short else None,
        "blank_image_accuracy": blank_correct / len(blank_set) if blank_set else None,
        "rejected": rejected,
    }


def _plain(row: dict) -> dict:
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
