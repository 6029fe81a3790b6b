"""The device classifier as the on-device path sees it: photo + box in, top-3 and risk tier out.

A thin adapter over ``dermaloop.model_dir.DeviceModel`` (the model directory written by
``dermaloop train``): it adds the crop from the localiser's box and per-step timings.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from PIL import Image

from dermaloop.analysis.localiser import Box


class DeviceClassifier:
    def __init__(self, model) -> None:  # model: dermaloop.model_dir.DeviceModel
        self.model = model
        self.version = model.version
        self.demonstration = bool(getattr(model, "demonstration", False))
        self.config = model.preprocess
        self.input_size = model.size
        self.path = Path(model.path)

    def classify(self, img: Image.Image, box: Box | None) -> tuple[list[dict[str, Any]], str | None, dict[str, float],
                                                                   dict[str, Any]]:
        from dermaloop.preprocess import to_model_input

        t = time.perf_counter()
        pixels = to_model_input(img, box=box, config=self.config)
        t_pre = (time.perf_counter() - t) * 1000.0
        t = time.perf_counter()
        probs = self.model.predict(pixels[None])[0]
        t_inf = (time.perf_counter() - t) * 1000.0
        order = self.model.policy.rank(probs)[:3]
        classes = self.model.taxonomy.classes
        top = [{"label": classes[i].id, "name": classes[i].name, "p": float(probs[i])} for i in order]
        risk = self.model.policy.assess(probs)["risk"]
        # {} unless the card has an abstain rule: {"unsure": bool, "predictionSet": [class ids]}
        abstain = self.model.unsure(probs) if getattr(self.model, "abstain", None) is not None else {}
        return top, risk, {"crop_resize": t_pre, "infer": t_inf}, abstain


def _open(model_dir: Path, threads: int) -> DeviceClassifier:
    from dermaloop.model_dir import DEVICE_INT8, load_device_model

    variant = "int8" if (model_dir / DEVICE_INT8).is_file() else "fp32"
    return DeviceClassifier(load_device_model(model_dir, variant, threads))


def load_device_classifier(model_dir: str | Path | None, models_dir: str | Path | None = None,
                           threads: int = 1) -> DeviceClassifier | None:
    """The device model in ``model_dir`` (int8 preferred, else fp32). Without one: the newest model
    directory under ``models_dir`` that has a device model, or None when there is none.
    Raises ``FileNotFoundError``/``ModelError`` for a ``model_dir`` that is not a usable model."""
    from dermaloop.model_dir import CARD

    if model_dir is not None:
        model_dir = Path(model_dir)
        if not (model_dir / CARD).is_file():
            raise FileNotFoundError(f"{model_dir} is not a model directory (no {CARD})")
        return _open(model_dir, threads)
    found = newest_device_model_dir(models_dir)
    return None if found is None else _open(found, threads)


def newest_device_model_dir(models_dir: str | Path | None) -> Path | None:
    """The newest model directory under ``models_dir`` that holds a device model (int8 or fp32)."""
    from dermaloop.model_dir import CARD, DEVICE_FP32, DEVICE_INT8

    if models_dir is None or not Path(models_dir).is_dir():
        return None
    candidates = [d for d in Path(models_dir).rglob(CARD)
                  if (d.parent / DEVICE_INT8).is_file() or (d.parent / DEVICE_FP32).is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime).parent if candidates else None
