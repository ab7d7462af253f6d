"""Train/serve pixel parity: what training decodes is what the exported image processor gives.

Training's side is the real decode path (the `Preprocessor` of the Ray Data pipeline at the tower's
size, `decode_to_pixels` with the tower's pad colour at SigLIP-256's); the other side is the image
processor the export writes, loaded back with `AutoProcessor` as a user of the export loads it, fed
the image as a user opens it (EXIF orientation applied, transparency left to the processor). Images
are noise on gradients with shapes: a flat image cannot tell one resampling filter from another.
The bound (issue 17): within 2 levels of 255 at every pixel but the outermost ring. Shards of
`prepare --store-pixels` (resized once, at the model's size) are held to the same pixels, exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageOps

from vistralv_ray.config.schema import Config, ModelConfig
from vistralv_ray.data.images import StoredPixels, decode_to_pixels, pixel_stats, pixels_for_model
from vistralv_ray.data.preprocess import Preprocessor
from vistralv_ray.training.step import normalize_pixels

BOUND = 2  # levels of 255
# (width, height) as displayed; tall ones are padded left and right, and resized across their padding.
SIZES = [(1024, 768), (640, 480), (640, 427), (500, 333), (37, 23), (427, 640), (23, 37)]
# (format, transparent, EXIF orientation): a JPEG has no alpha; 6 and 8 store the photo sideways.
KINDS = [
    ("JPEG", False, 1),
    ("JPEG", False, 6),
    ("PNG", False, 1),
    ("PNG", False, 8),
    ("PNG", True, 1),
    ("PNG", True, 6),
]
CASES = [(w, h, *kind) for w, h in SIZES for kind in KINDS]
CONVERSATION = [{"role": "user", "content": "<image>\nGì?"}, {"role": "assistant", "content": "Ảnh."}]
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def photo(width: int, height: int, seed: int, transparent: bool = False) -> Image.Image:
    """A photo-like test image: a colour gradient, sensor noise and a few solid shapes with hard edges;
    `transparent`: an alpha ramp with a fully transparent band (alpha 0) on the left."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    a, b = rng.uniform(0, 255, (2, 3))
    t = (xx / width + yy / height) / 2
    base = a + (b - a) * t[..., None] + rng.normal(0, 12, (height, width, 3))
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        box = [x0, y0, x0 + rng.uniform(2, width / 2), y0 + rng.uniform(2, height / 2)]
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    if transparent:
        alpha = np.clip(xx / width * 400 - 80, 0, 255).astype(np.uint8)  # 0 on the left fifth, then a ramp
        img.putalpha(Image.fromarray(alpha))
    return img


# Orientation tag -> the transpose that stores an upright image so that the tag shows it upright again.
STORE = {1: None, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def encode(img: Image.Image, fmt: str, orientation: int) -> bytes:
    stored = img if STORE[orientation] is None else img.transpose(STORE[orientation])
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    buf = io.BytesIO()
    stored.save(buf, format=fmt, exif=exif, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def as_user_opens(data: bytes) -> Image.Image:
    """The image a user hands the processor: orientation applied (as transformers' `load_image` does),
    colour mode and transparency left to the processor's own `convert_rgb`."""
    return ImageOps.exif_transpose(Image.open(io.BytesIO(data)))


@pytest.fixture(scope="module")
def images() -> dict[tuple, tuple[bytes, Image.Image]]:
    out = {}
    for i, (w, h, fmt, transparent, orientation) in enumerate(CASES):
        upright = photo(w, h, seed=i, transparent=transparent)
        out[(w, h, fmt, transparent, orientation)] = (encode(upright, fmt, orientation), upright)
    return out


def model_config(tiny_assets, aspect: str, vision_tower: str | None = None) -> ModelConfig:
    return ModelConfig(
        language_model=str(tiny_assets["llm"]),
        vision_tower=vision_tower or str(tiny_assets["vision"]),
        max_length=256,
        aspect=aspect,
    )


def exported_image_processor(model_cfg: ModelConfig, out, image_size: int | None = None):
    """The image processor an export of this model writes, as `AutoProcessor` loads it back: the PIL
    backend, the default without torchvision and what the README has users ask for with it."""
    from transformers import AutoProcessor

    from vistralv_ray.inference.export import build_processor
    from vistralv_ray.text.encoder import build_tokenizer, load_vision_config

    tokenizer, template = build_tokenizer(model_cfg)
    vision = load_vision_config(model_cfg.vision_tower)
    if image_size is not None:  # the same tower at another resolution (SigLIP-256's), as export would write it
        vision = copy.deepcopy(vision)
        vision.image_size = image_size
    build_processor(Config(model=model_cfg), tokenizer, template, vision).save_pretrained(out)
    return AutoProcessor.from_pretrained(out, backend="pil").image_processor


def processor_levels(image_processor, image: Image.Image) -> np.ndarray:
    """The processor's pixel_values, un-normalised to levels of 255 (HWC float, not rounded)."""
    x = image_processor(images=[image], return_tensors="np")["pixel_values"][0]
    mean = np.asarray(image_processor.image_mean)[:, None, None]
    std = np.asarray(image_processor.image_std)[:, None, None]
    return ((x * std + mean) * 255).transpose(1, 2, 0)


def assert_within_bound(ours: np.ndarray, theirs: np.ndarray, what) -> None:
    assert ours.shape == theirs.shape, (what, ours.shape, theirs.shape)
    diff = np.abs(ours.astype(np.float64) - theirs)
    interior = diff[1:-1, 1:-1]
    assert interior.max() <= BOUND + 1e-3, f"{what}: max {interior.max():.1f} levels (mean {interior.mean():.2f})"


def training_pixels(preprocessor: Preprocessor, data: bytes) -> np.ndarray:
    """The pixels of one record through the training pipeline's own preprocessing."""
    out = preprocessor({"id": ["r"], "image": [data], "messages": [CONVERSATION]})
    assert out["reject_reason"][0] == "", out["reject_detail"][0]
    return out["pixel_values"][0]


@pytest.mark.parametrize("aspect", ["resize", "pad"])
def test_training_pipeline_gives_the_exported_processors_pixels(tiny_assets, images, aspect, tmp_path):
    model_cfg = model_config(tiny_assets, aspect)
    preprocessor = Preprocessor(dataclasses.asdict(model_cfg), max_pixels=10_000_000)
    image_processor = exported_image_processor(model_cfg, tmp_path)
    assert image_processor.size["height"] == preprocessor.size == 32
    for case, (data, _) in images.items():
        ours = training_pixels(preprocessor, data)
        assert_within_bound(ours, processor_levels(image_processor, as_user_opens(data)), (aspect, *case))


@pytest.mark.parametrize("aspect", ["resize", "pad"])
def test_decoded_pixels_match_the_exported_processor_at_siglip_256(tiny_assets, images, aspect, tmp_path):
    model_cfg = model_config(tiny_assets, aspect)
    image_processor = exported_image_processor(model_cfg, tmp_path, image_size=256)
    fill = pixel_stats(model_cfg.vision_tower).fill
    for case, (data, upright) in images.items():
        ours = decode_to_pixels(data, 256, aspect, fill=fill)
        assert_within_bound(ours, processor_levels(image_processor, as_user_opens(data)), (aspect, *case))
        if case[2] == "PNG":  # lossless: the upright image itself, handed to the processor, gives them too
            assert_within_bound(ours, processor_levels(image_processor, upright), (aspect, *case, "upright"))


def test_pad_mode_places_the_image_between_bands_of_the_image_mean(tiny_assets, images):
    """A wide photo is padded above and below, a tall one (stored sideways, EXIF 6) left and right."""
    model_cfg = model_config(tiny_assets, "pad")
    fill = pixel_stats(model_cfg.vision_tower).fill
    wide = decode_to_pixels(images[(640, 427, "JPEG", False, 1)][0], 256, "pad", fill=fill)
    band = (256 - round(427 * 256 / 640)) // 2  # 42 rows of image-mean padding above and below
    assert (wide[: band - 3] == fill).all() and (wide[-(band - 3) :] == fill).all()
    assert wide[band + 3 : -(band + 3)].std() > 20  # the photo, not padding
    tall = decode_to_pixels(images[(427, 640, "JPEG", False, 6)][0], 256, "pad", fill=fill)
    assert (tall[:, : band - 3] == fill).all() and (tall[:, -(band - 3) :] == fill).all()
    assert tall[:, band + 3 : -(band + 3)].std() > 20


def test_normalisation_comes_from_the_vision_towers_config(tiny_assets, images, tmp_path):
    """A tower whose preprocessor_config.json has CLIP's mean and std: the export normalises and pads
    with them, training pads with int(mean * 255), and the training forward hands the vision tower
    the exported processor's values."""
    from vistralv_ray.data.packing import layout_batch
    from vistralv_ray.model.assembly import build_model, llava_of
    from vistralv_ray.training.step import forward_logits, tower_pixel_stats

    tower = tmp_path / "clip-stats-tower"
    shutil.copytree(tiny_assets["vision"], tower)
    config = json.loads((tower / "preprocessor_config.json").read_text())
    (tower / "preprocessor_config.json").write_text(
        json.dumps({**config, "image_mean": CLIP_MEAN, "image_std": CLIP_STD})
    )
    model_cfg = model_config(tiny_assets, "pad", vision_tower=str(tower))
    assembled = build_model(model_cfg)
    stats = tower_pixel_stats(assembled.model)  # what the training forward normalises with
    assert stats.mean == tuple(CLIP_MEAN) and stats.std == tuple(CLIP_STD)
    assert stats.fill == (122, 116, 104)

    image_processor = exported_image_processor(model_cfg, tmp_path / "export")
    assert list(image_processor.image_mean) == CLIP_MEAN and list(image_processor.image_std) == CLIP_STD
    preprocessor = Preprocessor(dataclasses.asdict(model_cfg), max_pixels=10_000_000)
    for case in [(640, 427, "JPEG", False, 1), (500, 333, "PNG", True, 6), (37, 23, "PNG", False, 8)]:
        data = images[case][0]
        ours = training_pixels(preprocessor, data)
        theirs = image_processor(images=[as_user_opens(data)], return_tensors="pt")["pixel_values"][0]
        assert (ours[0] == stats.fill).all()  # the padding above a wide image: the image mean
        assert_within_bound(ours, processor_levels(image_processor, as_user_opens(data)), case)
        # In the model's input space: 2 levels are 2 / 255 / std there.
        on_device = normalize_pixels(torch.from_numpy(ours.copy())[None], torch.float32, stats)[0]
        tolerance = BOUND / 255 / min(CLIP_STD) + 1e-5
        assert (on_device - theirs)[:, 1:-1, 1:-1].abs().max() <= tolerance, case

    # What the vision tower receives in a training forward of the last record.
    record = preprocessor({"id": ["r"], "image": [data], "messages": [CONVERSATION]})
    batch = layout_batch(
        list(record["input_ids"]),
        list(record["labels"]),
        [record["pixel_values"][0]],
        assembled.tokenizer.pad_token_id,
        "pad",
        None,
        record["pixel_values"].shape[1:],
    )
    seen = []
    tower = llava_of(assembled.model).model.vision_tower
    hook = tower.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("pixel_values", args[0] if args else None)),
        with_kwargs=True,
    )
    try:
        with torch.no_grad():
            forward_logits(assembled.model, batch, torch.float32)
    finally:
        hook.remove()
    assert (seen[0][0] - theirs)[:, 1:-1, 1:-1].abs().max() <= tolerance


@pytest.mark.parametrize("aspect", ["resize", "pad"])
def test_shards_prepared_at_the_models_size_give_the_exported_processors_pixels(tiny_assets, images, aspect, tmp_path):
    """`prepare --store-pixels` resizes once; training decodes its shards, without resizing again, to
    the per-epoch path's pixels on the original files exactly, so to the exported processor's."""
    import pyarrow.parquet as pq

    from vistralv_ray.data.prepare import PrepareOptions, prepare

    model_cfg = model_config(tiny_assets, aspect)
    root = tmp_path / "images"
    root.mkdir()
    records, originals = [], {}
    for i, (case, (data, _)) in enumerate(images.items()):
        name = f"{i}.{case[2].lower()}"
        (root / name).write_bytes(data)
        originals[str(i)] = (case, data)
        turns = [{"from": "human", "value": "<image>\nGì?"}, {"from": "gpt", "value": "Ảnh."}]
        records.append({"id": str(i), "image": name, "conversations": turns})
    (tmp_path / "train.json").write_text(json.dumps(records))
    opts = PrepareOptions(str(root), str(tmp_path / "shards"), pixels=pixels_for_model(model_cfg))
    manifest = prepare(tmp_path / "train.json", opts, parallel=False, progress=False)
    assert manifest["records_out"] == len(images)
    fill = list(pixel_stats(model_cfg.vision_tower).fill)
    assert manifest["pixels"] == {"size": 32, "aspect": aspect, "fill": fill, "resample": "bicubic", "format": "PPM"}

    preprocessor = Preprocessor(dataclasses.asdict(model_cfg), max_pixels=10_000_000)
    image_processor = exported_image_processor(model_cfg, tmp_path / "export")
    rows = pq.read_table(tmp_path / "shards" / manifest["shards"][0]["name"]).to_pylist()
    for row in rows:
        case, data = originals[row["id"]]
        assert Image.open(io.BytesIO(row["image"])).size == (32, 32), case
        ours = training_pixels(preprocessor, row["image"])
        assert np.array_equal(ours, training_pixels(preprocessor, data)), (aspect, *case)
        assert_within_bound(ours, processor_levels(image_processor, as_user_opens(data)), (aspect, *case))

    # At SigLIP-256's size too: stored, then decoded, the per-epoch path's pixels exactly.
    stored = StoredPixels(256, aspect, tuple(fill))
    for case, (data, _) in images.items():
        once = decode_to_pixels(stored.store(data), 256, aspect, fill=stored.fill)
        assert np.array_equal(once, decode_to_pixels(data, 256, aspect, fill=stored.fill)), (aspect, *case)
