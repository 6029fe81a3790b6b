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
