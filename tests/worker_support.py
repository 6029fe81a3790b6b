"""Helpers for the cloud-worker tests and benchmark: a tiny real Keras model directory, test images,
cases seeded as an upload leaves them, and worker processes started through the real CLI."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from firebase_admin import db
from PIL import Image, ImageDraw

from dermaloop.settings import PROJECT_ROOT, Settings
from dermaloop.taxonomy import load_taxonomy


def tiny_model_dir(path: Path, version: str = "tiny-1", size: int = 32, seed: int = 0,
                   class_offsets: tuple[float, ...] = ()) -> Path:
    """A small but real Keras classifier over the HAM10000 classes in the model-directory layout the
    training pipeline writes (``dermaloop.model_dir``), with a ``head_activation`` layer for Grad-CAM.
    Fast enough for tests with many jobs on 2 shared cores."""
    import keras

    from dermaloop.risk import RiskPolicy
    from dermaloop.taxonomy import TAXONOMY_DIR

    (path / "cloud").mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(seed)
    taxonomy = load_taxonomy("ham10000")
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = keras.layers.Conv2D(8, 3, activation="relu", name="head_activation")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(len(taxonomy), activation="softmax")(x)
    keras.Model(inputs, outputs).save(path / "cloud" / "model.keras")
    (path / "labels.json").write_text((TAXONOMY_DIR / "ham10000.json").read_text())
    policy = RiskPolicy(1.0, tuple(taxonomy.malignant_mask), 0.3, 0.5, class_offsets=class_offsets)
    card = {"version": version,
            "cloud": {"preprocess": {"size": size}, "risk": policy.to_dict(), "tta": ["flip"]}}
    (path / "card.json").write_text(json.dumps(card, indent=1))
    return path


def tiny_device_model_dir(path: Path, version: str = "tiny-1") -> Path:
    """A tiny device classifier (7 classes, softmax) as a TFLite file in the model-directory layout of
    ``dermaloop.model_dir`` (card.json, labels.json, device/model_fp32.tflite)."""
    import keras
    import tensorflow as tf

    from dermaloop.preprocess import PreprocessConfig
    from dermaloop.risk import RiskPolicy

    keras.utils.set_random_seed(0)
    inputs = keras.Input((224, 224, 3))
    x = keras.layers.Rescaling(1 / 128.0, offset=-1.0)(inputs)
    x = keras.layers.Conv2D(8, 5, strides=4, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(7, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    (path / "device").mkdir(parents=True, exist_ok=True)
    (path / "device" / "model_fp32.tflite").write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    taxonomy = load_taxonomy()
    taxonomy.save(path / "labels.json")
    policy = RiskPolicy(1.0, tuple(taxonomy.malignant_mask), 0.3, 0.6)
    card = {"version": version, "device": {"preprocess": PreprocessConfig(size=224).to_dict(),
                                           "risk": policy.to_dict()}}
    (path / "card.json").write_text(json.dumps(card))
    return path


def lesion_jpeg(seed: int, size: tuple[int, int] = (320, 240)) -> bytes:
    """A skin-coloured photo with a dark blob: cheap, deterministic, decodable."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = np.array([205, 160, 140]) + rng.normal(0, 6, (h, w, 3))
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    cx, cy, r = w / 2 + rng.integers(-20, 20), h / 2 + rng.integers(-20, 20), rng.integers(25, 60)
    colour = tuple(int(v) for v in rng.integers(40, 110, 3))
    draw.ellipse((cx - r, cy - r * 0.8, cx + r, cy + r * 0.8), fill=colour)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims huge dimensions (a decompression bomb's header) with no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def seed_case(app, bucket, uid: str, case_id: str, data: bytes, sha256: str | None = None,
              content_type: str = "image/jpeg", device: dict[str, Any] | None = None, upload: bool = True) -> None:
    """Upload the photo and write case + job in one multi-path update: the state a finished upload
    leaves behind (done as admin here; the submit tests do it as the patient under the rules)."""
    path = f"cases/{uid}/{case_id}/image.jpg"
    if upload:  # False: the case points at an object that is not there
        bucket.blob(path).upload_from_string(data, content_type=content_type)
    case = {
        "caseId": case_id, "patientUid": uid, "createdAt": {".sv": "timestamp"}, "status": "queued",
        "consent": {"research": False, "at": {".sv": "timestamp"}},
        "image": {"path": path, "sha256": sha256 or hashlib.sha256(data).hexdigest(), "contentType": content_type,
                  "bytes": max(1, len(data)), "width": 1, "height": 1},
    }
    if device:
        case["device"] = device
    db.reference("/", app=app).update({
        f"cases/{uid}/{case_id}": case,
        f"jobs/{case_id}": {"uid": uid, "caseId": case_id, "createdAt": {".sv": "timestamp"}},
    })


def wait_until(predicate, what: str, timeout: float = 180.0, interval: float = 0.1):
    """Poll until ``predicate()`` is truthy. The timeout only stops a hung test; it is not a speed check."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(interval)


_DIAGNOSED = re.compile(r'"event": "diagnosed".*?"caseId": "([^"]+)"')


@dataclass
class WorkerProcess:
    """``dermaloop worker`` as a real child process against the test's localbase."""

    settings: Settings
    model_dir: Path | None  # None: no --model (published pointer, else the local models directory)
    worker_id: str
    extra: list[str] = field(default_factory=list)
    env_extra: dict[str, str] = field(default_factory=dict)
    # Tests cap TensorFlow at one thread (many processes share 2 cores); benchmarks measure the
    # worker as deployed, with TensorFlow's own thread pools.
    one_thread: bool = True
    proc: subprocess.Popen | None = None
    lines: list[str] = field(default_factory=list)
    _pump: threading.Thread | None = None
    _ready: threading.Event = field(default_factory=threading.Event)

    def start(self, timeout: float = 300.0) -> WorkerProcess:
        return self.launch().wait_ready(timeout)

    def launch(self) -> WorkerProcess:
        """Start the process without waiting (start several, then ``wait_ready`` each: they load in parallel)."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("FIREBASE_", "STORAGE_EMULATOR", "GOOGLE_APPLICATION"))}
        env.update(self.settings.emulator_env())
        env.update({"PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "3"})
        if self.one_thread:
            env.update({"OMP_NUM_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1", "TF_NUM_INTRAOP_THREADS": "1"})
        env.update(self.env_extra)
        model = ["--model", str(self.model_dir)] if self.model_dir is not None else []
        cmd = [sys.executable, "-m", "dermaloop", "worker", *model, "--worker-id", self.worker_id, "--json-logs",
               *self.extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env, cwd=PROJECT_ROOT)
        self._ready = threading.Event()

        def pump() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line)
                if "worker ready" in line:
                    self._ready.set()
            self._ready.set()

        self._pump = threading.Thread(target=pump, daemon=True)
        self._pump.start()
        return self

    def wait_ready(self, timeout: float = 300.0) -> WorkerProcess:
        assert self.proc is not None
        ready = self._ready.wait(timeout) and any("worker ready" in line for line in self.lines)
        if not ready or self.proc.poll() is not None:
            self.kill9()
            raise RuntimeError("worker did not start:\n" + "".join(self.lines))
        return self

    def diagnosed(self) -> list[str]:
        return [m.group(1) for line in list(self.lines) for m in [_DIAGNOSED.search(line)] if m]

    def kill9(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def terminate(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill9()
        if self._pump is not None:
            self._pump.join(10)  # every line the worker printed is in self.lines now
        return self.proc.returncode
