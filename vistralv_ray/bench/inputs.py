"""Inputs every benchmark shares: photo-like JPEGs and a description of the machine measured on."""

from __future__ import annotations

import io
import os
import platform

import numpy as np
from PIL import Image, ImageDraw


def synthetic_photos(
    n: int, width: int = 640, height: int = 480, seed: int = 0, quality: int = 90, distinct: int = 32
) -> list[bytes]:
    """Photo-like JPEGs (gradients, shapes, sensor noise), so the codec has real work to do.

    `distinct` different images are cycled: decoding the same bytes twice costs the same (PIL
    caches nothing), and generating noise images is slower than decoding them.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    out: list[bytes] = []
    for _ in range(min(n, distinct)):
        a, b = rng.uniform(0, 255, (2, 3))
        t = (xx / width * rng.uniform(0.3, 1) + yy / height * rng.uniform(0.3, 1)) / 2
        base = a + (b - a) * t[..., None] + rng.normal(0, 6, (height, width, 3))
        img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(4, 10))):
            x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
            x1, y1 = x0 + rng.uniform(20, width / 2), y0 + rng.uniform(20, height / 2)
            fill = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=fill)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return [out[i % len(out)] for i in range(n)]


def machine() -> dict:
    import ray
    import torch

    return {
        "cpus": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],  # other work on the machine slows wall-clock figures
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
    }
