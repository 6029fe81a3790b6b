"""Procedural lesion-like images with masks and boxes: for tests and a first run without real data.

Each class gets its own cues (colour, border irregularity, size, texture, structures such as
vessels or a pale centre), so a classifier can learn them and a localiser can find the lesion. The
output uses the HAM10000 layout (``metadata.csv``, ``images/``, ``masks/``) so every reader and
trainer works on it unchanged. Never use it to report accuracy: it says nothing about real skin.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from dermaloop.taxonomy import Taxonomy, load_taxonomy

__all__ = ["generate", "render_lesion", "Cues"]


@dataclass(frozen=True)
class Cues:
    colour: tuple[int, int, int]
    colour2: tuple[int, int, int]  # second colour mixed in by texture
    irregularity: float  # border wobble amplitude (fraction of radius)
    radius: tuple[float, float]  # range, fraction of the shorter image side
    texture: float  # 0 smooth .. 1 blotchy
    vessels: bool = False
    pale_centre: bool = False


_CUES = {
    "mel": Cues((60, 35, 30), (40, 50, 80), 0.28, (0.25, 0.4), 0.9),
    "nv": Cues((130, 85, 55), (110, 70, 45), 0.05, (0.15, 0.28), 0.2),
    "bkl": Cues((165, 125, 85), (120, 90, 60), 0.15, (0.2, 0.35), 0.7),
    "bcc": Cues((215, 160, 160), (235, 200, 195), 0.12, (0.15, 0.3), 0.3, vessels=True),
    "akiec": Cues((200, 105, 95), (225, 190, 170), 0.2, (0.2, 0.35), 0.8),
    "vasc": Cues((150, 30, 60), (100, 20, 70), 0.08, (0.1, 0.22), 0.4),
    "df": Cues((150, 100, 75), (225, 205, 190), 0.06, (0.1, 0.18), 0.3, pale_centre=True),
}
_ALIASES = {"ak": "akiec", "melanoma": "mel", "scc": "akiec", "acne": "vasc", "eczema": "akiec"}


def _cues_for(class_id: str, index: int) -> Cues:
    key = class_id.lower()
    key = _ALIASES.get(key, key)
    if key in _CUES:
        return _CUES[key]
    rng = np.random.default_rng(1000 + index)  # unknown class: a fixed, distinct random profile
    c = tuple(int(v) for v in rng.integers(40, 220, 3))
    return Cues(c, tuple(int(v) for v in rng.integers(40, 220, 3)), float(rng.uniform(0.03, 0.3)),
                (0.12, 0.3), float(rng.uniform(0.1, 0.9)))


def _smooth_noise(rng: np.random.Generator, h: int, w: int, scale: int) -> np.ndarray:
    small = rng.random((max(2, h // scale), max(2, w // scale)))
    img = Image.fromarray((small * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    return np.asarray(img, np.float32) / 255.0


def render_lesion(cues: Cues, size: tuple[int, int] = (200, 150), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One RGB uint8 image (h, w, 3) and its boolean lesion mask (h, w)."""
    rng = np.random.default_rng(seed)
    w, h = size
    skin = np.array([rng.uniform(190, 235), rng.uniform(145, 190), rng.uniform(120, 165)], np.float32)
    img = np.ones((h, w, 3), np.float32) * skin
    img += (_smooth_noise(rng, h, w, 8)[..., None] - 0.5) * 18
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cx = w / 2 + rng.uniform(-0.15, 0.15) * w
    cy = h / 2 + rng.uniform(-0.15, 0.15) * h
    radius = rng.uniform(*cues.radius) * min(w, h)
    theta = np.arctan2(yy - cy, xx - cx)
    wobble = np.zeros_like(theta)
    for k in range(2, 7):
        wobble += rng.normal(0, cues.irregularity / k ** 0.5) * np.sin(k * theta + rng.uniform(0, 2 * np.pi))
    rr = np.hypot((xx - cx) / (1 + rng.uniform(-0.2, 0.2)), yy - cy)
    mask = rr < radius * (1 + wobble)
    mix = _smooth_noise(rng, h, w, 5) * cues.texture
    colour = (1 - mix[..., None]) * np.array(cues.colour, np.float32) + mix[..., None] * np.array(cues.colour2, np.float32)
    colour += rng.normal(0, 6, 3)
    if cues.pale_centre:
        centre = np.clip(1 - rr / (0.5 * radius), 0, 1)[..., None]
        colour = colour * (1 - centre) + np.array(cues.colour2, np.float32) * centre
    alpha = np.asarray(Image.fromarray((mask * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.5)),
                       np.float32)[..., None] / 255.0
    img = img * (1 - alpha) + colour * alpha
    if cues.vessels:
        for _ in range(int(rng.integers(3, 7))):
            a, b = rng.uniform(0, 2 * np.pi), rng.uniform(0.2, 0.9) * radius
            t = np.linspace(0, 1, 80)
            px = cx + np.cos(a) * b * t + 4 * np.sin(t * 9 + a)
            py = cy + np.sin(a) * b * t + 4 * np.cos(t * 7 + a)
            for x, y in zip(px.astype(int), py.astype(int), strict=True):
                if 0 <= x < w and 0 <= y < h:
                    img[max(0, y - 1):y + 1, max(0, x - 1):x + 1] = (175, 40, 50)
    img += rng.normal(0, 3, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), mask


def generate(out_dir: str | Path, taxonomy: Taxonomy | None = None, per_class: int = 20,
             size: tuple[int, int] = (200, 150), seed: int = 0, photos_per_lesion: int = 2) -> Path:
    """Write a synthetic dataset in the HAM10000 layout; returns ``out_dir``.

    ``photos_per_lesion`` > 1 renders several photos of one lesion (same shape, new lighting and
    noise) under one ``lesion_id``, so grouped splits are exercised as on real data.
    """
    taxonomy = taxonomy or load_taxonomy()
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rows = []
    n = 0
    for ci, cls in enumerate(taxonomy.classes):
        cues = _cues_for(cls.id, ci)
        made = 0
        lesion = 0
        while made < per_class:
            lesion_id = f"SYN_L{ci:02d}{lesion:05d}"
            lesion_seed = seed * 1_000_003 + ci * 10_007 + lesion
            for photo in range(min(photos_per_lesion, per_class - made)):
                image_id = f"SYN_{n:07d}"
                pixels, mask = render_lesion(cues, size, lesion_seed)
                if photo:  # another photo of the same lesion: lighting and sensor noise change
                    jitter = np.random.default_rng(lesion_seed + 7919 * photo)
                    pixels = np.clip(pixels * jitter.uniform(0.9, 1.1, 3) + jitter.normal(0, 3, pixels.shape),
                                     0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(out / "images" / f"{image_id}.jpg", quality=90)
                Image.fromarray(mask.astype(np.uint8) * 255).convert("1").save(
                    out / "masks" / f"{image_id}_segmentation.png")
                ys, xs = np.nonzero(mask)
                h, w = mask.shape
                rows.append({"image_id": image_id, "lesion_id": lesion_id, "dx": cls.id, "dx_type": "synthetic",
                             "age": "", "sex": "", "localization": "", "width": w, "height": h,
                             "box_x0": f"{xs.min() / w:.4f}", "box_y0": f"{ys.min() / h:.4f}",
                             "box_x1": f"{(xs.max() + 1) / w:.4f}", "box_y1": f"{(ys.max() + 1) / h:.4f}"})
                n += 1
                made += 1
            lesion += 1
    with open(out / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "README.md").write_text("Synthetic lesion-like images from training.synthetic (seed "
                                   f"{seed}). For tests and first runs only; never for reporting accuracy.\n")
    return out
