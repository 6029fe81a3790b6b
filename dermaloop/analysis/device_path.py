"""The on-device diagnosis path, step by step, with a timing for each step.

decode -> analyse (one trunk pass: lesion box + not-skin score) -> quality gate -> crop -> classify.
This is what the patient app runs offline and what ``dermaloop diagnose`` prints. Policy:

* not a skin lesion: nothing is classified; the user is told what to photograph instead;
* blurred or too small to judge: nothing is classified; the user is told how to retake it;
* too dark / too bright: the exposure is corrected by a gamma before cropping, and flagged;
* glare, small or off-centre lesion: classified on the auto-crop, and flagged so the app can suggest
  a retake (the crop already narrows the field of view, as the seed systems recommend);
* an unsure localiser (low confidence): the classifier sees the centre square instead of a crop.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from dermaloop.analysis import ood, quality
from dermaloop.analysis.features import frame_input
from dermaloop.analysis.localiser import MIN_CONFIDENCE, Box, clip_box, crop_fractions

BLOCKING_ISSUES = frozenset({"blurry", "low_resolution"})
EXPOSURE_ISSUES = frozenset({"too_dark", "too_bright"})


class Classifier(Protocol):
    """What the path needs from the device model (adapters live in ``device_classifier.py``)."""

    version: str
    input_size: int

    def classify(self, img: Image.Image, box: Box | None) -> tuple[list[dict[str, Any]], str | None, dict[str, float]]:
        """(top-3 [{label, name, p}], risk tier or None, sub-timings in ms)."""


class Analyser:
    """The analysis TFLite model: frame -> (box, box confidence, P(lesion))."""

    def __init__(self, path: str | Path, threads: int = 1) -> None:
        from dermaloop.analysis.runtime import TfliteModel

        self.path = Path(path)
        self.model = TfliteModel(path, threads)
        head = ood.load_head()
        self.threshold = float(head["threshold"])

    def __call__(self, img: Image.Image) -> tuple[Box, float, float]:
        out = next(iter(self.model(frame_input(img, self.model.input_size)).values()))
        return clip_box(out[:4]), float(out[4]), ood.untemper(float(out[5]))


@dataclass
class DeviceResult:
    quality: quality.QualityReport
    is_lesion: bool
    lesion_score: float
    box: Box | None
    box_confidence: float | None
    crop: Box | None
    top: list[dict[str, Any]]
    risk: str | None
    timings_ms: dict[str, float]
    message: str | None = None
    corrections: dict[str, float] = field(default_factory=dict)
    model_version: str | None = None

    def to_json(self) -> dict[str, Any]:
        r = lambda v: None if v is None or not np.isfinite(v) else round(float(v), 4)  # noqa: E731
        return {
            "quality": self.quality.to_json(),
            "lesion": {"is_lesion": self.is_lesion, "score": r(self.lesion_score)},
            "box": None if self.box is None else [r(v) for v in self.box],
            "box_confidence": r(self.box_confidence),
            "crop": None if self.crop is None else [r(v) for v in self.crop],
            "top": [{"label": t["label"], "name": t["name"], "p": r(t["p"])} for t in self.top],
            "risk": self.risk,
            "message": self.message,
            "corrections": {k: r(v) for k, v in self.corrections.items()},
            "model_version": self.model_version,
            "timings_ms": {k: round(v, 2) for k, v in self.timings_ms.items()},
        }


class DevicePath:
    def __init__(self, analyser: Analyser | None, classifier: Classifier | None,
                 loader: Callable[[Any], Image.Image] | None = None) -> None:
        """``analyser=None`` runs without localisation and without the not-skin check (baseline)."""
        from dermaloop.preprocess import load_image

        self.analyser = analyser
        self.classifier = classifier
        self.load = loader or load_image

    def run(self, source: str | os.PathLike[str] | bytes | Image.Image, force: bool = False) -> DeviceResult:
        """The whole path for one photo. Unreadable input raises ``preprocess.ImageError``."""
        timings: dict[str, float] = {}
        t_all = time.perf_counter()

        t = time.perf_counter()
        img = source if isinstance(source, Image.Image) else self.load(source)
        if img.mode != "RGB":
            img = img.convert("RGB")
        timings["decode"] = _ms(t)

        box: Box | None = None
        box_conf: float | None = None
        score, is_lesion = float("nan"), True
        if self.analyser is not None and min(img.size) >= quality.MIN_SIDE:
            t = time.perf_counter()
            raw_box, box_conf, score = self.analyser(img)
            is_lesion = score >= self.analyser.threshold
            box = raw_box if (is_lesion and box_conf >= MIN_CONFIDENCE) else None
            timings["analyse"] = _ms(t)

        t = time.perf_counter()
        report = quality.assess(img, box)
        timings["quality"] = _ms(t)

        result = DeviceResult(report, is_lesion, score, box, box_conf, None, [], None, timings,
                              model_version=getattr(self.classifier, "version", None))
        if self.analyser is not None and not np.isfinite(score):
            is_lesion = False  # too small to analyse at all
            result.is_lesion = False
        if "low_resolution" in report.issues:
            result.message = " ".join(report.messages)  # nothing can be judged, even when forced
        elif not is_lesion and not force:
            result.message = ood.MESSAGE
        elif set(report.issues) & BLOCKING_ISSUES and not force:
            result.message = " ".join(report.messages)
        elif self.classifier is None:
            result.message = "No device model available: only the photo checks ran."
        else:
            if set(report.issues) & EXPOSURE_ISSUES:
                t = time.perf_counter()
                img, g = quality.correct_exposure(img)
                result.corrections["gamma"] = g
                timings["correct"] = _ms(t)
            result.crop = crop_fractions(img.size, box)
            t = time.perf_counter()
            top, risk, sub = self.classifier.classify(img, box)
            timings.update(sub)
            timings["classify"] = _ms(t)
            result.top, result.risk = top, risk
            if report.issues:
                result.message = " ".join(report.messages)
        timings["total"] = _ms(t_all)
        return result


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0
