"""The Keras networks of the device analysis model: the frozen Lite0 trunk and the localiser head.

Training-side only: the device runs the exported TFLite file (``dermaloop.analysis.device_path``),
so these builders stay out of the shared library and a phone build never needs Keras.
"""

from __future__ import annotations

import numpy as np

from dermaloop.analysis.features import MAP_SHAPE, MID_LAYER, TRUNK


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


def build_head(dropout: float = 0.3, mid: bool = True):
    """Keras head: trunk maps -> [x0, y0, x1, y1, confidence] in [0, 1].

    Inputs: the 7x7x1280 last map and (``mid=True``) the 14x14x112 map of ``MID_LAYER``, whose finer
    grid places box edges better (validation mean IoU 0.754 -> 0.819; docs/MODEL_REPORT.md)."""
    import keras
    from keras import layers

    top = keras.Input((7, 7, 1280), name="trunk_map")
    x = layers.Conv2D(64, 1, activation="relu", name="loc_reduce")(top)
    x = layers.Dropout(dropout, name="loc_drop0")(x)
    if mid:
        fine = keras.Input((14, 14, 112), name="trunk_mid")
        x = layers.UpSampling2D(2, name="loc_up")(x)
        y = layers.Conv2D(32, 1, activation="relu", name="loc_mid_reduce")(fine)
        x = layers.Concatenate(name="loc_concat")([x, y])
        x = layers.Conv2D(32, 3, padding="same", activation="relu", name="loc_conv")(x)
        x = layers.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="loc_conv2")(x)
        inputs = [top, fine]
    else:
        x = layers.Conv2D(32, 3, padding="same", activation="relu", name="loc_conv")(x)
        inputs = [top]
    x = layers.Flatten(name="loc_flat")(x)
    x = layers.Dense(128, activation="relu", name="loc_dense")(x)
    x = layers.Dropout(dropout, name="loc_drop1")(x)
    cxcywh = layers.Dense(4, activation="sigmoid", name="loc_box")(x)
    conf = layers.Dense(1, activation="sigmoid", name="loc_conf")(x)
    centre, size = cxcywh[:, :2], cxcywh[:, 2:]
    corners = keras.ops.clip(keras.ops.concatenate([centre - size / 2, centre + size / 2], axis=-1), 0.0, 1.0)
    return keras.Model(inputs, keras.ops.concatenate([corners, conf], axis=-1), name="localiser_head")


def save_head_weights(head, path) -> None:
    """Head weights as a small float16 .npz (kept in the package; about 0.6 MB)."""
    arrays = {w.path.replace("/", "__"): np.asarray(w.numpy(), np.float16) for w in head.weights}
    np.savez_compressed(path, **arrays)


def load_head_weights(head, path) -> None:
    with np.load(path) as data:
        stored = {k.replace("__", "/"): data[k] for k in data.files}
    missing = [w.path for w in head.weights if w.path not in stored]
    if missing:
        raise ValueError(f"{path}: weights do not match the head (missing {missing[:3]})")
    for w in head.weights:
        w.assign(stored[w.path].astype(np.float32))
