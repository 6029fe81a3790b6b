"""What the worker needs from a cloud model, and the adapter over a trained model directory.

The worker's machinery (claiming, batching, retries) only sees the small ``CloudModel`` protocol,
so it is tested with a tiny real Keras model and runs the production model unchanged. The model
directory layout, preprocessing, test-time augmentation and risk policy are ``dermaloop.model_dir``'s
(the training pipeline writes them); this module adds batched Grad-CAM.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

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


class ModelLoadError(RuntimeError):
    """A model directory is missing, incomplete or unreadable."""


class KerasCloudModel:
    """The cloud model of a model directory (``dermaloop.model_dir``): calibrated probabilities with
    the card's test-time augmentation, the card's risk policy, and Grad-CAM on the feature layer."""

    def __init__(self, model_dir: Path) -> None:
        from dermaloop.model_dir import ModelError, load_cloud_model

        try:
            self.inner = load_cloud_model(model_dir)
        except (ModelError, ValueError, KeyError, OSError) as exc:
            raise ModelLoadError(f"{model_dir}: {exc}") from exc
        self.model_dir = Path(model_dir)
        self.version = self.inner.version
        self.labels = [Label(c.id, c.name, bool(c.malignant)) for c in self.inner.taxonomy.classes]
        self.preprocess = self.inner.preprocess
        self._lock = threading.Lock()  # one Keras call at a time; the batch is the parallelism
        self._cam = None
        self._cam_error: str | None = None

    def predict(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:
            return np.asarray(self.inner.predict(np.asarray(batch, np.float32), batch_size=max(1, len(batch))))

    def _cam_model(self):
        if self._cam is None and self._cam_error is None:
            from dermaloop.analysis.gradcam import DEFAULT_LAYER, _split_model

            try:
                self._cam = _split_model(self.inner.model, DEFAULT_LAYER)
            except ValueError as exc:  # the network has no such layer: no heatmaps, said once
                self._cam_error = str(exc)
        return self._cam

    def explain(self, batch: np.ndarray, classes: Sequence[int]) -> np.ndarray | None:
        """Grad-CAM for a whole batch in one forward/backward pass (images are independent in
        inference mode, so the gradient of the sum of each image's class log-probability gives
        each image's own gradients)."""
        import tensorflow as tf

        run = self._cam_model()
        if run is None:
            return None
        x = tf.convert_to_tensor(np.asarray(batch, np.float32))
        idx = tf.constant(np.asarray(classes, np.int32))
        with self._lock, tf.GradientTape() as tape:
            fmap, out = run(x)
            tape.watch(fmap)
            picked = tf.gather(out, idx, axis=1, batch_dims=1)
            target = tf.reduce_sum(tf.math.log(picked + 1e-12))
        grads = tape.gradient(target, fmap)
        if grads is None:
            return None
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
        cams = tf.nn.relu(tf.reduce_sum(fmap * weights, axis=-1)).numpy().astype(np.float32)
        top = cams.reshape(len(cams), -1).max(axis=1)
        return cams / np.where(top > 0, top, 1.0)[:, None, None]

    def risk(self, probs: np.ndarray) -> tuple[str | None, float]:
        assessed = self.inner.policy.assess(np.asarray(probs))
        return assessed["risk"], float(assessed["malignantP"])


def load_model(model_dir: Path) -> CloudModel:
    return KerasCloudModel(Path(model_dir))
