"""Helpers for the model-registry tests (registry, ``dermaloop models``, first run, device updates):
a model directory with small fake files in the training pipeline's layout, and unique version names
(the tests share one localbase, so two modules never publish the same name)."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def unique_version(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def fake_model_dir(path: Path, version: str, seed: int = 0) -> Path:
    """A model directory in the training pipeline's layout with small fake model files."""
    files = {
        "labels.json": json.dumps({"name": "fake", "classes": ["a", "b"]}).encode(),
        "split.json": json.dumps({"train": ["x1"], "val": ["x2"]}).encode(),
        "device/model_int8.tflite": os.urandom(300) + bytes([seed]),
        "device/model_fp32.tflite": os.urandom(500),
        "device/model.keras": os.urandom(200),
        "cloud/model.keras": os.urandom(700),
        "reports/device/report.md": b"# device report\n",
        "reports/device_fp32/report.md": b"# fp32 report\n",
        "reports/cloud/report.md": b"# cloud report\n",
    }
    for rel, data in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)
    (path / ".DS_Store").write_bytes(b"junk")  # hidden: never published
    card = {
        "format": 1, "version": version, "labels": ["a", "b"],
        "device": {"preprocess": {"size": 32}, "metrics": {"balanced_accuracy": 0.5, "per_class_recall": {"a": 0.4}}},
        "cloud": {"preprocess": {"size": 32}, "metrics": {"balanced_accuracy": 0.7}},
        "options": {"weights": {"file.name": 1, "ok": 2}},  # a key RTDB cannot store
        "history": list(range(5000)),  # a huge field: left out of the record, kept in card.json
        "files": {rel: sha256_hex(data) for rel, data in files.items()},
        "file_bytes": {rel: len(data) for rel, data in files.items()},
    }
    (path / "card.json").write_text(json.dumps(card, indent=1))
    return path
