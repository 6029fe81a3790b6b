"""Photo quality gate: is this photo good enough to judge, and if not, what should the user do?

Each check returns a code and a specific instruction, because "bad photo" alone does not help anyone
take a better one. Thresholds are not guessed: ``quality_calibrate`` fits them on real HAM10000
training images and synthetic degradations of them (blur, gamma, distant shots) and writes
``quality_calibration.json`` next to this file; the figures on the validation split are in
docs/MODEL_REPORT.md. Checks run on a small thumbnail (shorter side ``THUMB_SIDE``), so they cost a
few milliseconds whatever the camera resolution. Runtime code here needs only numpy and Pillow, the
image libraries that exist in Flet's phone builds (SciPy and scikit-image do not).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

THUMB_SIDE = 150
MIN_SIDE = 64  # below this there is nothing to judge
CALIBRATION_FILE = Path(__file__).with_name("quality_calibration.json")

MESSAGES: dict[str, str] = {
    "low_resolution": "The picture is too small. Take the photo with the phone's camera at full resolution.",
    "blurry": "The photo is blurred. Hold the phone steady, tap the lesion to focus, and take it again.",
    "too_dark": "The photo is too dark. Move to daylight or a brighter room (without flash) and retake it.",
    "too_bright": "The photo is over-exposed. Move out of direct light or sunshine and retake it.",
    "glare": "There is glare on the skin. Avoid flash and direct light, and hold the phone at a slight angle.",
    "lesion_too_small": "The spot is too small in the picture. Move closer so it fills the middle of the photo.",
    "lesion_off_centre": "The spot is not in the middle. Centre it in the frame and retake the photo.",
}

# Offsets for directional gradient energy: 4 directions at distance 1, 2 and a knight's move.
_OFFSETS = ((0, 1), (1, 1), (1, 0), (1, -1), (0, 2), (2, 2), (2, 0), (2, -2), (1, 2), (2, 1), (2, -1), (1, -2))


@dataclass
class QualityReport:
    ok: bool
    issues: list[str]
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def messages(self) -> list[str]:
        return [MESSAGES[code] for code in self.issues]

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "issues": list(self.issues), "messages": self.messages}


def thumbnail(img: Image.Image, side: int = THUMB_SIDE) -> Image.Image:
    """RGB copy whose shorter side is ``side`` (never upscaled)."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    w, h = img.size
    scale = side / min(w, h)
    if scale >= 1.0:
        return img
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR,
                      reducing_gap=2.0)


def _box_blur(a: np.ndarray, size: int, axis: int) -> np.ndarray:
    """Moving average along one axis (reflected edges), by cumulative sums."""
    pad = [(0, 0)] * a.ndim
    pad[axis] = (size // 2, size - 1 - size // 2)
    c = np.cumsum(np.pad(a, pad, mode="symmetric"), axis=axis, dtype=np.float64)
    c = np.concatenate([np.zeros_like(np.take(c, [0], axis=axis)), c], axis=axis)
    n = a.shape[axis]
    return (np.take(c, np.arange(size, size + n), axis=axis) - np.take(c, np.arange(n), axis=axis)) / size


def _sobel(a: np.ndarray, axis: int) -> np.ndarray:
    """Sobel derivative along ``axis`` (smoothed [1, 2, 1] across it), edges replicated."""
    p = np.pad(a, 1, mode="edge")
    if axis == 0:
        d = p[2:, :] - p[:-2, :]
        return (d[:, :-2] + 2 * d[:, 1:-1] + d[:, 2:]) / 4.0
    d = p[:, 2:] - p[:, :-2]
    return (d[:-2, :] + 2 * d[1:-1, :] + d[2:, :]) / 4.0


def blur_metric(grey: np.ndarray, size: int = 11) -> float:
    """No-reference blur (Crete et al., SPIE 2007): how much of the image's gradient survives a
    further box blur. 0 = sharp, 1 = as blurred as it can get; the worse of the two axes."""
    scores = []
    inner = (slice(2, grey.shape[0] - 1), slice(2, grey.shape[1] - 1))
    for axis in (0, 1):
        sharp = np.abs(_sobel(grey, axis))
        blurred = np.abs(_sobel(_box_blur(grey, size, axis), axis))
        variation = np.maximum(0.0, sharp - blurred)
        total = float(sharp[inner].sum())
        scores.append(abs(total - float(variation[inner].sum())) / max(total, 1e-12))
    return float(max(scores))


def blur_features(grey: np.ndarray) -> np.ndarray:
    """Sharpness descriptors that survive rotation: sorted log directional gradient energies (motion
    blur removes energy along one direction only) and the no-reference blur metric."""
    h, w = grey.shape
    c = grey[3:h - 3, 3:w - 3]
    energies = np.array([np.mean((grey[3 + dy:h - 3 + dy, 3 + dx:w - 3 + dx] - c) ** 2) for dy, dx in _OFFSETS])
    e = np.log(energies + 1e-8)
    top = e[:4].max()
    return np.concatenate([np.sort(e[:4]) - top, np.sort(e[4:8]) - top, np.sort(e[8:]) - top,
                           [top, blur_metric(grey)]]).astype(np.float64)


def exposure_features(rgb: np.ndarray) -> np.ndarray:
    """Luminance percentiles, clipped-white and crushed-black shares, and colour statistics (a gamma
    error also shifts saturation and the balance between channels, not only brightness)."""
    y = (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]) / 255.0
    p = np.percentile(y, [2, 10, 25, 50, 75, 90, 98])
    mx, mn = rgb.max(axis=-1), rgb.min(axis=-1)
    clipped = float(np.mean(mx >= 250))
    crushed = float(np.mean(mx <= 12))
    sat = (mx - mn) / np.maximum(mx, 1.0)
    chroma = [float(np.median(rgb[..., c])) / 255.0 for c in range(3)]
    return np.concatenate([p, [clipped, crushed, float(sat.mean()), float(np.percentile(sat, 90))], chroma]).astype(np.float64)


def _interior(mask: np.ndarray) -> np.ndarray:
    """The parts of ``mask`` not 4-connected to the frame's edge (iterative propagation in numpy)."""
    reach = np.zeros_like(mask)
    reach[0], reach[-1], reach[:, 0], reach[:, -1] = mask[0], mask[-1], mask[:, 0], mask[:, -1]
    for _ in range(4 * sum(mask.shape)):
        grown = reach.copy()
        grown[1:] |= reach[:-1]
        grown[:-1] |= reach[1:]
        grown[:, 1:] |= reach[:, :-1]
        grown[:, :-1] |= reach[:, 1:]
        grown &= mask
        if np.array_equal(grown, reach):
            break
        reach = grown
    return mask & ~reach


def glare_fraction(rgb: np.ndarray) -> float:
    """Share of the frame covered by specular patches: nearly white, colourless pixels that are not
    connected to the frame's edge (flash reflections sit on the skin; white margins and vignettes
    touch the edge). A white area over a fifth of the frame is over-exposure, not glare."""
    mx = rgb.max(axis=-1).astype(np.float32)
    mn = rgb.min(axis=-1).astype(np.float32)
    sat = (mx - mn) / np.maximum(mx, 1.0)
    white = (mx >= 240) & (sat <= 0.12)
    if not white.any():
        return 0.0
    share = float(_interior(white).mean())
    return 0.0 if share >= 0.2 else share


def box_geometry(box: tuple[float, float, float, float], size: tuple[int, int]) -> tuple[float, float]:
    """(lesion side / frame's shorter side, distance of the box centre from the frame centre)."""
    w, h = size
    x0, y0, x1, y1 = box
    side = max((x1 - x0) * w, (y1 - y0) * h) / min(w, h)
    off = float(np.hypot((x0 + x1) / 2 - 0.5, (y0 + y1) / 2 - 0.5))
    return float(side), off


def _linear_score(model: dict[str, Any], x: np.ndarray) -> float:
    z = (x - np.asarray(model["mean"])) / np.asarray(model["scale"])
    return float(1.0 / (1.0 + np.exp(-(z @ np.asarray(model["coef"]) + model["intercept"]))))


@lru_cache(maxsize=4)
def load_calibration(path: str | None = None) -> dict[str, Any]:
    """The calibrated thresholds; a missing file is an error, never silently replaced by guesses."""
    p = Path(path) if path else CALIBRATION_FILE
    if not p.is_file():
        raise FileNotFoundError(f"{p} missing: run `python -m training.quality_calibrate --data DIR`")
    return json.loads(p.read_text())


def image_metrics(img: Image.Image) -> dict[str, Any]:
    """Everything the checks need from the pixels (box-free)."""
    thumb = thumbnail(img)
    rgb = np.asarray(thumb, dtype=np.float32)
    grey = np.asarray(thumb.convert("L"), dtype=np.float32) / 255.0
    return {"blur_x": blur_features(grey), "exposure_x": exposure_features(rgb), "glare": glare_fraction(rgb)}


def assess(img: Image.Image, box: tuple[float, float, float, float] | None = None,
           calibration: dict[str, Any] | None = None) -> QualityReport:
    """Run every check on a photo (and the localiser's box, when there is one)."""
    cal = calibration or load_calibration()
    issues: list[str] = []
    metrics: dict[str, float] = {}
    if min(img.size) < MIN_SIDE:
        return QualityReport(False, ["low_resolution"], {"min_side": float(min(img.size))})
    m = image_metrics(img)
    metrics["blur_score"] = _linear_score(cal["blur"], m["blur_x"])
    metrics["dark_score"] = _linear_score(cal["dark"], m["exposure_x"])
    metrics["bright_score"] = _linear_score(cal["bright"], m["exposure_x"])
    metrics["glare_fraction"] = m["glare"]
    if metrics["blur_score"] > cal["blur"]["threshold"]:
        issues.append("blurry")
    if metrics["dark_score"] > cal["dark"]["threshold"]:
        issues.append("too_dark")
    if metrics["bright_score"] > cal["bright"]["threshold"]:
        issues.append("too_bright")
    elif metrics["glare_fraction"] > cal["glare"]["threshold"]:
        issues.append("glare")  # over-exposure already explains bright pixels
    if box is not None:
        side, off = box_geometry(box, img.size)
        metrics["lesion_side"], metrics["lesion_offset"] = side, off
        if side < cal["lesion"]["min_side"]:
            issues.append("lesion_too_small")
        elif off > cal["lesion"]["max_offset"]:
            issues.append("lesion_off_centre")
    return QualityReport(not issues, issues, metrics)


def white_balance(img: Image.Image) -> Image.Image:
    """Shades-of-grey white balance (the shared preprocessing's implementation) for colour casts."""
    from dermaloop.preprocess import shades_of_grey

    rgb = np.asarray(img.convert("RGB"), dtype=np.float32)
    return Image.fromarray(np.round(shades_of_grey(rgb)).astype(np.uint8), "RGB")


def correct_exposure(img: Image.Image, target_median: float | None = None) -> tuple[Image.Image, float]:
    """Gamma that moves the median luminance to the calibrated typical value; returns (image, gamma).

    Used only when the gate flags the exposure: a retake is better, but offline users may not have
    better light, and a corrected image is judged more reliably than a dark one."""
    target = target_median if target_median is not None else load_calibration()["typical_median_luminance"]
    rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    y = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    med = float(np.clip(np.median(y), 0.02, 0.98))
    g = float(np.clip(np.log(target) / np.log(med), 0.2, 5.0))
    return Image.fromarray(np.clip(255.0 * np.power(rgb, g) + 0.5, 0, 255).astype(np.uint8), "RGB"), g
