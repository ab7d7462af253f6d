"""Images stored as the model sees them (`prepare --store-pixels`): decoded unchanged by training, and
refused before a run when they were stored for another size, aspect or pad colour than the recipe's.
(Their parity with the exported processor is in test_pixel_parity.py.)"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from vistralv_ray.cli.main import main
from vistralv_ray.config import ConfigError, config_from_dict
from vistralv_ray.data.images import StoredPixels, decode_to_pixels
from vistralv_ray.training import preflight


@pytest.mark.parametrize("aspect", ["pad", "resize"])
@pytest.mark.parametrize("fmt", ["PPM", "PNG"])
def test_an_image_square_at_the_models_size_is_decoded_unchanged(aspect, fmt):
    """Pad then resize of a square image at the target size is the identity: no resampling, no padding."""
    pixels = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    assert np.array_equal(decode_to_pixels(buf.getvalue(), 48, aspect, fill=(122, 116, 104)), pixels)
    # Stored again by prepare: the same bytes' pixels (storing is idempotent at the model's size).
    stored = StoredPixels(48, aspect, (122, 116, 104)).store(buf.getvalue())
    assert stored[:2] == b"P6" and np.array_equal(np.asarray(Image.open(io.BytesIO(stored))), pixels)


def shard_folder(path, pixels: dict | None):
    path.mkdir(parents=True)
    (path / "part-00000.parquet").write_bytes(b"")
    (path / "manifest.json").write_text(json.dumps({"shards": [{"name": "part-00000.parquet"}], "pixels": pixels}))
    return path


def recipe(tiny_assets, folder, *overrides: str):
    model = [f"model.language_model={tiny_assets['llm']}", f"model.vision_tower={tiny_assets['vision']}"]
    return config_from_dict({}, [f"data.train=[{folder}]", *model, *overrides])


TINY_PAD = {"size": 32, "aspect": "pad", "fill": [127, 127, 127], "resample": "bicubic", "format": "PPM"}


@pytest.mark.parametrize(
    ("stored", "overrides", "manifest_key", "recipe_key"),
    [
        ({"size": 64}, [], "pixels.size = 64", r"model.image_size \(unset: the vision tower's image_size\) gives 32"),
        ({}, ["model.image_size=64"], "pixels.size = 32", "model.image_size gives 64"),
        ({}, ["model.aspect=resize"], "pixels.aspect = pad", "model.aspect gives resize"),
        ({"fill": [0, 0, 0]}, [], r"pixels.fill = \(0, 0, 0\)", r"model.vision_tower \(its image_mean"),
        ({"resample": "nearest"}, [], "pixels.resample = nearest", "training's bicubic"),
    ],
)
def test_pixels_stored_for_another_model_are_refused_before_the_run(
    tiny_assets, tmp_path, stored, overrides, manifest_key, recipe_key, monkeypatch
):
    folder = shard_folder(tmp_path / "shards" / "a", {**TINY_PAD, **stored})
    cfg = recipe(tiny_assets, tmp_path / "shards", *overrides)
    message = rf"^data.train: {folder / 'manifest.json'} says its images are stored at {manifest_key}, but {recipe_key}"
    with pytest.raises(ConfigError, match=message):
        preflight.check_prepared_pixels(cfg)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ConfigError, match=message):  # the driver's preflight runs it
        preflight.run_preflight(cfg)


def test_pixels_stored_for_the_recipes_model_pass(tiny_assets, tmp_path):
    shard_folder(tmp_path / "pad", TINY_PAD)
    preflight.check_prepared_pixels(recipe(tiny_assets, tmp_path / "pad"))
    preflight.check_prepared_pixels(recipe(tiny_assets, tmp_path / "pad" / "part-00000.parquet"))
    # `resize` pads nothing: the pad colour it was stored with does not count.
    shard_folder(tmp_path / "resize", {**TINY_PAD, "aspect": "resize", "fill": [0, 0, 0]})
    preflight.check_prepared_pixels(recipe(tiny_assets, tmp_path / "resize", "model.aspect=resize"))
    # Original images (no `pixels`): the model is not even looked up.
    shard_folder(tmp_path / "originals", None)
    preflight.check_prepared_pixels(config_from_dict({}, [f"data.train=[{tmp_path / 'originals'}]",
                                                          "model.vision_tower=/no/such/tower"]))  # fmt: skip


def test_prepare_store_pixels_takes_size_aspect_and_mean_from_the_config(tiny_assets, tmp_path, capsys):
    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (60, 40), (200, 10, 10)).save(root / "a.jpg")
    turns = [{"from": "human", "value": "<image>\nMàu gì?"}, {"from": "gpt", "value": "Đỏ."}]
    (tmp_path / "train.json").write_text(json.dumps([{"id": "a", "image": "a.jpg", "conversations": turns}]))
    argv = ["prepare", "--format", "llava", "--input", str(tmp_path / "train.json"), "--image-root", str(root)]
    argv += ["--serial", "--store-pixels"]
    assert main([*argv, "--out", str(tmp_path / "refused")]) == 2
    assert "--store-pixels stores images at one model's size" in capsys.readouterr().err
    model = [f"model.language_model={tiny_assets['llm']}", f"model.vision_tower={tiny_assets['vision']}"]
    model += ["model.image_size=24"]
    assert main([*argv, "--out", str(tmp_path / "shards"), *(f"--set={m}" for m in model)]) == 0
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["pixels"] == {**TINY_PAD, "size": 24}
    import pyarrow.parquet as pq

    image = pq.read_table(tmp_path / "shards" / "part-00000.parquet").column("image")[0].as_py()
    pixels = np.asarray(Image.open(io.BytesIO(image)))
    assert pixels.shape == (24, 24, 3) and (pixels[0] == 127).all()  # padded above with the tower's mean


def test_shards_prepared_under_looser_limits_are_named_before_the_run(tiny_assets, tmp_path, caplog):
    """Records `prepare` accepted under a larger pixel or character limit than the run's would be
    rejected in training (an epoch shorter than the manifest says): preflight names the key and the fix."""
    folder = tmp_path / "shards"
    shard_folder(folder, None)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.update(max_image_pixels=89_478_485, max_message_chars=32_768, max_record_chars=131_072)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    preflight.check_prepared_pixels(recipe(tiny_assets, folder))
    assert "max_image_pixels = 89478485, above this run's data.max_image_pixels = 25000000" in caplog.text
    assert "--set data.max_image_pixels=89478485" in caplog.text and "max_message_chars" not in caplog.text
    caplog.clear()
    preflight.check_prepared_pixels(recipe(tiny_assets, folder, "data.max_image_pixels=89478485"))
    assert "above this run's" not in caplog.text
