"""What the worker needs from a cloud model, and the loader for model directories.

The worker's machinery (claiming, batching, retries) only sees the small ``CloudModel`` protocol,
so it is tested with a tiny real Keras model and runs the production model unchanged.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from dermaloop.preprocess import PreprocessConfig


@dataclass(frozen=True)
class Label:
    id: str
    name: str
    malignant: bool


class CloudModel(Protocol):
    version: str
    labels: Sequence[Label]
    preprocess: PreprocessConfig

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """(N, size, size, 3) float pixels in [0, 255] -> (N, classes) calibrated probabilities."""

    def explain(self, batch: np.ndarray, classes: Sequence[int]) -> np.ndarray | None:
        """Grad-CAM maps (N, h, w) in [0, 1] for the given class per image, or None if unsupported."""

    def risk(self, probs: np.ndarray) -> tuple[str | None, float]:
        """(risk tier, malignant probability) for one image's probabilities."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc


class ModelLoadError(RuntimeError):
    """A model directory is missing, incomplete or unreadable."""


def _labels(card: dict[str, Any], model_dir: Path) -> list[Label]:
    raw = card.get("labels")
    if raw is None and (model_dir / "labels.json").is_file():
        raw = _read_json(model_dir / "labels.json")
    if isinstance(raw, dict):
        raw = raw.get("classes") or raw.get("labels")
    if not isinstance(raw, list) or not raw:
        raise ModelLoadError(f"{model_dir}: no labels")
    labels = []
    for item in raw:
        if isinstance(item, str):
            labels.append(Label(item, item, False))
        else:
            labels.append(Label(str(item["id"]), str(item.get("name", item["id"])), bool(item.get("malignant", False))))
    return labels


class KerasCloudModel:
    """A Keras classifier from a model directory: ``card.json`` (version, labels, preprocessing,
    thresholds) and the Keras file it names. Test-time augmentation (horizontal and vertical flips)
    averages the probabilities of the flipped copies in the same batched call."""

    def __init__(self, model_dir: Path, tta: bool = True) -> None:
        import keras

        self.model_dir = Path(model_dir)
        card_path = self.model_dir / "card.json"
        if not card_path.is_file():
            raise ModelLoadError(f"{self.model_dir}: no card.json (not a model directory)")
        card = _read_json(card_path)
        cloud = card.get("cloud") or {}
        self.version = str(cloud.get("version") or card.get("version") or self.model_dir.name)
        self.labels = _labels(card, self.model_dir)
        self.preprocess = PreprocessConfig.from_dict(cloud.get("preprocess") or card.get("preprocess") or {})
        self.thresholds = cloud.get("risk") or card.get("risk") or {"moderate": 0.15, "high": 0.5}
        keras_file = self.model_dir / (cloud.get("file") or "cloud.keras")
        if not keras_file.is_file():
            raise ModelLoadError(f"{self.model_dir}: missing {keras_file.name}")
        self.tta = tta
        self.keras_model = keras.models.load_model(keras_file, compile=False)
        self.feature_layer = cloud.get("feature_layer")
        self._lock = threading.Lock()  # Keras calls from one thread at a time

    def _views(self, batch: np.ndarray) -> np.ndarray:
        if not self.tta:
            return batch
        return np.concatenate([batch, batch[:, :, ::-1], batch[:, ::-1]], axis=0)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        n = len(batch)
        views = self._views(np.asarray(batch, dtype=np.float32))
        with self._lock:
            out = np.asarray(self.keras_model(views, training=False))
        out = out.reshape(-1, n, out.shape[-1]).mean(axis=0)
        total = out.sum(axis=1, keepdims=True)
        return out / np.where(total > 0, total, 1.0)

    def explain(self, batch: np.ndarray, classes: Sequence[int]) -> np.ndarray | None:
        return None

    def risk(self, probs: np.ndarray) -> tuple[str | None, float]:
        malignant = float(sum(p for p, label in zip(probs, self.labels, strict=True) if label.malignant))
        if malignant >= float(self.thresholds.get("high", 0.5)):
            return "high", malignant
        if malignant >= float(self.thresholds.get("moderate", 0.15)):
            return "moderate", malignant
        return "low", malignant


def load_model(model_dir: Path) -> CloudModel:
    return KerasCloudModel(Path(model_dir))
