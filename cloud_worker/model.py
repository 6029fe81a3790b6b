"""What the worker needs from a cloud model, and the adapter over a trained model directory.

The worker's machinery (claiming, batching, retries) only sees the small ``CloudModel`` protocol,
so it is tested with a tiny real Keras model and runs the production model unchanged. The model
directory layout, preprocessing, test-time augmentation and risk policy are ``dermaloop.model_dir``'s
(the training pipeline writes them); this module adds graph-compiled, batched Grad-CAM.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from dermaloop.preprocess import PreprocessConfig, symmetric_pixels


@dataclass(frozen=True)
class Label:
    id: str
    name: str
    malignant: bool


class CloudModel(Protocol):
    version: str
    labels: Sequence[Label]
    preprocess: PreprocessConfig

    def classify(self, batch: np.ndarray, explain: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """(N, size, size, 3) float pixels in [0, 255] -> ((N, classes) calibrated probabilities,
        Grad-CAM maps (N, h, w) in [0, 1] for each image's called class (the card's decision rule), or None)."""

    def risk(self, probs: np.ndarray) -> tuple[str | None, float]:
        """(risk tier, malignant probability) for one image's probabilities."""

    def rank(self, probs: np.ndarray) -> np.ndarray:
        """One image's class indices, the model's call first (the card's decision rule)."""


class ModelLoadError(RuntimeError):
    """A model directory is missing, incomplete or unreadable."""


class KerasCloudModel:
    """The cloud model of a model directory (``dermaloop.model_dir``): calibrated probabilities with
    the card's test-time augmentation, the card's risk policy, and Grad-CAM on the feature layer.

    Speed on CPU: the forward pass that Grad-CAM needs already yields the plain view's
    probabilities, so one graph-compiled pass (``tf.function``) gives both; only the extra
    test-time-augmentation views run again. Eager Keras calls cost ~10x more per image here.
    """

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
        self.tta = list(self.inner.tta)
        self.demonstration = bool(self.inner.demonstration)
        self._lock = threading.Lock()  # one model call at a time; the batch is the parallelism
        self._build()

    def _build(self) -> None:
        import tensorflow as tf

        from dermaloop.analysis.gradcam import DEFAULT_LAYER, split_model

        model = self.inner.model
        size = self.preprocess.size
        # Fixed signatures with a free batch dimension: traced once at load, never mid-run.
        images = tf.TensorSpec([None, size, size, 3], tf.float32)
        classes_spec = tf.TensorSpec([None], tf.int32)
        self._forward = tf.function(lambda x: model(x, training=False), input_signature=[images])
        self._explain_own = self._explain_given = None
        try:
            run = split_model(model, DEFAULT_LAYER)
        except ValueError:  # the network has no such layer: probabilities only
            run = None
        if run is not None:
            def cam(x, classes):
                with tf.GradientTape() as tape:
                    fmap, out = run(x)
                    tape.watch(fmap)
                    if classes is None:  # the plain view's prediction, from this same pass
                        classes = tf.argmax(out, axis=1, output_type=tf.int32)
                    # Images are independent in inference mode: the gradient of the sum of each
                    # image's class log-probability gives every image its own gradient.
                    picked = tf.gather(out, classes, axis=1, batch_dims=1)
                    target = tf.reduce_sum(tf.math.log(picked + 1e-12))
                grads = tape.gradient(target, fmap)
                weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
                cams = tf.nn.relu(tf.reduce_sum(fmap * weights, axis=-1))
                top = tf.reduce_max(cams, axis=(1, 2), keepdims=True)
                return out, tf.math.divide_no_nan(cams, top)

            self._explain_own = tf.function(lambda x: cam(x, None), input_signature=[images])
            self._explain_given = tf.function(cam, input_signature=[images, classes_spec])
        warm = np.zeros((1, size, size, 3), np.float32)
        self._forward(warm)
        if self._explain_own is not None:
            self._explain_own(warm)
            self._explain_given(warm, np.zeros(1, np.int32))

    def classify(self, batch: np.ndarray, explain: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        x = np.asarray(batch, np.float32)
        with self._lock:
            maps = None
            if explain and self._explain_own is not None:
                plain, maps = self._explain_own(x)
                plain, maps = np.asarray(plain), np.array(maps)
            else:
                plain = np.asarray(self._forward(x))
            views = [plain] + [np.asarray(self._forward(np.ascontiguousarray(symmetric_pixels(x, t)))) for t in self.tta]
        probs = np.mean(views, axis=0)
        probs = probs / probs.sum(axis=1, keepdims=True)
        if maps is not None:
            called = self.inner.policy.decide(probs)
            wrong = np.flatnonzero(called != np.argmax(plain, axis=1))
            if len(wrong):  # explain the call (averaged views, class offsets), not the plain view's argmax
                with self._lock:
                    _, fixed = self._explain_given(x[wrong], called[wrong].astype(np.int32))
                maps[wrong] = np.asarray(fixed)
        return probs, maps

    def risk(self, probs: np.ndarray) -> tuple[str | None, float]:
        assessed = self.inner.policy.assess(np.asarray(probs))
        return assessed["risk"], float(assessed["malignantP"])

    def rank(self, probs: np.ndarray) -> np.ndarray:
        return self.inner.policy.rank(probs)

    def unsure(self, probs: np.ndarray) -> dict:
        """``{"unsure": bool, "predictionSet": [class ids]}`` under the card's abstain rule, ``{}`` without one."""
        return self.inner.unsure(probs)


def load_model(model_dir: Path) -> CloudModel:
    return KerasCloudModel(Path(model_dir))
