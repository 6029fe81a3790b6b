"""A trained model version on disk, and the two ways to run it (device TFLite, cloud Keras).

Layout of a model directory (written by ``dermaloop train``)::

    MODEL_DIR/
      card.json                 model card: version, labels, input, preprocessing, risk policy,
                                metrics, int8 parity, file hashes, data lineage
      labels.json               the taxonomy (dermaloop.taxonomy format)
      split.json                image ids of the train / calib / val parts
      device/model_int8.tflite  device model, uint8 pixels in, calibrated probabilities out
      device/model_fp32.tflite  same model in float32
      device/model.keras        its float Keras source (reference for parity checks)
      cloud/model.keras         cloud model, float pixels in, calibrated probabilities out
      reports/{device,cloud}/   evaluation reports (report.md, PNGs, metrics.json)

Both models take preprocessed pixels from ``dermaloop.preprocess`` (values 0..255) and output
calibrated class probabilities (the temperature is folded into the model), so a caller needs
only ``predict`` and the card's risk policy. Everything the app or the worker needs is behind
``load_device_model`` / ``load_cloud_model``; the TFLite interpreter import is in one function.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from dermaloop.preprocess import PreprocessConfig, load_image, symmetric_pixels, to_model_input
from dermaloop.risk import AbstainRule, RiskPolicy
from dermaloop.taxonomy import Taxonomy, load_taxonomy

__all__ = ["ModelDir", "DeviceModel", "CloudModel", "load_device_model", "load_cloud_model", "make_interpreter",
           "newest_model_dir", "sha256_file", "is_demonstration", "CARD", "LABELS"]

CARD = "card.json"
LABELS = "labels.json"
DEVICE_INT8 = "device/model_int8.tflite"
DEVICE_FP32 = "device/model_fp32.tflite"
DEVICE_KERAS = "device/model.keras"
CLOUD_KERAS = "cloud/model.keras"


class ModelError(RuntimeError):
    """A model directory is missing, incomplete or does not match its card."""


def is_demonstration(card: dict[str, Any]) -> bool:
    """A model trained on synthetic images (the starter a bare machine makes): it runs, but its
    answers mean nothing, so every runtime labels them a demonstration and names no risk tier.
    Older starter cards carry only the warning, hence the second test."""
    return card.get("demonstration") is True or "synthetic" in str(card.get("warning") or "").lower()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class ModelDir:
    root: Path
    card: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, root: str | Path) -> ModelDir:
        root = Path(root)
        try:
            card = json.loads((root / CARD).read_text())
        except FileNotFoundError:
            raise ModelError(f"{root} is not a model directory (no {CARD})") from None
        except json.JSONDecodeError as exc:
            raise ModelError(f"{root / CARD}: malformed JSON ({exc})") from exc
        return cls(root, card)

    @property
    def taxonomy(self) -> Taxonomy:
        return load_taxonomy(self.root / LABELS)

    def section(self, kind: str) -> dict[str, Any]:
        if kind not in ("device", "cloud"):
            raise ValueError(f"kind must be 'device' or 'cloud', not {kind!r}")
        try:
            return self.card[kind]
        except KeyError:
            raise ModelError(f"{self.root}: the card has no {kind} model") from None

    def file(self, relative: str, verify: bool = True) -> Path:
        """Path of a model file, checked against the hash the card recorded."""
        path = self.root / relative
        if not path.is_file():
            raise ModelError(f"{path} is missing")
        expected = self.card.get("files", {}).get(relative)
        if verify and expected and sha256_file(path) != expected:
            raise ModelError(f"{path} does not match the sha256 in {CARD}: corrupt or replaced")
        return path


def make_interpreter(path: str | Path, num_threads: int = 1):
    """The TFLite interpreter: ai-edge-litert on desktops, tflite-runtime on phones (same API)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # Flet mobile builds ship tflite-runtime instead
        from tflite_runtime.interpreter import Interpreter  # type: ignore[no-redef]
    interpreter = Interpreter(model_path=str(path), num_threads=num_threads)
    interpreter.allocate_tensors()
    return interpreter


class _Model:
    kind = ""

    def __init__(self, model_dir: ModelDir) -> None:
        section = model_dir.section(self.kind)
        self.model_dir = model_dir
        self.version: str = model_dir.card.get("version", "unknown")
        self.taxonomy = model_dir.taxonomy
        self.preprocess = PreprocessConfig.from_dict(section["preprocess"])
        self.demonstration = is_demonstration(model_dir.card)
        self.policy = replace(RiskPolicy.from_dict(section["risk"]), demonstration=self.demonstration)
        # The calibrated abstain rule (``python -m training.abstain``), when the card has one.
        self.abstain = AbstainRule.from_dict(section["abstain"]) if section.get("abstain") else None
        self.size = self.preprocess.size

    def predict(self, pixels: np.ndarray) -> np.ndarray:  # pragma: no cover - overridden
        raise NotImplementedError

    def diagnose(self, source: str | os.PathLike[str] | bytes, box: Sequence[float] | None = None) -> dict[str, Any]:
        """Image file or bytes -> calibrated probabilities, top 3 and risk tier (the shared device/cloud path)."""
        pixels = to_model_input(load_image(source), box=box, config=self.preprocess)
        probs = self.predict(pixels[None])[0]
        order = self.policy.rank(probs)[:3]
        return {"modelVersion": self.version,
                "probs": {cid: float(p) for cid, p in zip(self.taxonomy.ids, probs, strict=True)},
                "top": [{"label": self.taxonomy.ids[i], "name": self.taxonomy.classes[i].name,
                         "p": float(probs[i])} for i in order],
                **self.policy.assess(probs), **({"demonstration": True} if self.demonstration else {}),
                **self.unsure(probs)}

    def unsure(self, probs: np.ndarray) -> dict[str, Any]:
        """``{"unsure": bool, "predictionSet": [class ids]}`` under the card's abstain rule; ``{}``
        without one, and for a demonstration model (its answers mean nothing medically, so it claims no
        calibrated doubt either). Unsure means "a dermatologist will look" instead of one named class."""
        if self.abstain is None or self.demonstration:
            return {}
        unsure, members = self.abstain.judge(probs, int(self.policy.decide(probs)))
        return {"unsure": unsure, "predictionSet": [self.taxonomy.ids[i] for i in members]}


class DeviceModel(_Model):
    """The on-device TFLite model (int8 with uint8 input, or fp32)."""

    kind = "device"

    def __init__(self, model_dir: ModelDir, variant: str = "int8", num_threads: int = 1) -> None:
        super().__init__(model_dir)
        if variant not in ("int8", "fp32"):
            raise ValueError(f"variant must be 'int8' or 'fp32', not {variant!r}")
        self.variant = variant
        self.path = model_dir.file(DEVICE_INT8 if variant == "int8" else DEVICE_FP32)
        self.interpreter = make_interpreter(self.path, num_threads)
        self._lock = threading.Lock()  # an interpreter is not thread-safe (UI handlers run in threads)
        self._in = self.interpreter.get_input_details()[0]
        self._out = self.interpreter.get_output_details()[0]

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """(N, size, size, 3) pixels 0..255 -> (N, classes) calibrated probabilities; one image at a time."""
        pixels = np.asarray(pixels)
        out = []
        for image in pixels:
            if self._in["dtype"] == np.uint8:
                scale, zero = self._in["quantization"]
                scale = scale or 1.0  # export pins the input range to 0..255, so normally 1 and 0
                x = np.clip(np.round(image / scale + zero), 0, 255).astype(np.uint8)[None]
            else:
                x = image.astype(np.float32)[None]
            with self._lock:
                self.interpreter.set_tensor(self._in["index"], x)
                self.interpreter.invoke()
                y = self.interpreter.get_tensor(self._out["index"])[0].astype(np.float32)
            if self._out["dtype"] != np.float32:
                scale, zero = self._out["quantization"]
                y = (y - zero) * scale
            out.append(y / max(float(y.sum()), 1e-12))
        return np.stack(out) if out else np.zeros((0, len(self.taxonomy)), np.float32)


class CloudModel(_Model):
    """The cloud Keras model, with optional test-time augmentation (mean over flips/rotations)."""

    kind = "cloud"

    def __init__(self, model_dir: ModelDir) -> None:
        super().__init__(model_dir)
        import keras

        self.model = keras.models.load_model(model_dir.file(CLOUD_KERAS), compile=False, safe_mode=True)  # never run code from a file
        self.tta: list[str] = list(model_dir.section("cloud").get("tta", []))

    def predict(self, pixels: np.ndarray, batch_size: int = 16) -> np.ndarray:
        pixels = np.asarray(pixels, np.float32)
        variants = [pixels] + [symmetric_pixels(pixels, t) for t in self.tta]
        probs = np.mean([self._run(v, batch_size) for v in variants], axis=0)
        return probs / probs.sum(axis=1, keepdims=True)

    def _run(self, pixels: np.ndarray, batch_size: int) -> np.ndarray:
        outs = [np.asarray(self.model(pixels[i:i + batch_size], training=False))
                for i in range(0, len(pixels), batch_size)]
        return np.concatenate(outs) if outs else np.zeros((0, len(self.taxonomy)), np.float32)


def load_device_model(model_dir: str | Path, variant: str = "int8", num_threads: int = 1) -> DeviceModel:
    return DeviceModel(ModelDir.open(model_dir), variant, num_threads)


def load_cloud_model(model_dir: str | Path) -> CloudModel:
    return CloudModel(ModelDir.open(model_dir))


def _has_cloud_model(card: Path) -> bool:
    try:
        return "cloud" in json.loads(card.read_text())
    except (OSError, ValueError):
        return True  # unreadable: let loading it say what is wrong, rather than skip it silently


def newest_model_dir(models_dir: str | Path) -> Path | None:
    """The newest finished model directory with a cloud model under ``models_dir`` (or ``models_dir``
    itself if it is one). Device-only directories (``--skip-cloud``) and ``.partial`` ones are skipped:
    the worker would refuse them, and the run command must not train a starter next to a real model."""
    models_dir = Path(models_dir)
    if (models_dir / CARD).is_file():
        return models_dir
    candidates = sorted((p.parent for p in models_dir.glob(f"*/{CARD}")
                         if not p.parent.name.endswith(".partial") and not p.parent.name.startswith(".")
                         and _has_cloud_model(p)),
                        key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates else None
