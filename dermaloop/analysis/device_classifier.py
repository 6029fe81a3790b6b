"""The device classifier as the on-device path sees it: crop in, top-3 and risk tier out.

Reads a model directory written by ``dermaloop train`` (device TFLite, labels file, model card with
the preprocessing and the calibrated risk policy). The directory's own loader belongs to the models
code; this adapter only needs the files, so the diagnosis path keeps working while that code evolves.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dermaloop.analysis.localiser import Box

_CARD_NAMES = ("model_card.json", "card.json")
_LABEL_NAMES = ("labels.json", "taxonomy.json")


def _first(directory: Path, names: tuple[str, ...]) -> Path | None:
    return next((directory / n for n in names if (directory / n).is_file()), None)


def _device_tflite(directory: Path) -> Path | None:
    candidates = [p for p in sorted(directory.rglob("*.tflite")) if "analysis" not in p.name]
    for key in ("int8", "uint8", "quant"):
        for p in candidates:
            if key in p.name:
                return p
    return candidates[0] if candidates else None


class TfliteDeviceClassifier:
    def __init__(self, model_dir: str | Path, threads: int = 1) -> None:
        from dermaloop.analysis.runtime import TfliteModel
        from dermaloop.preprocess import PreprocessConfig
        from dermaloop.risk import RiskPolicy
        from dermaloop.taxonomy import load_taxonomy

        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise FileNotFoundError(f"model directory {self.model_dir} does not exist")
        card_path = _first(self.model_dir, _CARD_NAMES)
        self.card: dict[str, Any] = json.loads(card_path.read_text()) if card_path else {}
        labels = _first(self.model_dir, _LABEL_NAMES)
        self.taxonomy = load_taxonomy(labels) if labels else load_taxonomy()
        tflite = _device_tflite(self.model_dir)
        if tflite is None:
            raise FileNotFoundError(f"{self.model_dir}: no device .tflite model")
        self.model = TfliteModel(tflite, threads)
        device = self.card.get("device", {}) if isinstance(self.card.get("device"), dict) else {}
        pre = device.get("preprocess") or self.card.get("preprocess") or {}
        self.config = PreprocessConfig.from_dict({**pre, "size": self.model.input_size})
        risk = device.get("risk") or self.card.get("risk") or self.card.get("risk_policy")
        self.policy = RiskPolicy.from_dict(risk) if risk else None
        self.version = str(self.card.get("version") or self.model_dir.name)
        self.input_size = self.model.input_size

    def classify(self, img: Image.Image, box: Box | None) -> tuple[list[dict[str, Any]], str | None, dict[str, float]]:
        from dermaloop.preprocess import to_model_input

        t = time.perf_counter()
        pixels = to_model_input(img, box=box, config=self.config)
        t_pre = (time.perf_counter() - t) * 1000.0
        t = time.perf_counter()
        out = next(iter(self.model(pixels).values())).astype(np.float64)
        t_inf = (time.perf_counter() - t) * 1000.0
        is_prob = bool(np.all(out >= 0) and abs(out.sum() - 1.0) < 1e-3)
        if self.policy is not None and not is_prob:
            probs = self.policy.probabilities(out[None])[0]
        elif is_prob:
            probs = out
        else:
            e = np.exp(out - out.max())
            probs = e / e.sum()
        order = np.argsort(-probs)[:3]
        top = [{"label": self.taxonomy.classes[i].id, "name": self.taxonomy.classes[i].name, "p": float(probs[i])}
               for i in order]
        risk = self.policy.tier(float(self.policy.malignant_probability(probs))) if self.policy else None
        return top, risk, {"crop_resize": t_pre, "infer": t_inf}


def load_device_classifier(model_dir: str | Path | None, models_dir: str | Path | None = None,
                           threads: int = 1) -> TfliteDeviceClassifier | None:
    """The classifier in ``model_dir``; without one, the newest model directory under ``models_dir``
    that holds a device TFLite (None when there is none)."""
    if model_dir is not None:
        return TfliteDeviceClassifier(model_dir, threads)
    if models_dir is None or not Path(models_dir).is_dir():
        return None
    dirs = [d for d in Path(models_dir).iterdir() if d.is_dir() and d.name != "localiser" and _device_tflite(d)]
    if not dirs:
        return None
    return TfliteDeviceClassifier(max(dirs, key=lambda d: d.stat().st_mtime), threads)
