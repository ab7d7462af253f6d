"""Image decoding for shards and preprocessing: checks, EXIF orientation, colour modes, pad or resize.

Output is uint8 RGB at the vision tower's size; normalisation happens on the training device (4x
fewer bytes through Ray Data than float32). The pixels are the exported processor's (transformers'
`LlavaImageProcessor`, PIL backend, which preprocesses as LLaVA does): a full decode, padded to a
square with the image mean (`pad`), then PIL's bicubic resize. Both shortcuts this module once took
broke that by more than 2 levels of 255 on photos, so neither is used: libjpeg's draft (DCT) decoding
at 1/2-1/8 scale (4-29 levels) and torch's uint8 bicubic kernel (1-2 levels, up to 25 on tall
images). What is left to save is resizing padding: see `resize_padded`. Mean, std and pad colour come
from the vision tower's own image processor config (`pixel_stats`), in training and export alike.
`prepare --store-pixels` does all this once and stores the result (`StoredPixels`): a square image at
the target size passes through unchanged.
"""

from __future__ import annotations

import functools
import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from vistralv_ray.config.schema import DEFAULT_MAX_IMAGE_PIXELS
from vistralv_ray.errors import RecordError

# SigLIP's mean is 0.5: padding with grey 127 is LLaVA's `expand2square` with the image mean. The
# default where no tower is at hand (the benchmark's reference); training uses `pixel_stats(...).fill`.
PAD_LEVEL = 127
PAD_FILL = (PAD_LEVEL,) * 3
DEFAULT_MAX_PIXELS = DEFAULT_MAX_IMAGE_PIXELS  # 25 Mpx; PIL's own bomb threshold is 89 Mpx
ORIENTATION = 0x0112  # the EXIF tag
KEEP_FORMATS = {"JPEG", "MPO", "PNG", "WEBP"}  # MPO: a camera JPEG with extra frames, decoded as a JPEG
# The exported processor's filter (LlavaImageProcessor, resample=3); PIL's, as torch's uint8 kernel
# differs from it by up to 25 levels on tall images.
BICUBIC = Image.Resampling.BICUBIC


@dataclass(frozen=True)
class PixelStats:
    """The normalisation of a vision tower: (x / 255 - mean) / std per channel, and its pad colour."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def fill(self) -> tuple[int, int, int]:
        # LlavaImageProcessor pads with int(mean * 255), truncated: the same levels here, not rounded.
        return tuple(int(m * 255) for m in self.mean)


@functools.lru_cache(maxsize=8)
def pixel_stats(vision_tower: str) -> PixelStats:
    """Mean and std from the vision tower's own image processor config (preprocessor_config.json)."""
    from transformers import AutoImageProcessor

    if not vision_tower:
        raise ValueError("pixel_stats: no vision tower path or hub id to read preprocessor_config.json from")
    try:
        tower = AutoImageProcessor.from_pretrained(vision_tower)
    except OSError as e:
        raise ValueError(f"{vision_tower}: no image processor config to take the pixel mean and std from: {e}") from e

    def three(value, name: str) -> tuple[float, float, float]:
        if value is None:
            raise ValueError(f"{vision_tower}: its image processor config has no {name}")
        values = [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]
        if len(values) != 3:
            raise ValueError(f"{vision_tower}: {name} {values} is not one value per RGB channel")
        return tuple(values)

    return PixelStats(three(tower.image_mean, "image_mean"), three(tower.image_std, "image_std"))


# `prepare --store-pixels` stores raw RGB in a PPM (P6) container: decoding it is a copy (0.18 ms at
# 256 px, where PNG at compress level 1 took 1.4 ms and lossless WebP 1.4 ms: zlib's inflate and the
# row filters), and the shard's zstd does the compressing (photo-like 256 px images: 192 KB raw, ~90
# KB in the shard, against ~59 KB as PNG; reading them back costs ~0.2 ms more). PIL opens it as any image.
STORED_FORMAT = "PPM"
STORED_RESAMPLE = "bicubic"  # BICUBIC's name in a manifest: the only filter training decodes with


@dataclass(frozen=True)
class StoredPixels:
    """Images as the model sees them, made once by `prepare --store-pixels`: `decode_to_pixels` on the
    original, stored losslessly. An image already square at the model's size is the identity under
    both `pad` and `resize`, so training decodes it to the very same pixels without resizing again.
    A manifest's `pixels` holds these fields; `fill` counts only for `pad`."""

    size: int
    aspect: str
    fill: tuple[int, int, int]
    resample: str = STORED_RESAMPLE
    format: str = STORED_FORMAT

    def store(self, data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
        """Original image bytes -> the model's pixels, encoded (a bad image is a RecordError, as in training)."""
        out = io.BytesIO()
        Image.fromarray(decode_to_pixels(data, self.size, self.aspect, max_pixels, self.fill)).save(out, self.format)
        return out.getvalue()

    def to_manifest(self) -> dict:
        return {
            "size": self.size,
            "aspect": self.aspect,
            "fill": list(self.fill),
            "resample": self.resample,
            "format": self.format,
        }

    @classmethod
    def from_manifest(cls, entry: dict) -> StoredPixels:
        return cls(
            int(entry["size"]),
            str(entry["aspect"]),
            tuple(int(v) for v in entry["fill"]),
            str(entry.get("resample", STORED_RESAMPLE)),
            str(entry.get("format", STORED_FORMAT)),
        )

    def differences(self, model: StoredPixels) -> list[str]:
        """The fields (manifest names) in which these stored pixels are not what `model` decodes to."""
        fields = ["size", "aspect", "resample"] + (["fill"] if model.aspect == "pad" else [])
        return [name for name in fields if getattr(self, name) != getattr(model, name)]


def pixels_for_model(model_cfg) -> StoredPixels:
    """What training decodes images to for a `ModelConfig`: `model.image_size` (unset: the vision
    tower's), `model.aspect`, and the tower's image mean as the pad colour."""
    from vistralv_ray.text.encoder import load_vision_config

    size = model_cfg.image_size or load_vision_config(model_cfg.vision_tower).image_size
    return StoredPixels(int(size), model_cfg.aspect, pixel_stats(model_cfg.vision_tower).fill)


def open_checked(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open image bytes lazily, rejecting unreadable data and decompression bombs before decoding."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise RecordError("decompression_bomb", str(e)) from e
    except Exception as e:  # PIL raises many types for corrupt data
        raise RecordError("unreadable_image", f"cannot open image: {e}") from e
    width, height = img.size
    if width * height > max_pixels:
        raise RecordError("too_many_pixels", f"{width}x{height} = {width * height:,} pixels > {max_pixels:,}")
    if width == 0 or height == 0:
        raise RecordError("unreadable_image", f"empty image {width}x{height}")
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """EXIF orientation applied, any colour mode to RGB (transparency over white)."""
    if img.getexif().get(ORIENTATION, 1) != 1:  # exif_transpose copies even an upright image
        img = ImageOps.exif_transpose(img)
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels become white, not black: a white page looks like a white page.
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")  # L, P, CMYK, I;16, YCbCr...


def verify_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[str, int, int]:
    """Decode once completely (truncated or corrupt files fail here); returns (format, width, height)."""
    img = open_checked(data, max_pixels)
    fmt = img.format or "UNKNOWN"
    try:
        img.load()
        img = to_rgb(img)
    except Exception as e:
        raise RecordError("unreadable_image", f"cannot decode image: {e}") from e
    return fmt, img.width, img.height


def normalise_encoding(data: bytes, fmt: str) -> bytes:
    """Keep JPEG/PNG/WebP bytes as they are; re-encode anything else (TIFF, BMP, GIF...) as an RGB
    PNG (PNG holds no CMYK, float or 16-bit colour modes: they become RGB as training sees them)."""
    if fmt in KEEP_FORMATS:
        return data
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        out = io.BytesIO()
        to_rgb(img).save(out, format="PNG")
    except Exception as e:
        raise RecordError("unreadable_image", f"cannot re-encode {fmt} image as PNG: {e}") from e
    return out.getvalue()


def decode_to_pixels(
    data: bytes,
    size: int,
    aspect: str,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    fill: tuple[int, int, int] = PAD_FILL,
) -> np.ndarray:
    """Bytes -> uint8 array (size, size, 3): orientation applied, padded to square (`pad`) or not, resized.

    The exported processor's pixels: decoded in full, padded to a square with `fill` (the image mean,
    `pixel_stats(tower).fill`) where LLaVA places the image, then resized with PIL's bicubic.
    """
    img = open_checked(data, max_pixels)
    try:
        img = to_rgb(img)
        img.load()
    except RecordError:
        raise
    except Exception as e:
        raise RecordError("unreadable_image", f"cannot decode image: {e}") from e
    if aspect == "pad" and img.width != img.height:
        return resize_padded(img, size, fill)
    return np.asarray(img if img.size == (size, size) else img.resize((size, size), BICUBIC))


def resize_padded(img: Image.Image, size: int, fill: tuple[int, int, int] = PAD_FILL) -> np.ndarray:
    """An RGB image padded to a square with `fill` ((long - short) // 2 before it, as LLaVA does) and
    resized bicubic to `size`: PIL's resize of that square, without resizing most of the padding.

    PIL resizes across, then down, rounding to uint8 in between; a row of padding stays `fill`
    across, so a wide image is resized across alone and its padding joins it at the new width. Down
    (and across, for a tall image) only the band of output lines the image reaches through the
    filter is computed, with `box` on the padded image, which gives those lines PIL's own weights
    (up to float rounding in the box: a level at most, on some pixels of some images).
    """
    w, h = img.size
    side = max(w, h)
    start = (side - min(w, h)) // 2
    scale = side / size
    reach = 2 * max(scale, 1.0) + 1  # bicubic's support in source pixels, and a pixel to spare
    lo = max(0, math.floor((start - reach) / scale))
    hi = min(size, math.ceil((start + min(w, h) + reach) / scale))
    out = solid(size, size, fill)
    if w > h:
        across = img if w == size else img.resize((size, h), BICUBIC)
        column = solid(side, size, fill)
        column[start : start + h] = np.asarray(across)
        band = Image.fromarray(column).resize((size, hi - lo), BICUBIC, box=(0, lo * scale, size, hi * scale))
        out[lo:hi] = np.asarray(band)
    else:
        row = solid(h, side, fill)
        row[:, start : start + w] = np.asarray(img)
        band = Image.fromarray(row).resize((hi - lo, size), BICUBIC, box=(lo * scale, 0, hi * scale, h))
        out[:, lo:hi] = np.asarray(band)
    return out


def solid(height: int, width: int, fill: tuple[int, int, int]) -> np.ndarray:
    """uint8 (height, width, 3) of one colour. Not `array[:] = fill`: numpy then copies 3 bytes at a
    time (~0.4 ms a sample in `resize_padded`); a grey is a memset, a colour one long row repeated."""
    if fill[0] == fill[1] == fill[2]:
        return np.full((height, width, 3), fill[0], dtype=np.uint8)
    out = np.empty((height, width * 3), dtype=np.uint8)
    out[:] = np.tile(np.asarray(fill, dtype=np.uint8), width)
    return out.reshape(height, width, 3)


def pad_to_square(img: Image.Image, fill: tuple[int, int, int] = PAD_FILL) -> Image.Image:
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas
