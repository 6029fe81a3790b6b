"""Export a Keras classifier to TFLite: int8 (uint8 pixels in, float probabilities out) and fp32.

Route that works with TF 2.21 / Keras 3: ``model.export(dir, format="tf_saved_model")``, then
``tf.lite.TFLiteConverter.from_saved_model``. Full-integer quantisation is calibrated on real
training images (never validation images), run through the shared preprocessing; one black and
one white pixel pin the input range to exactly 0..255 so the uint8 input is the pixel value itself.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np


def _saved_model(model, directory: Path) -> Path:
    model.export(str(directory), format="tf_saved_model", verbose=False)
    return directory


def export_fp32(model, out_path: str | Path) -> Path:
    import tensorflow as tf

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        converter = tf.lite.TFLiteConverter.from_saved_model(str(_saved_model(model, Path(tmp) / "sm")))
        out_path.write_bytes(converter.convert())
    return out_path


def export_int8(model, out_path: str | Path, calibration_images: Iterable[np.ndarray]) -> Path:
    """``calibration_images``: preprocessed (size, size, 3) pixel arrays from the training split."""
    import tensorflow as tf

    images = [np.asarray(x, np.float32) for x in calibration_images]
    if not images:
        raise ValueError("int8 export needs calibration images from the training data")
    # Pin the input range to exactly 0..255 with two pixels of one real image (whole black/white
    # images would also stretch every internal activation range and cost int8 precision).
    pinned = images[0].copy()
    pinned[0, 0, :] = 0.0
    pinned[0, 1, :] = 255.0

    def representative():
        for x in [pinned, *images[1:]]:
            yield [x[None]]

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        converter = tf.lite.TFLiteConverter.from_saved_model(str(_saved_model(model, Path(tmp) / "sm")))
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8
        converter.inference_output_type = tf.float32
        out_path.write_bytes(converter.convert())
    return out_path
