"""Synthetic degradations of a photo: the failure modes the quality gate must catch.

Used to calibrate and to measure the gate (and by the tests) on real images whose ground truth is
known, because nobody has a labelled set of "bad phone photos". Strength is given relative to the
image size so that a degradation means the same thing on a 200x150 thumbnail and a 12 MP photo.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from scipy import ndimage


def _as_array(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.float32)


def _to_image(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "RGB")


def gaussian_blur(img: Image.Image, sigma_frac: float = 0.02) -> Image.Image:
    """Defocus: Gaussian blur with sigma as a fraction of the shorter side."""
    sigma = max(0.5, sigma_frac * min(img.size))
    return img.convert("RGB").filter(ImageFilter.GaussianBlur(radius=sigma))


def motion_blur(img: Image.Image, length_frac: float = 0.06, angle_deg: float = 30.0) -> Image.Image:
    """Camera shake: a line kernel of the given length (fraction of the shorter side) and angle."""
    length = max(3, int(round(length_frac * min(img.size))))
    kernel = np.zeros((length, length), np.float32)
    c = (length - 1) / 2
    t = np.linspace(-c, c, 4 * length)
    a = np.deg2rad(angle_deg)
    xs = np.clip(np.round(c + t * np.cos(a)).astype(int), 0, length - 1)
    ys = np.clip(np.round(c - t * np.sin(a)).astype(int), 0, length - 1)
    kernel[ys, xs] = 1.0
    kernel /= kernel.sum()
    arr = _as_array(img)
    out = np.stack([ndimage.convolve(arr[..., ch], kernel, mode="reflect") for ch in range(3)], -1)
    return _to_image(out)


def gamma(img: Image.Image, g: float) -> Image.Image:
    """Exposure error: out = in ** g on [0, 1] (g < 1 over-exposes, g > 1 under-exposes)."""
    arr = _as_array(img) / 255.0
    return _to_image(255.0 * np.power(arr, g))


def zoom_out(
    img: Image.Image, box: tuple[float, float, float, float], scale: float
) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """The same scene shot from further away: the photo shrunk by ``scale`` and centred on a canvas
    of its own border colour (the skin around it). Returns the new image and the lesion's new box."""
    img = img.convert("RGB")
    w, h = img.size
    x0, y0, x1, y1 = box
    scale = float(min(1.0, max(scale, 1.0 / min(w, h))))
    sw, sh = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
    small = img.resize((sw, sh), Image.Resampling.BILINEAR)
    arr = _as_array(img)
    border = np.concatenate([arr[:4].reshape(-1, 3), arr[-4:].reshape(-1, 3),
                             arr[:, :4].reshape(-1, 3), arr[:, -4:].reshape(-1, 3)])
    colour = tuple(int(v) for v in np.median(border, axis=0))
    canvas = Image.new("RGB", (w, h), colour)
    ox, oy = (w - sw) // 2, (h - sh) // 2
    canvas.paste(small, (ox, oy))
    new_box = ((ox + x0 * sw) / w, (oy + y0 * sh) / h, (ox + x1 * sw) / w, (oy + y1 * sh) / h)
    return canvas, new_box


def downscale_lesion(
    img: Image.Image, box: tuple[float, float, float, float], target_frac: float = 0.10
) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """A distant shot: zoomed out until the lesion's longer box side is ``target_frac`` of the
    frame's shorter side (never zoomed in)."""
    w, h = img.size
    x0, y0, x1, y1 = box
    lesion_side = max((x1 - x0) * w, (y1 - y0) * h, 1.0)
    return zoom_out(img, box, target_frac * min(w, h) / lesion_side)


def glare(img: Image.Image, n_spots: int = 3, radius_frac: float = 0.06, seed: int = 0) -> Image.Image:
    """Flash reflections: a few saturated white ellipses with soft edges."""
    img = img.convert("RGB")
    w, h = img.size
    rng = np.random.default_rng(seed)
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    r = radius_frac * min(w, h)
    for _ in range(n_spots):
        cx, cy = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
        rx, ry = r * rng.uniform(0.6, 1.4), r * rng.uniform(0.6, 1.4)
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=255)
    mask = mask.filter(ImageFilter.GaussianBlur(radius=max(1.0, r * 0.15)))
    white = Image.new("RGB", (w, h), (255, 255, 255))
    return Image.composite(white, img, mask)
