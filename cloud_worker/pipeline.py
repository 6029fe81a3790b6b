"""From verified image bytes to the ``cloud`` record of a case.

Split in three so the worker can overlap and batch them: ``prepare`` (decode, checks, crop; per
image, runs in the download pool), ``infer`` (one batched model call for many cases, plus Grad-CAM
when the model supports it) and ``record`` (the JSON written to the case).
"""

from __future__ import annotations

import functools
import io
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from PIL import Image

from cloud_worker.errors import permanent
from cloud_worker.model import CloudModel
from dermaloop import cases
from dermaloop.preprocess import ImageError, crop_box, load_image, to_model_input


@dataclass
class Checked:
    """What the image checks decided about one photo."""

    image: Image.Image  # possibly exposure-corrected
    quality: dict[str, Any] | None  # {ok, issues, messages}; None = not checked
    lesion: dict[str, Any] | None  # {is_lesion, score}; None = not checked
    box: list[float] | None  # lesion box (fractions) the classifier crops around; None = centre square
    classify: bool = True  # False: not a skin lesion or unusable; the model is not asked
    message: str | None = None  # what the patient should do, when there is something to say
    timings_ms: dict[str, float] = field(default_factory=dict)


class Analysis(Protocol):
    """The image checks around the classifier (quality gate, not-skin check, lesion localiser)."""

    def check(self, img: Image.Image) -> Checked: ...


class NoAnalysis:
    """Used where the checks are switched off: records say ``null`` (not checked), never ``ok``."""

    def check(self, img: Image.Image) -> Checked:
        return Checked(img, None, None, None)


@dataclass
class Prepared:
    checked: Checked
    timings_ms: dict[str, float] = field(default_factory=dict)
    pixels: np.ndarray | None = None  # set per model (the input size follows the current model)

    @property
    def image(self) -> Image.Image:
        return self.checked.image

    @property
    def box(self) -> list[float] | None:
        return self.checked.box


@dataclass
class Inferred:
    probs: np.ndarray | None  # None: not classified (declined by the checks)
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
    checked = analysis.check(img)
    timings.update(checked.timings_ms)
    timings["checks"] = _ms(t)
    return Prepared(checked, timings)


def infer(model: CloudModel, items: Sequence[Prepared], explain: bool = True) -> list[Inferred]:
    """One batched model call (with the model's test-time augmentation) for several cases; photos
    the checks declined are not classified (their result says why)."""
    todo = [item for item in items if item.checked.classify]
    classified = iter(_classify(model, todo, explain) if todo else [])
    return [next(classified) if item.checked.classify else Inferred(None, None, model) for item in items]


def _classify(model: CloudModel, items: Sequence[Prepared], explain: bool) -> list[Inferred]:
    t = time.perf_counter()
    for item in items:
        item.pixels = to_model_input(item.image, box=item.box, config=model.preprocess)
    batch = np.stack([item.pixels for item in items])
    crop_ms = _ms(t)
    t = time.perf_counter()
    probs, maps = model.classify(batch, explain=explain)
    infer_ms = _ms(t)
    if probs.shape != (len(items), len(model.labels)) or not np.all(np.isfinite(probs)):
        raise RuntimeError(f"model {model.version} returned {probs.shape} / non-finite probabilities")
    out = []
    for i, item in enumerate(items):
        # Batched steps are shared: each case records the time of the call it was part of
        # (``infer`` includes Grad-CAM, which shares the model's forward pass).
        item.timings_ms.update(crop=crop_ms, infer=infer_ms, batch=len(items))
        out.append(Inferred(probs[i], None if maps is None else maps[i], model))
    return out


@functools.lru_cache(maxsize=1)
def _lookup_tables(alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Jet colours and blend weights for the 256 heat levels (what ``gradcam.overlay`` computes per
    pixel, precomputed: the per-pixel colormap call cost ~200 ms per photo, more than the model)."""
    from matplotlib import colormaps

    levels = np.linspace(0.0, 1.0, 256)
    colours = (colormaps["jet"](levels)[:, :3] * 255.0).astype(np.float32)
    weights = (alpha * np.sqrt(levels)).astype(np.float32)[:, None]
    return colours, weights


def heatmap_png(item: Prepared, result: Inferred, max_side: int = 768, alpha: float = 0.45) -> bytes:
    """The Grad-CAM map over the whole photo (zero outside the square the model saw), for the portal."""
    from dermaloop.analysis.gradcam import place_in_frame

    assert result.heatmap is not None
    photo = item.image.copy()
    photo.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    sx, sy = photo.width / item.image.width, photo.height / item.image.height
    left, top, right, bottom = crop_box(item.image.width, item.image.height, item.box, result.model.preprocess)
    heat = place_in_frame(result.heatmap, photo.size, (left * sx, top * sy, right * sx, bottom * sy))
    level = np.clip(heat * 255.0 + 0.5, 0, 255).astype(np.uint8)
    colours, weights = _lookup_tables(alpha)
    blended = np.asarray(photo, np.float32) * (1.0 - weights[level]) + colours[level] * weights[level]
    buf = io.BytesIO()
    Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8), "RGB").save(buf, format="PNG", compress_level=1)  # 2x faster than 3, 4% bigger
    return buf.getvalue()


def record(item: Prepared, result: Inferred, heatmap_path: str | None, now_ms: int) -> dict[str, Any]:
    """The ``cloud`` field of a case, from what the checks and the model found."""
    model = result.model
    checked = item.checked
    demonstration = bool(getattr(model, "demonstration", False))
    base: dict[str, Any] = dict(model_version=model.version, quality=checked.quality, lesion=checked.lesion,
                                box=checked.box, heatmap_path=heatmap_path, timings_ms=item.timings_ms,
                                message=checked.message, at=now_ms, demonstration=demonstration)
    if result.probs is None:  # declined: no classification to show, only why
        return cases.cloud_record(**base)
    probs = result.probs
    risk, malignant_p = model.risk(probs)
    written = cases.cloud_record(
        **base,
        probs={label.id: float(p) for label, p in zip(model.labels, probs, strict=True)},
        top=[{"label": model.labels[i].id, "name": model.labels[i].name, "p": float(probs[i])}
             for i in model.rank(probs)[:3]],
        risk=risk,
        malignant_p=malignant_p,
    )
    # The card's abstain rule, when it has one: "unsure: a dermatologist will look" and the prediction set.
    # (A demonstration model's rule says nothing: model_dir._Model.unsure; it claims no calibrated doubt.)
    unsure = getattr(model, "unsure", None)
    return {**written, **(unsure(probs) if unsure is not None else {})}
