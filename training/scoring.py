"""What a model directory answers on a list of images, as its runtime would, cheaply and cached.

Retraining compares two models on the same benchmark every run; running whole networks each time
would dominate the run. Float models (``device/model.keras``, ``cloud/model.keras``) are scored as
"penultimate features (cached per network digest and image sha256) -> the model's own linear head
-> temperature -> mean over the cloud's test-time views", which is the network's arithmetic split
in two (``training.refit``); a few images are also run through the real runtime and must agree, so
a scoring bug cannot pass silently. The device int8 model runs through TFLite for real, its
outputs cached by the .tflite file's sha256 and the image's. Models not built by
``training.assemble`` are run through their runtime without a cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dermaloop.model_dir import CLOUD_KERAS, DEVICE_INT8, DEVICE_KERAS, CloudModel, DeviceModel, ModelDir
from dermaloop.preprocess import PreprocessConfig, load_image, to_model_input
from dermaloop.risk import RiskPolicy
from training.refit import EmbeddingCache, Head, RefitError, body_digest, embed, open_head, probabilities

__all__ = ["Image", "Scores", "ScoringError", "load_keras", "runtime_views", "score_float", "score_int8",
           "SPOT_CHECK_IMAGES", "SPOT_CHECK_TOLERANCE"]

SPOT_CHECK_IMAGES = 4
SPOT_CHECK_TOLERANCE = 2e-3  # float32 features through two routes; far below any decision


class ScoringError(RuntimeError):
    """The cached route and the runtime disagree: something in the scoring is wrong."""


@dataclass(frozen=True)
class Image:
    sha256: str
    path: Path


@dataclass
class Scores:
    """Probabilities of one model (``kind``, ``variant``) on a list of images, plus how they were had."""

    probs: np.ndarray
    policy: RiskPolicy
    how: str
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


def load_keras(model_dir: ModelDir, kind: str):
    import keras

    rel = DEVICE_KERAS if kind == "device" else CLOUD_KERAS
    return keras.models.load_model(model_dir.file(rel), compile=False, safe_mode=True)  # never runs code


def runtime_views(model_dir: ModelDir, kind: str) -> list[str]:
    """The views the runtime averages over: the cloud model's test-time symmetries, none on the device."""
    return ["orig", *model_dir.section("cloud").get("tta", [])] if kind == "cloud" else ["orig"]


def _policy(model_dir: ModelDir, kind: str) -> RiskPolicy:
    return RiskPolicy.from_dict(model_dir.section(kind)["risk"])


def head_features(model, model_dir: ModelDir, kind: str, images: list[Image], cache: EmbeddingCache | None,
                  progress: bool = True) -> tuple[Head, str, dict[str, np.ndarray]]:
    """(head, network digest, {view: features}) of ``images`` under a model built by training.assemble."""
    head = open_head(model)
    digest = body_digest(head)
    pre = PreprocessConfig.from_dict(model_dir.section(kind)["preprocess"])
    compute = head.extractor()
    pairs = [(im.sha256, im.path) for im in images]
    feats = {v: embed(compute, pairs, pre, cache, digest, v, progress=progress, desc=f"{kind} features ({v})")
             for v in runtime_views(model_dir, kind)}
    return head, digest, feats


def runtime_for(model_dir: ModelDir, kind: str):
    """The runtime the worker (cloud) or a phone (device, here its fp32 file) runs the model with."""
    return _runtime(model_dir, kind)


def _runtime(model_dir: ModelDir, kind: str):
    return CloudModel(model_dir) if kind == "cloud" else DeviceModel(model_dir, "fp32")


def _runtime_probs(runtime, images: list[Image]) -> np.ndarray:
    if not images:
        return np.zeros((0, len(runtime.taxonomy)), np.float32)
    pixels = np.stack([to_model_input(load_image(im.path), config=runtime.preprocess) for im in images])
    return np.asarray(runtime.predict(pixels), np.float64)


def score_float(model_dir: str | Path | ModelDir, kind: str, images: list[Image], cache: EmbeddingCache | None, *,
                model=None, runtime=None, progress: bool = True, spot_check: int = SPOT_CHECK_IMAGES) -> Scores:
    """Probabilities of the float ``kind`` model of ``model_dir`` on ``images``, as its runtime gives
    them (the cloud's mean over test-time views; the device's float network, i.e. the fp32 TFLite
    file's arithmetic). ``model``: the Keras model if already loaded; ``runtime``: the runtime
    (CloudModel / fp32 DeviceModel) for the spot check, if already loaded."""
    md = model_dir if isinstance(model_dir, ModelDir) else ModelDir.open(model_dir)
    started = time.perf_counter()
    model = model if model is not None else load_keras(md, kind)
    try:
        head, digest, feats = head_features(model, md, kind, images, cache, progress)
    except RefitError:
        runtime = runtime or _runtime(md, kind)
        probs = _runtime_probs(runtime, images)
        return Scores(probs, _policy(md, kind), "runtime (no refittable head)", time.perf_counter() - started)
    a, c = head.linear()
    views = runtime_views(md, kind)
    probs = probabilities([feats[v] for v in views], a, c, head.temperature) if images else \
        np.zeros((0, head.n_classes))
    extra: dict[str, Any] = {"network_digest": digest}
    if spot_check and images:
        idx = np.linspace(0, len(images) - 1, min(spot_check, len(images))).round().astype(int)
        idx = np.unique(idx)
        direct = _runtime_probs(runtime or _runtime(md, kind), [images[i] for i in idx])
        gap = float(np.abs(direct - probs[idx]).max())
        extra["spot_check"] = {"images": len(idx), "max_abs_difference": gap}
        if gap > SPOT_CHECK_TOLERANCE:
            raise ScoringError(f"{kind} model {md.card.get('version')}: cached-feature probabilities differ from "
                               f"the runtime's by {gap:.4f} on {len(idx)} images; refusing to judge it on them")
    return Scores(probs, _policy(md, kind), "cached penultimate features + head", time.perf_counter() - started,
                  extra)


def score_int8(model_dir: str | Path | ModelDir, images: list[Image], cache: EmbeddingCache | None, *,
               progress: bool = True) -> Scores:
    """The device int8 TFLite model's probabilities, run for real (cached per file and image)."""
    md = model_dir if isinstance(model_dir, ModelDir) else ModelDir.open(model_dir)
    started = time.perf_counter()
    runtime = DeviceModel(md, "int8")
    file_sha = md.card.get("files", {}).get(DEVICE_INT8)
    if not file_sha:
        from dermaloop.model_dir import sha256_file

        file_sha = sha256_file(md.file(DEVICE_INT8))
    pairs = [(im.sha256, im.path) for im in images]
    probs = embed(runtime.predict, pairs, runtime.preprocess, cache, f"tflite-{file_sha[:24]}", "orig",
                  batch_size=8, progress=progress, desc="device int8") if images else \
        np.zeros((0, len(runtime.taxonomy)), np.float32)
    return Scores(np.asarray(probs, np.float64), _policy(md, "device"), "TFLite int8 (cached outputs)",
                  time.perf_counter() - started, {"file_sha256": file_sha})
