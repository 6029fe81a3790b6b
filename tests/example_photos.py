"""Small, fixed example photos for tests and benchmarks of the analysis steps (no data needed).

A lesion-like spot (irregular dark-brown blob with texture) on textured skin, with its true box, plus
clear not-skin examples. These are for checking behaviour and geometry, never for reporting accuracy.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from dermaloop.analysis.localiser import Box


def lesion_photo(size: tuple[int, int] = (400, 300), box: Box = (0.35, 0.3, 0.65, 0.7),
                 seed: int = 0) -> tuple[Image.Image, Box]:
    """(photo, true lesion box as fractions)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    skin = np.array([224, 172, 150], np.float32)
    base = skin + rng.normal(0, 6, (h, w, 3)).astype(np.float32)
    base += 8 * np.sin(xx / 9.0)[..., None] * np.cos(yy / 13.0)[..., None]  # skin texture
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2 * w, (y0 + y1) / 2 * h
    rx, ry = (x1 - x0) / 2 * w, (y1 - y0) / 2 * h
    ang = np.arctan2(yy - cy, xx - cx)
    wobble = 1 + 0.06 * np.sin(3 * ang + rng.uniform(0, 6)) + 0.04 * np.sin(5 * ang + rng.uniform(0, 6))
    r = np.sqrt(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2) / wobble
    inside = np.clip((1.0 - r) * 12.0, 0, 1)[..., None]  # soft edge
    lesion = np.array([92, 58, 42], np.float32) + rng.normal(0, 12, (h, w, 3)).astype(np.float32)
    lesion *= (0.85 + 0.15 * np.sin(xx / 4.0) * np.sin(yy / 5.0))[..., None]
    arr = base * (1 - inside) + lesion * inside
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    # The box that really contains the drawn spot (the wobble makes it differ from the nominal one).
    ys, xs = np.nonzero(inside[..., 0] > 0.5)
    true_box = (float(xs.min() / w), float(ys.min() / h), float((xs.max() + 1) / w), float((ys.max() + 1) / h))
    return img, true_box


def document_photo(size: tuple[int, int] = (300, 400)) -> Image.Image:
    img = Image.new("RGB", size, (246, 244, 236))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=16)
    for i, y in enumerate(range(20, size[1] - 20, 24)):
        draw.text((16, y), f"Line {i}: invoice total amount due please sign", fill=(20, 20, 30), font=font)
    return img


def noise_photo(size: tuple[int, int] = (320, 240), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def blank_photo(size: tuple[int, int] = (320, 240), colour: tuple[int, int, int] = (40, 40, 40)) -> Image.Image:
    return Image.new("RGB", size, colour).filter(ImageFilter.GaussianBlur(1))
