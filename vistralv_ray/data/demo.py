"""A generated Vietnamese image-text corpus for the local demo and tests, in LLaVA JSON format.

Each image shows one to four shapes of one colour. Questions ask for the colour, the position (of a
single shape) or the count, with short answers, so accuracy can be measured and a model that ignores
the image is held to chance. Colour and position are what a tiny model with a frozen random vision
tower can learn (REFERENCE.md); shapes appear in captions and a few questions.

As in LLaVA-1.5's finetune mix (its VQA questions end in "Answer the question using a single word or
phrase."), a third of the finetune questions carry the benchmarks' short-answer instruction, so that a
model trained here answers `eval --benchmark`'s prompts as it answers the plain question. The held-out
questions stay plain: the benchmark adds the instruction to them at eval time.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from vistralv_ray.evaluation.benchmarks import SHORT_ANSWER, SHORT_ANSWER_SAME_LANGUAGE

COLOURS = {  # name -> RGB
    "đỏ": (220, 30, 30),
    "xanh lá": (30, 170, 50),
    "xanh dương": (30, 70, 220),
    "vàng": (235, 205, 20),
}
SHAPES = {"tròn": "hình tròn", "vuông": "hình vuông", "tam giác": "hình tam giác"}
POSITIONS = {"trái": "bên trái", "phải": "bên phải", "trên": "phía trên", "dưới": "phía dưới"}
COUNT_WORDS = {1: "một", 2: "hai", 3: "ba", 4: "bốn"}

COLOUR_QUESTIONS = ["Hình trong ảnh có màu gì?", "Các hình có màu gì?", "Màu của hình là gì?"]
POSITION_QUESTIONS = ["Hình nằm ở đâu trong ảnh?", "Hình ở vị trí nào?"]
COUNT_QUESTIONS = ["Có bao nhiêu hình trong ảnh?", "Trong ảnh có mấy hình?"]
SHAPE_QUESTIONS = ["Đó là hình gì?", "Hình trong ảnh là hình gì?"]
DESCRIBE_INSTRUCTIONS = [
    "Mô tả ngắn gọn bức ảnh.",
    "Hãy mô tả hình ảnh này.",
    "Bức ảnh cho thấy điều gì?",
    "Viết một chú thích cho ảnh.",
    "Trong ảnh có gì?",
]
BACKGROUND = (245, 245, 240)
# The share of finetune questions that carry a short-answer instruction, and the instructions (the
# benchmarks' own text, so that training and `eval --benchmark` ask alike). It costs the quickstart's
# tiny model some position accuracy (0.87 against 0.94 plain, docs/EVAL.md): the price of answering
# benchmark prompts as plain questions.
SHORT_ANSWER_SHARE = 1 / 3
SHORT_ANSWER_INSTRUCTIONS = (SHORT_ANSWER, SHORT_ANSWER_SAME_LANGUAGE)


@dataclass
class Scene:
    colour: str
    shape: str
    count: int
    position: str | None  # only for a single shape

    def caption(self) -> str:
        noun = SHAPES[self.shape]
        if self.count == 1:
            return f"Một {noun} màu {self.colour} ở {POSITIONS[self.position]}."
        return f"{COUNT_WORDS[self.count].capitalize()} {noun} màu {self.colour}."

    def qa_pairs(self, rng: random.Random) -> list[tuple[str, str]]:
        pairs = [(rng.choice(COLOUR_QUESTIONS), f"Màu {self.colour}.")]
        if self.count == 1:
            pairs.append((rng.choice(POSITION_QUESTIONS), f"{POSITIONS[self.position].capitalize()}."))
        else:
            pairs.append((rng.choice(COUNT_QUESTIONS), f"{COUNT_WORDS[self.count].capitalize()}."))
        if rng.random() < 0.25:
            pairs.append((rng.choice(SHAPE_QUESTIONS), f"{SHAPES[self.shape].capitalize()}."))
        rng.shuffle(pairs)
        return pairs


def random_scene(rng: random.Random) -> Scene:
    count = rng.choice([1, 1, 2, 3, 4])
    return Scene(
        colour=rng.choice(list(COLOURS)),
        shape=rng.choice(list(SHAPES)),
        count=count,
        position=rng.choice(list(POSITIONS)) if count == 1 else None,
    )


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "tròn":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "vuông":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)


def render_scene(scene: Scene, size: int, rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    fill = COLOURS[scene.colour]
    if scene.count == 1:
        r = size * rng.uniform(0.16, 0.22)
        jitter = size * 0.05
        centre = {
            "trái": (size * 0.25, size * 0.5),
            "phải": (size * 0.75, size * 0.5),
            "trên": (size * 0.5, size * 0.25),
            "dưới": (size * 0.5, size * 0.75),
        }[scene.position]
        _draw_shape(
            draw,
            scene.shape,
            centre[0] + rng.uniform(-jitter, jitter),
            centre[1] + rng.uniform(-jitter, jitter),
            r,
            fill,
        )
        return img
    # Several shapes: one per cell of a 2x2 grid, so they never overlap and stay countable.
    cells = rng.sample([(0, 0), (0, 1), (1, 0), (1, 1)], scene.count)
    r = size * 0.15
    for row, col in cells:
        cx = size * (0.25 + 0.5 * col) + rng.uniform(-size * 0.04, size * 0.04)
        cy = size * (0.25 + 0.5 * row) + rng.uniform(-size * 0.04, size * 0.04)
        _draw_shape(draw, scene.shape, cx, cy, r, fill)
    return img


def make_demo_corpus(
    out: str | Path,
    train_images: int = 600,
    eval_images: int = 100,
    align_images: int | None = None,
    image_size: int = 64,
    seed: int = 0,
) -> dict[str, Path]:
    """Write OUT/images/*.jpg, OUT/align.json, OUT/train.json and OUT/eval.json; returns their paths.

    Eval images are drawn separately from train and align images, so eval never sees a train image.
    About a third of train.json's questions end in a short-answer instruction; eval.json's never do.
    """
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    align_images = train_images if align_images is None else align_images

    def make_images(prefix: str, n: int) -> list[tuple[str, Scene]]:
        items = []
        for i in range(n):
            scene = random_scene(rng)
            name = f"{prefix}_{i:05d}.jpg"
            render_scene(scene, image_size, rng).save(out / "images" / name, quality=92)
            items.append((name, scene))
        return items

    train_items = make_images("train", max(train_images, align_images))
    eval_items = make_images("eval", eval_images)

    align = [
        {
            "id": f"align-{i:05d}",
            "image": name,
            "conversations": [
                {"from": "human", "value": f"{rng.choice(DESCRIBE_INSTRUCTIONS)}\n<image>"},
                {"from": "gpt", "value": scene.caption()},
            ],
        }
        for i, (name, scene) in enumerate(train_items[:align_images])
    ]

    # Its own generator: the instructions leave every other draw (images, questions, eval.json) as it was.
    instruction_rng = random.Random(f"short-answer-{seed}")

    def qa_records(prefix: str, items: list[tuple[str, Scene]], instructed: bool) -> list[dict]:
        records = []
        for i, (name, scene) in enumerate(items):
            turns = []
            for j, (q, a) in enumerate(scene.qa_pairs(rng)):
                if instructed and instruction_rng.random() < SHORT_ANSWER_SHARE:
                    q = f"{q}\n{instruction_rng.choice(SHORT_ANSWER_INSTRUCTIONS)}"
                # The <image> tag stands before or after the first question, as in real LLaVA data.
                if j == 0:
                    q = f"<image>\n{q}" if rng.random() < 0.5 else f"{q}\n<image>"
                turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
            records.append({"id": f"{prefix}-{i:05d}", "image": name, "conversations": turns})
        return records

    paths = {
        "align": out / "align.json",
        "train": out / "train.json",
        "eval": out / "eval.json",
        "images": out / "images",
    }
    for key, records in (
        ("align", align),
        ("train", qa_records("train", train_items[:train_images], instructed=True)),
        ("eval", qa_records("eval", eval_items, instructed=False)),
    ):
        paths[key].write_text(json.dumps(records, ensure_ascii=False, indent=1))
    return paths


def vietnamese_corpus(seed: int = 0, n: int = 3000) -> list[str]:
    """Vietnamese sentences for training a tiny tokenizer: demo phrases, prompts and everyday text."""
    from vistralv_ray.text.templates import VISTRAL_SYSTEM_SENTENCES

    rng = random.Random(seed)
    fixed = [
        *VISTRAL_SYSTEM_SENTENCES,
        *COLOUR_QUESTIONS,
        *POSITION_QUESTIONS,
        *COUNT_QUESTIONS,
        *SHAPE_QUESTIONS,
        *DESCRIBE_INSTRUCTIONS,
        "Bạn là một trợ lí Tiếng Việt nhiệt tình và trung thực.",
        "Xin chào! Tôi có thể giúp gì cho bạn hôm nay?",
        "Hà Nội là thủ đô của Việt Nam, một thành phố nghìn năm văn hiến.",
        "Phở bò là món ăn nổi tiếng được nhiều người yêu thích.",
        "Mặt trời mọc ở đằng đông và lặn ở đằng tây.",
        "Những đứa trẻ đang chơi đùa vui vẻ trong sân trường.",
        "Cảm ơn bạn rất nhiều vì câu trả lời chi tiết.",
    ]
    sentences = list(fixed) * 5
    for _ in range(n):
        scene = random_scene(rng)
        sentences.append(scene.caption())
        sentences += [f"{q} {a}" for q, a in scene.qa_pairs(rng)]
    return sentences


def held_out_benchmark_files(eval_json: str | Path, images: str | Path, out: str | Path) -> dict[str, Path]:
    """The demo's held-out questions (OUT/eval.json of `make_demo_corpus`) in two published benchmark
    layouts, for `vistralv-ray eval --benchmark`: OUT/openvivqa.json (VLSP JSON, its images named from
    `images`: pass `--images` that folder) and OUT/mtvqa.parquet (MTVQA's rows, images embedded, lang
    "vi"). Every human turn with the answer after it is one question, in the record's order, its answer
    the reference as the demo wrote it; in MTVQA's file without the closing full stop, as MTVQA's own
    answers are (its scorer removes every "." from the prediction only: such a reference never matches)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = json.loads(Path(eval_json).read_text(encoding="utf-8"))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vlsp: dict = {"images": {}, "annotations": {}}
    rows = []
    for k, record in enumerate(records):
        turns = record["conversations"]
        pairs = [
            {"question": q["value"].replace("<image>", "").strip(), "answer": a["value"].strip()}
            for q, a in zip(turns[::2], turns[1::2], strict=True)
        ]
        vlsp["images"][str(k)] = record["image"]
        for j, pair in enumerate(pairs):
            vlsp["annotations"][f"{record['id']}-{j}"] = {"image_id": k, **pair}
        image = (Path(images) / record["image"]).read_bytes()
        qa = json.dumps([{**pair, "answer": pair["answer"].rstrip(".")} for pair in pairs], ensure_ascii=False)
        rows.append(
            {"id": record["id"], "lang": "vi", "image": {"bytes": image, "path": record["image"]}, "qa_pairs": qa}
        )
    paths = {"openvivqa": out / "openvivqa.json", "mtvqa": out / "mtvqa.parquet"}
    paths["openvivqa"].write_text(json.dumps(vlsp, ensure_ascii=False, indent=1), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(rows), paths["mtvqa"])
    return paths
