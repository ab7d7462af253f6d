"""Readers of the benchmarks' published file layouts into one list of questions (`Item`).

Images are read here, on the driver, as bytes (the model actors decode them as training does). A
question whose image is missing is counted by reason and left out, never a crash of the whole eval.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from vistralv_ray.errors import RecordError
from vistralv_ray.evaluation.text import nfc
from vistralv_ray.logging import get_logger

log = get_logger(__name__)


@dataclass
class Item:
    id: str
    image: bytes | None
    question: str  # "" for a caption set
    references: list[str]
    group: str = ""  # ViVQA's question type, MTVQA's language: metrics are also reported per group
    extra: dict = field(default_factory=dict)


@dataclass
class Loaded:
    items: list[Item]
    rejected: dict[str, int]


def image_roots(data: Path, images: str | None) -> list[Path]:
    return [Path(images).expanduser()] if images else [data.parent, data.parent / "images"]


def read_image(names: list[str], roots: list[Path]) -> bytes:
    """The first of `names` found under one of `roots` (never outside them)."""
    for root in roots:
        for name in names:
            candidate = (root / name).resolve()
            if candidate.is_relative_to(root.resolve()) and candidate.is_file():
                return candidate.read_bytes()
    raise RecordError("missing_image", f"image {names[0]!r} not found under {', '.join(map(str, roots))}")


def _collect(rows, roots: list[Path]) -> Loaded:
    """rows: (id, image names, question, references, group); images resolved, failures counted."""
    items, rejected = [], {}
    for rid, names, question, references, group in rows:
        try:
            refs = [nfc(r) for r in references if str(r).strip()]
            if not refs:
                raise RecordError("no_reference", "no reference answer")
            image = read_image(names, roots) if names else None
        except RecordError as e:
            rejected[e.reason] = rejected.get(e.reason, 0) + 1
            log.warning("question %r rejected: %s", rid, e)
            continue
        items.append(Item(str(rid), image, nfc(question), refs, str(group)))
    return Loaded(items, rejected)


def coco_2014_names(image_id: int) -> list[str]:
    """ViVQA's images are COCO 2014 images named by id: train or val, flat or in their split folder."""
    names = [f"COCO_{split}2014_{image_id:012d}.jpg" for split in ("train", "val")]
    return names + [f"{split}2014/{name}" for split, name in zip(("train", "val"), names)]


def read_vivqa(path: Path, images: str | None) -> Loaded:
    """ViVQA's CSV: an unnamed index column, question, answer, img_id, type."""
    with path.open(encoding="utf-8", newline="") as f:
        rows = [
            (row.get("") or str(i), coco_2014_names(int(row["img_id"])), row["question"], [row["answer"]], row["type"])
            for i, row in enumerate(csv.DictReader(f))
        ]
    return _collect(rows, image_roots(path, images))


def read_vlsp(path: Path, images: str | None) -> Loaded:
    """OpenViVQA and EVJVQA (VLSP): {"images": {id: filename}, "annotations": {qid: {image_id, question,
    answer}}}; lists of {"id": ...} objects are read too."""
    data = json.loads(path.read_text(encoding="utf-8"))
    files = _by_id(data["images"], ("filename", "file_name"))
    annotations = data["annotations"]
    if isinstance(annotations, list):
        annotations = {str(a.get("id", i)): a for i, a in enumerate(annotations)}
    rows = []
    for qid, a in annotations.items():
        answers = a["answers"] if "answers" in a else [a["answer"]]
        rows.append((qid, [files.get(str(a["image_id"]), str(a["image_id"]))], a["question"], answers, ""))
    return _collect(rows, image_roots(path, images))


def read_text_vqa(path: Path, images: str | None) -> Loaded:
    """ViOCRVQA / ViTextVQA: COCO-like {"images": [{id, filename}], "annotations": [{id, image_id,
    question, answers: [...]}]}, several reference answers a question."""
    return read_vlsp(path, images)


def read_mtvqa(path: Path, images: str | None, lang: str = "vi") -> Loaded:
    """MTVQA's Parquet: rows of `image` (bytes, or {bytes, path}), `qa_pairs` (a list of {question,
    answer}, or that list as JSON text), `lang` and `id`; `lang="all"` keeps every language."""
    import pyarrow.parquet as pq

    items, rejected = [], {}
    for row in pq.read_table(path).to_pylist():
        if lang != "all" and str(row.get("lang", "")).lower() != lang.lower():
            continue
        image = row["image"]["bytes"] if isinstance(row["image"], dict) else row["image"]
        pairs = json.loads(row["qa_pairs"]) if isinstance(row["qa_pairs"], str) else row["qa_pairs"]
        for k, pair in enumerate(pairs):
            answers = pair["answer"] if isinstance(pair["answer"], list) else [pair["answer"]]
            if image is None:
                rejected["missing_image"] = rejected.get("missing_image", 0) + 1
                continue
            items.append(Item(f"{row['id']}-{k}", image, nfc(pair["question"]), [nfc(a) for a in answers], row["lang"]))
    return Loaded(items, rejected)


def read_coco_captions(path: Path, images: str | None) -> Loaded:
    """UIT-ViIC / KTVIC: COCO caption JSON, {"images": [{id, file_name}], "annotations": [{image_id,
    caption}]}; one item per image with all its captions as references."""
    data = json.loads(path.read_text(encoding="utf-8"))
    files = _by_id(data["images"], ("file_name", "filename"))
    captions: dict[str, list[str]] = {}
    for a in data["annotations"]:
        captions.setdefault(str(a["image_id"]), []).append(a["caption"])
    rows = [(image_id, [name], "", captions.get(image_id, []), "") for image_id, name in files.items()]
    return _collect(rows, image_roots(path, images))


def _by_id(images, keys: tuple[str, ...]) -> dict[str, str]:
    if isinstance(images, dict):
        return {str(k): v for k, v in images.items()}
    return {str(im["id"]): next(im[k] for k in keys if k in im) for im in images}
