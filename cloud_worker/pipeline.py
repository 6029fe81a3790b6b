"""From verified image bytes to the ``cloud`` record of a case.

Split in three so the worker can overlap and batch them: ``prepare`` (decode, checks, crop; per
image, runs in the download pool), ``infer`` (one batched model call for many cases, plus Grad-CAM
when the model supports it) and ``record`` (the JSON written to the case).
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from PIL import Image

from cloud_worker.errors import permanent
from cloud_worker.model import CloudModel
from dermaloop.preprocess import ImageError, load_image, to_model_input


class Analysis(Protocol):
    """The image checks around the classifier (quality gate, not-skin check, lesion localiser)."""

    def quality(self, img: Image.Image) -> dict[str, Any] | None: ...

    def lesion(self, img: Image.Image) -> dict[str, Any] | None: ...

    def box(self, img: Image.Image) -> list[float] | None: ...


class NoAnalysis:
    """Used where the analysis module is unavailable: records say ``null`` (not checked), never ``ok``."""

    def quality(self, img: Image.Image) -> dict[str, Any] | None:
        return None

    def lesion(self, img: Image.Image) -> dict[str, Any] | None:
        return None

    def box(self, img: Image.Image) -> list[float] | None:
        return None


@dataclass
class Prepared:
    image: Image.Image
    quality: dict[str, Any] | None
    lesion: dict[str, Any] | None
    box: list[float] | None
    timings_ms: dict[str, float] = field(default_factory=dict)
    pixels: np.ndarray | None = None  # set per model (the input size follows the current model)


@dataclass
class Inferred:
    probs: np.ndarray
    heatmap: np.ndarray | None
    model: CloudModel


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 1)


def prepare(data: bytes, analysis: Analysis) -> Prepared:
    """Decode and check one image; an unusable image is a permanent failure with a clear reason."""
    t = time.perf_counter()
    try:
        img = load_image(data)
    except ImageError as exc:
        text = str(exc)
        if "too many pixels" in text or "limit is" in text:
            raise permanent("image_too_large", text) from None
        if "corrupt" in text or "truncated" in text:
            raise permanent("corrupt_image", text) from None
        raise permanent("not_an_image", text) from None
    timings = {"decode": _ms(t)}
    t = time.perf_counter()
    quality = analysis.quality(img)
    timings["quality"] = _ms(t)
    t = time.perf_counter()
    lesion = analysis.lesion(img)
    timings["lesion"] = _ms(t)
    t = time.perf_counter()
    box = analysis.box(img)
    timings["localise"] = _ms(t)
    return Prepared(img, quality, lesion, box, timings)


def infer(model: CloudModel, items: Sequence[Prepared]) -> list[Inferred]:
    """One batched model call (with the model's test-time augmentation) for several cases."""
    t = time.perf_counter()
    for item in items:
        item.pixels = to_model_input(item.image, box=item.box, config=model.preprocess)
    batch = np.stack([item.pixels for item in items])
    crop_ms = _ms(t)
    t = time.perf_counter()
    probs = model.predict(batch)
    infer_ms = _ms(t)
    if probs.shape != (len(items), len(model.labels)) or not np.all(np.isfinite(probs)):
        raise RuntimeError(f"model {model.version} returned {probs.shape} / non-finite probabilities")
    t = time.perf_counter()
    maps = model.explain(batch, [int(np.argmax(p)) for p in probs])
    cam_ms = _ms(t)
    out = []
    for i, item in enumerate(items):
        # Batched steps are shared: each case records the time of the call it was part of.
        item.timings_ms.update(crop=crop_ms, infer=infer_ms, gradcam=cam_ms, batch=len(items))
        out.append(Inferred(probs[i], None if maps is None else maps[i], model))
    return out


def heatmap_png(item: Prepared, heatmap: np.ndarray, alpha: float = 0.45) -> bytes:
    """The Grad-CAM map as a colour overlay on the model's input crop, for the reviewer portal."""
    from matplotlib import colormaps

    base = np.asarray(item.pixels if item.pixels is not None else item.image, dtype=np.float32)
    h, w = base.shape[:2]
    cam = np.asarray(Image.fromarray((np.clip(heatmap, 0, 1) * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR))
    colour = colormaps["jet"](cam / 255.0)[..., :3] * 255.0
    overlay = np.clip((1 - alpha) * base + alpha * colour, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(overlay).save(buf, format="PNG")
    return buf.getvalue()


def record(item: Prepared, result: Inferred, heatmap_path: str | None, now_ms: int) -> dict[str, Any]:
    """The ``cloud`` field of a case (docs/ARCHITECTURE.md)."""
    model = result.model
    probs = result.probs
    order = np.argsort(-probs)[:3]
    risk, malignant_p = model.risk(probs)
    return {
        "modelVersion": model.version,
        "probs": {label.id: round(float(p), 6) for label, p in zip(model.labels, probs, strict=True)},
        "top": [{"label": model.labels[i].id, "name": model.labels[i].name, "p": round(float(probs[i]), 6)} for i in order],
        "risk": risk,
        "malignantP": round(malignant_p, 6),
        "quality": item.quality,
        "lesion": item.lesion,
        "box": item.box,
        "heatmapPath": heatmap_path,
        "timingsMs": item.timings_ms,
        "at": now_ms,
    }
