"""The on-device diagnosis path, step by step, with a timing for each step.

decode -> analyse (one trunk pass: lesion box + not-skin score) -> quality gate -> crop -> classify.
This is what the patient app runs offline and what ``dermaloop diagnose`` prints. Policy:

* blurred or too small to judge: nothing is classified; the user is told how to retake it;
* too dark / too bright: flagged; the exposure is corrected by a gamma and the corrected photo is
  analysed again and cropped (a retake is better, but better light is not always at hand);
* not a skin lesion: nothing is classified; the user is told what to photograph instead (or, when
  the exposure is off, how to fix that first);
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

    def classify(self, img: Image.Image, box: Box | None) -> tuple[list[dict[str, Any]], str | None, dict[str, float],
                                                                   dict[str, Any]]:
        """(top-3 [{label, name, p}], risk tier or None, sub-timings in ms, and the card's abstain
        verdict ``{"unsure", "predictionSet"}`` or ``{}``; a 3-tuple without it is accepted too)."""


class Analyser:
    """The analysis TFLite model: frame -> (box, box confidence, P(lesion))."""

    def __init__(self, path: str | Path, threads: int = 1, copies: int = 1) -> None:
        from dermaloop.analysis.runtime import TfliteModel

        self.path = Path(path)
        self.model = TfliteModel(path, threads, copies)  # thread-safe; ``copies`` calls at once
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
    demonstration: bool = False  # the answering model was trained on synthetic images: no risk tier
    # The card's abstain rule (dermaloop.risk.AbstainRule), when it has one: {"unsure", "predictionSet"}.
    abstain: dict[str, Any] = field(default_factory=dict)

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
            "demonstration": self.demonstration,
            **({"unsure": bool(self.abstain["unsure"]), "prediction_set": list(self.abstain["predictionSet"])}
               if self.abstain else {}),
            "timings_ms": {k: round(v, 2) for k, v in self.timings_ms.items()},
        }

    def case_record(self, at: Any = None) -> dict[str, Any]:
        """The case's ``device`` field (``dermaloop.cases.device_record``): what the app uploads."""
        from dermaloop.cases import device_record

        return device_record(self.to_json(), self.model_version, at)


@dataclass
class Inspection:
    """The checks' verdict on one photo, before any classifier runs."""

    image: Image.Image  # RGB; exposure-corrected when the exposure was off
    report: quality.QualityReport
    is_lesion: bool
    score: float  # P(skin lesion); NaN when not analysed
    box: Box | None  # lesion box for the crop (None: centre square)
    box_confidence: float | None
    corrections: dict[str, float]
    classify: bool
    message: str | None
    timings_ms: dict[str, float]


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
        t_all = time.perf_counter()
        t = time.perf_counter()
        img = source if isinstance(source, Image.Image) else self.load(source)
        decode_ms = _ms(t)
        seen = self.inspect(img, force)
        timings = {"decode": decode_ms, **seen.timings_ms}
        result = DeviceResult(seen.report, seen.is_lesion, seen.score, seen.box, seen.box_confidence, None, [], None,
                              timings, message=seen.message, corrections=seen.corrections,
                              model_version=getattr(self.classifier, "version", None),
                              demonstration=bool(getattr(self.classifier, "demonstration", False)))
        if seen.classify and self.classifier is None:
            result.message = "No device model available: only the photo checks ran."
        elif seen.classify:
            result.crop = crop_fractions(seen.image.size, seen.box)
            t = time.perf_counter()
            top, risk, sub, *abstain = self.classifier.classify(seen.image, seen.box)
            timings.update(sub)
            timings["classify"] = _ms(t)
            result.top, result.risk = top, risk
            result.abstain = dict(abstain[0]) if abstain else {}
        timings["total"] = _ms(t_all)
        return result

    def inspect(self, img: Image.Image, force: bool = False) -> Inspection:
        """Every check before the classifier, and the decision whether to classify: shared by the
        device path and the cloud worker, so the two never disagree about whether a photo is usable."""
        timings: dict[str, float] = {}
        if img.mode != "RGB":
            img = img.convert("RGB")
        source_img = img
        box: Box | None = None
        check_box: Box | None = None
        box_conf: float | None = None
        score, is_lesion = float("nan"), self.analyser is None
        analysable = min(img.size) >= quality.MIN_SIDE
        if self.analyser is not None and analysable:
            t = time.perf_counter()
            box, check_box, box_conf, score, is_lesion = self._analyse(img)
            timings["analyse"] = _ms(t)

        t = time.perf_counter()
        report = quality.assess(img, check_box)
        timings["quality"] = _ms(t)

        corrections: dict[str, float] = {}
        if set(report.issues) & EXPOSURE_ISSUES and analysable:
            # A corrected exposure is judged more reliably: analyse it again and crop from it.
            t = time.perf_counter()
            img, corrections["gamma"] = quality.correct_exposure(img)
            if self.analyser is not None:
                box, check_box, box_conf, score, is_lesion = self._analyse(img)
                report = quality.assess(source_img, check_box)  # issues of the photo as taken, new box
            timings["correct"] = _ms(t)
        classify, message = decide(report, is_lesion, force)
        return Inspection(img, report, is_lesion, score, box, box_conf, corrections, classify, message, timings)

    def _analyse(self, img: Image.Image) -> tuple[Box | None, Box | None, float, float, bool]:
        """(box for the result, box for the photo checks, box confidence, P(lesion), is a lesion).

        The photo checks get any confident box even when the not-skin check declines the photo: a
        distant shot of a real spot is often declined, and "move closer" is the useful advice."""
        assert self.analyser is not None
        raw_box, conf, score = self.analyser(img)
        is_lesion = bool(score >= self.analyser.threshold)
        checked = raw_box if conf >= MIN_CONFIDENCE else None
        return (checked if is_lesion else None), checked, conf, score, is_lesion


def decide(report: quality.QualityReport, is_lesion: bool, force: bool = False) -> tuple[bool, str | None]:
    """(classify?, message for the user): the one policy shared by the device path and the worker.

    A photo that cannot be judged is never classified. A blurred photo gets the retake instruction,
    not the generic "this does not look like a skin spot" (blur also lowers the lesion score); a
    badly exposed one that still fails after correction, or a distant shot, gets both messages."""
    issues = set(report.issues)
    quality_message = " ".join(report.messages) or None
    if "low_resolution" in issues:
        return False, quality_message
    if force:
        return True, quality_message
    if issues & BLOCKING_ISSUES:
        return False, quality_message
    if not is_lesion:  # (judged on the exposure-corrected photo when the exposure was off)
        explains = issues & (EXPOSURE_ISSUES | {"lesion_too_small"})
        return False, ood.MESSAGE + (" " + quality_message if quality_message and explains else "")
    return True, quality_message


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0
