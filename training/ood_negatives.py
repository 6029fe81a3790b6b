"""Not-skin example images: everyday photos, documents, noise and blank frames, split by source.

The not-skin check must generalise to pictures it never saw, so negatives are grouped by SOURCE (one
photo and all its crops, one document layout family, one noise family) and whole sources are held out
for measurement. Everyday photos come from the sample images bundled with scikit-image,
scikit-learn and Matplotlib (no downloads); documents, noise and blank frames are generated.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Bundled sample photos (name -> loader). lfw faces are tiny greyscale crops, used as a group.
_SKIMAGE = ("astronaut", "camera", "coffee", "chelsea", "rocket", "horse", "motorcycle_left",
            "motorcycle_right", "hubble_deep_field", "retina", "immunohistochemistry", "gravel", "grass",
            "brick", "coins", "moon", "page", "text", "clock", "logo", "colorwheel", "shepp_logan_phantom",
            "cell", "microaneurysms", "checkerboard")


@dataclass(frozen=True)
class Negative:
    source: str  # group for splitting
    kind: str  # photo | document | noise | blank
    image: Image.Image


def _to_rgb(arr: np.ndarray) -> Image.Image:
    a = np.asarray(arr)
    if a.dtype != np.uint8:
        a = a.astype(np.float64)
        a = (a - a.min()) / max(a.max() - a.min(), 1e-9) * 255.0
        a = a.astype(np.uint8)
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    if a.shape[-1] == 4:
        a = a[..., :3]
    return Image.fromarray(a, "RGB")


def sample_photos() -> list[tuple[str, Image.Image]]:
    """Everyday photos bundled with installed libraries (those that load offline)."""
    import skimage.data

    photos = []
    for name in _SKIMAGE:
        try:
            photos.append((f"skimage:{name}", _to_rgb(getattr(skimage.data, name)())))
        except Exception:  # noqa: BLE001 - a sample that needs a download is simply skipped
            continue
    try:
        faces = skimage.data.lfw_subset()
        for k in range(0, min(len(faces), 40), 4):
            grid = np.vstack([np.hstack(faces[k + r:k + r + 2]) for r in (0, 2)])
            photos.append(("skimage:lfw_faces", _to_rgb(grid)))
    except Exception:  # noqa: BLE001
        pass
    try:
        from sklearn.datasets import load_sample_images

        for i, img in enumerate(load_sample_images().images):
            photos.append((f"sklearn:sample{i}", _to_rgb(img)))
    except Exception:  # noqa: BLE001
        pass
    try:
        import matplotlib

        base = Path(matplotlib.get_data_path()) / "sample_data"
        for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png"):
            if (base / name).is_file():
                with Image.open(base / name) as im:
                    photos.append((f"matplotlib:{name}", im.convert("RGB")))
    except Exception:  # noqa: BLE001
        pass
    return photos


def random_crop(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A phone-like framing of part of a photo: random crop, flip, rotation and exposure."""
    w, h = img.size
    s = rng.uniform(0.35, 1.0)
    cw, ch = max(8, int(w * s * rng.uniform(0.8, 1.0))), max(8, int(h * s * rng.uniform(0.8, 1.0)))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    out = img.crop((x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    out = out.rotate(float(rng.choice([0, 90, 180, 270])), expand=True)
    arr = np.asarray(out, np.float32) / 255.0
    arr = np.power(arr, rng.uniform(0.7, 1.4)) * rng.uniform(0.85, 1.1)
    return Image.fromarray(np.clip(arr * 255.0, 0, 255).astype(np.uint8), "RGB")


_WORDS = ["patient", "report", "invoice", "total", "date", "name", "address", "the", "of", "and", "summary", "clinic", "page", "result", "amount", "due", "please", "sign", "here", "receipt", "order", "number", "phone", "email", "note", "table", "meeting"]


def document(rng: np.random.Generator, size: tuple[int, int] = (600, 800)) -> Image.Image:
    """A synthetic page: paper tint, lines of text, sometimes a table or a header bar."""
    paper = tuple(int(v) for v in rng.integers(225, 256, 3))
    img = Image.new("RGB", size, paper)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=int(rng.integers(12, 28)))
    ink = tuple(int(v) for v in rng.integers(0, 90, 3))
    y = int(rng.integers(10, 60))
    if rng.random() < 0.4:
        bar = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.rectangle((0, 0, size[0], y + 30), fill=bar)
        y += 50
    while y < size[1] - 30:
        words = " ".join(rng.choice(_WORDS, int(rng.integers(3, 12))))
        draw.text((int(rng.integers(10, 60)), y), words, fill=ink, font=font)
        y += int(rng.integers(20, 45))
        if rng.random() < 0.08:
            draw.line((20, y, size[0] - 20, y), fill=ink, width=1)
            y += 10
    if rng.random() < 0.5:  # photographed at an angle, at some distance
        img = img.rotate(float(rng.uniform(-12, 12)), expand=True, fillcolor=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return img


def noise(rng: np.random.Generator, family: str, size: tuple[int, int] = (320, 240)) -> Image.Image:
    w, h = size
    if family == "gaussian":
        a = rng.normal(rng.uniform(60, 200), rng.uniform(10, 70), (h, w, 3))
    elif family == "uniform":
        a = rng.uniform(0, 255, (h, w, 3))
    elif family == "salt_pepper":
        a = np.full((h, w, 3), rng.uniform(0, 255, 3))
        m = rng.random((h, w))
        a[m < 0.1] = 0
        a[m > 0.9] = 255
    elif family == "blocky":  # low-frequency colour noise (a lens cap, a pocket)
        small = rng.uniform(0, 255, (int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3)).astype(np.uint8)
        return Image.fromarray(small, "RGB").resize(size, Image.Resampling.BICUBIC)
    else:
        raise ValueError(family)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB")


def blank(rng: np.random.Generator, family: str, size: tuple[int, int] = (320, 240)) -> Image.Image:
    w, h = size
    if family == "flat":
        colour = rng.uniform(0, 255, 3)
        a = np.broadcast_to(colour, (h, w, 3)) + rng.normal(0, 2, (h, w, 3))
    elif family == "dark":
        a = rng.normal(rng.uniform(0, 25), 3, (h, w, 3))
    elif family == "gradient":
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        t = np.linspace(0, 1, w)[None, :, None]
        a = np.broadcast_to(c0 + (c1 - c0) * t, (h, w, 3)).copy()
    else:
        raise ValueError(family)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB")


def negatives(crops_per_photo: int = 30, n_generated: int = 60, seed: int = 0) -> Iterator[Negative]:
    """Every negative with its source group."""
    rng = np.random.default_rng(seed)
    for source, photo in sample_photos():
        for _ in range(crops_per_photo):
            yield Negative(source, "photo", random_crop(photo, rng))
        yield Negative(source, "photo", photo)
    for family in range(6):  # document families: different seeds and ink/paper draws
        frng = np.random.default_rng(1000 + family)
        for _ in range(n_generated // 3):
            yield Negative(f"document:{family}", "document", document(frng))
    for family in ("gaussian", "uniform", "salt_pepper", "blocky"):
        for _ in range(n_generated // 2):
            yield Negative(f"noise:{family}", "noise", noise(rng, family))
    for family in ("flat", "dark", "gradient"):
        for _ in range(n_generated // 2):
            yield Negative(f"blank:{family}", "blank", blank(rng, family))


def held_out(source: str) -> bool:
    """Whether a source is reserved for measurement: a fixed third of the photos, two document
    families, one noise family and one blank family. Decided by name, never by results."""
    import zlib

    if source.startswith("document:"):
        return source in ("document:4", "document:5")
    if source.startswith("noise:"):
        return source == "noise:salt_pepper"
    if source.startswith("blank:"):
        return source == "blank:gradient"
    return zlib.crc32(source.encode()) % 3 == 0
