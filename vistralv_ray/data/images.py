"""Image decoding for shards and preprocessing: checks, EXIF orientation, colour modes, pad or resize.

Output is uint8 RGB at the vision tower's size; normalisation happens on the training device (4x
fewer bytes through Ray Data than float32). JPEGs are decoded with draft scaling: libjpeg decodes
at 1/2, 1/4 or 1/8 of the size directly, which is most of the speed-up over a full decode + resize.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

from vistralv_ray.errors import RecordError

# SigLIP's mean is 0.5: padding with grey 127 is LLaVA's `expand2square` with the image mean.
PAD_LEVEL = 127
PAD_FILL = (PAD_LEVEL,) * 3
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own bomb threshold
ORIENTATION = 0x0112  # the EXIF tag
KEEP_FORMATS = {"JPEG", "MPO", "PNG", "WEBP"}  # MPO: a camera JPEG with extra frames, decoded as a JPEG


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
        raise RecordError("decompression_bomb", f"{width}x{height} = {width * height:,} pixels > {max_pixels:,}")
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


def decode_to_pixels(data: bytes, size: int, aspect: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Bytes -> uint8 array (size, size, 3): orientation applied, padded to square (`pad`) or not, resized.

    `pad` resizes the image so its long side is `size` and places it centred on a grey square: the
    same pixels as LLaVA's pad-then-resize up to the bicubic kernel at the image's edges (a level
    or two of 255), without resampling the padding.
    """
    img = open_checked(data, max_pixels)
    w, h = img.size
    if aspect == "pad":
        s = size / max(w, h)
        target = (max(1, round(w * s)), max(1, round(h * s)))
    else:
        target = (size, size)
    try:
        if img.format in ("JPEG", "MPO"):
            # libjpeg decodes at 1/2, 1/4 or 1/8 scale directly, never below the requested size.
            img.draft("RGB", target)
        img = to_rgb(img)
    except RecordError:
        raise
    except Exception as e:
        raise RecordError("unreadable_image", f"cannot decode image: {e}") from e
    if img.size != target:  # exif_transpose may have swapped the sides: target follows the image
        if aspect == "pad":
            s = size / max(img.size)
            target = (max(1, round(img.width * s)), max(1, round(img.height * s)))
    img.load()
    pixels = np.asarray(img)  # read-only: resize_bicubic reads it, the canvas copies it
    if img.size != target:
        pixels = resize_bicubic(pixels, target)
    if target == (size, size):
        return pixels
    canvas = np.full((size, size, 3), PAD_LEVEL, dtype=np.uint8)  # a scalar fill is a memset
    left, top = (size - target[0]) // 2, (size - target[1]) // 2
    canvas[top : top + target[1], left : left + target[0]] = pixels
    return canvas


def resize_bicubic(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 HWC -> uint8 HWC of `size` (width, height): antialiased bicubic, as PIL's (within one
    level of 255), through torch's vectorised uint8 kernel, about twice as fast as PIL's."""
    import torch
    import torch.nn.functional as F

    with warnings.catch_warnings():  # torch warns that a read-only array gives a read-only tensor: it is only read
        warnings.simplefilter("ignore", UserWarning)
        x = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)  # a channels-last view, no copy
    y = F.interpolate(x, size=(size[1], size[0]), mode="bicubic", antialias=True, align_corners=False)
    return y[0].permute(1, 2, 0).numpy()


def pad_to_square(img: Image.Image, fill: tuple[int, int, int] = PAD_FILL) -> Image.Image:
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas
