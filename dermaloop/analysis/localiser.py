"""Lesion localisation: where in the photo is the spot, and which square does the classifier see.

The box comes from a small head on the analysis trunk's 7x7 feature map (``features.py``), trained on
the HAM10000 segmentation masks' boxes (``training/localiser_train.py``). It predicts the box as
centre and size (fractions of the frame) plus a confidence: its own estimate of the box's IoU, used
to rank detections for average precision and to fall back to the whole frame when it is unsure.

The crop the classifier sees is ``dermaloop.preprocess.crop_box``: a square around the box with the
model's margin, kept inside the photo. ``crop_fractions`` exposes it in fractions so the app can draw
it and let the user move it; ``adjust_box`` applies the user's edit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Box = tuple[float, float, float, float]

# Below this predicted IoU the box is not trusted: the classifier gets the centre square instead.
MIN_CONFIDENCE = 0.35


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of box arrays (..., 4) as x0, y0, x1, y1."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ix = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    iy = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = ix * iy
    area = lambda z: np.clip(z[..., 2] - z[..., 0], 0, None) * np.clip(z[..., 3] - z[..., 1], 0, None)  # noqa: E731
    return inter / np.maximum(area(a) + area(b) - inter, 1e-12)


def average_precision(ious: np.ndarray, scores: np.ndarray, threshold: float) -> float:
    """VOC/COCO-style AP (all-point interpolation) with one ground-truth box and one detection per image.

    A detection is a true positive when its IoU reaches ``threshold``; detections are ranked by
    ``scores``; recall is over all images, so a missed lesion costs recall as it should."""
    ious, scores = np.asarray(ious), np.asarray(scores)
    order = np.argsort(-scores, kind="stable")
    tp = (ious[order] >= threshold).astype(np.float64)
    if len(tp) == 0:
        return 0.0
    precision = np.cumsum(tp) / np.arange(1, len(tp) + 1)
    recall = np.cumsum(tp) / len(tp)
    # Monotone precision envelope, then area under the step curve.
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    recall_steps = np.diff(np.concatenate([[0.0], recall]))
    return float(np.sum(envelope * recall_steps))


def clip_box(box: Sequence[float], min_size: float = 0.01) -> Box:
    """A valid box (0 <= x0 < x1 <= 1) from any four numbers, keeping at least ``min_size`` per side."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(np.isfinite(v) for v in (x0, y0, x1, y1)):
        raise ValueError(f"box has non-finite values: {box!r}")
    x0, x1 = sorted((x0, x1))
    y0, y1 = sorted((y0, y1))
    out = []
    for lo, hi in ((x0, x1), (y0, y1)):
        lo, hi = min(max(lo, 0.0), 1.0), min(max(hi, 0.0), 1.0)
        if hi - lo < min_size:
            c = min(max((lo + hi) / 2, min_size / 2), 1 - min_size / 2)
            lo, hi = c - min_size / 2, c + min_size / 2
        out.append((lo, hi))
    return (out[0][0], out[1][0], out[0][1], out[1][1])


def crop_fractions(size: tuple[int, int], box: Sequence[float] | None, margin: float | None = None) -> Box:
    """The classifier's square crop around ``box`` as fractions of the photo (what the app draws)."""
    from dermaloop.preprocess import PreprocessConfig, crop_box

    cfg = PreprocessConfig() if margin is None else PreprocessConfig(box_margin=margin)
    w, h = size
    left, top, right, bottom = crop_box(w, h, None if box is None else clip_box(box), cfg)
    return (left / w, top / h, right / w, bottom / h)


def adjust_box(box: Sequence[float], dx: float = 0.0, dy: float = 0.0, scale: float = 1.0) -> Box:
    """The user's adjustment: move by (dx, dy) (fractions of the frame) and scale about the centre."""
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be positive, got {scale!r}")
    x0, y0, x1, y1 = clip_box(box)
    cx, cy = (x0 + x1) / 2 + dx, (y0 + y1) / 2 + dy
    hw, hh = (x1 - x0) * scale / 2, (y1 - y0) * scale / 2
    # Keep the size where possible: shift back inside the frame before clipping.
    cx = min(max(cx, min(hw, 0.5)), max(1 - hw, 0.5))
    cy = min(max(cy, min(hh, 0.5)), max(1 - hh, 0.5))
    return clip_box((cx - hw, cy - hh, cx + hw, cy + hh))
