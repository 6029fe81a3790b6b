"""The analysis trunk: frozen ImageNet EfficientNet-Lite0 features of the WHOLE frame.

The localiser and the not-skin check both look at the whole photo (the classifier later looks at the
crop), so they share one backbone pass: the 7x7x1280 last feature map for the box head, and its
spatial mean for the lesion/not-lesion score. The frame is stretched to a square, not cropped, so box
fractions mean the same in the model's input and in the photo.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

TRUNK = "lite0"
FRAME_SIZE = 224  # Lite0's input size
MAP_SHAPE = (7, 7, 1280)
MID_LAYER = "block10_add"  # 14x14x112: finer spatial detail for the localiser
MID_SHAPE = (14, 14, 112)


def frame_input(img: Image.Image, size: int = FRAME_SIZE) -> np.ndarray:
    """The whole photo as the trunk's input: RGB float32 (size, size, 3) in [0, 255], stretched."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    if img.size != (size, size):
        # Two-step resize: a cheap box reduction first keeps 12 MP photos fast, then bilinear.
        img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.asarray(img, dtype=np.float32)


def build_trunk(mid: bool = False):
    """Keras model: raw pixels (224, 224, 3) in [0, 255] -> the (7, 7, 1280) feature map (and, with
    ``mid``, also the (14, 14, 112) map of ``MID_LAYER``), ImageNet weights, frozen."""
    import keras

    from dermaloop.backbones import build_backbone

    trunk = build_backbone(TRUNK, weights="imagenet", include_top=False, pooling=None)
    trunk.trainable = False
    if mid:
        trunk = keras.Model(trunk.inputs, [trunk.output, trunk.get_layer(MID_LAYER).output], name="trunk_with_mid")
        trunk.trainable = False
    return trunk


def extract_maps(trunk, frames: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Feature maps for a stack of frames, in batches (float16 to keep caches small)."""
    out = np.empty((len(frames), *MAP_SHAPE), np.float16)
    for i in range(0, len(frames), batch_size):
        out[i:i + batch_size] = np.asarray(trunk(frames[i:i + batch_size], training=False), np.float16)
    return out
