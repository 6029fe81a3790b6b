"""Grad-CAM heatmaps: which part of the image drove the cloud model's answer, for the reviewer.

Selvaraju et al.'s Grad-CAM: the gradient of a class score with respect to the last convolutional
feature map, averaged per channel, weights the channels; the ReLU of the weighted sum is the map.
Works on any Keras model whose target layer is reachable either directly or inside one nested
sub-model (the usual "backbone inside a classifier" layout), as long as the layers around that
sub-model form a chain.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

DEFAULT_LAYER = "head_activation"  # dermaloop.backbones.FEATURE_LAYER


@dataclass
class GradCam:
    heatmap: np.ndarray  # (h, w) float32 in [0, 1], feature-map resolution
    class_index: int
    probabilities: np.ndarray  # model output for the image (softmax applied if the model gives logits)


def _find(model, layer_name: str):
    """(path of nested models, layer) for ``layer_name`` searched depth-first."""
    try:
        return [], model.get_layer(layer_name)
    except ValueError:
        pass
    for layer in model.layers:
        if hasattr(layer, "layers") and hasattr(layer, "get_layer"):
            found = _find(layer, layer_name)
            if found is not None:
                return [layer, *found[0]], found[1]
    return None


def split_model(model, layer_name: str = DEFAULT_LAYER):
    """A callable x -> (feature_map, output) differentiable end to end (batched; the cloud worker
    wraps it in its own tf.function for batched Grad-CAM)."""
    import keras

    found = _find(model, layer_name)
    if found is None:
        raise ValueError(f"layer {layer_name!r} not found in model {model.name!r}")
    path, layer = found
    if not path:
        grad_model = keras.Model(model.inputs, [layer.output, model.output])
        return lambda x: grad_model(x, training=False)
    if len(path) > 1:
        raise ValueError(f"layer {layer_name!r} is nested more than one level deep; unsupported")
    inner = path[0]
    inner_split = keras.Model(inner.inputs, [layer.output, inner.output])
    chain = [lyr for lyr in model.layers if not isinstance(lyr, keras.layers.InputLayer)]
    for lyr in chain:
        nodes = getattr(lyr, "_inbound_nodes", [])
        if nodes and len(getattr(nodes[0], "input_tensors", [None])) > 1:
            raise ValueError(f"model {model.name!r} is not a chain around {inner.name!r}; unsupported")

    def run(x):
        fmap = None
        for lyr in chain:
            if lyr is inner:
                fmap, x = inner_split(x, training=False)
            else:
                x = lyr(x, training=False)
        return fmap, x

    return run


_split_model = split_model  # earlier name, used by cloud_worker.model


def _is_probabilities(out: np.ndarray) -> bool:
    return bool(np.all(out >= 0) and abs(float(out.sum()) - 1.0) < 1e-3)


def grad_cam(model, image: np.ndarray, class_index: int | None = None,
             layer_name: str = DEFAULT_LAYER) -> GradCam:
    """Grad-CAM of one model input (H, W, 3) for ``class_index`` (default: the predicted class)."""
    import tensorflow as tf

    x = np.asarray(image, np.float32)
    if x.ndim != 3 or x.shape[-1] != 3:
        raise ValueError(f"expected one (H, W, 3) image, got shape {x.shape}")
    run = split_model(model, layer_name)
    batch = tf.convert_to_tensor(x[None])
    with tf.GradientTape() as tape:
        fmap, out = run(batch)
        tape.watch(fmap)
        out_np = out.numpy()[0]
        probs = out_np if _is_probabilities(out_np) else tf.nn.softmax(out[0]).numpy()
        idx = int(np.argmax(probs)) if class_index is None else int(class_index)
        if not 0 <= idx < out.shape[-1]:
            raise ValueError(f"class_index {idx} out of range for {out.shape[-1]} classes")
        # Gradient of the class logit where available (probabilities saturate), else of the output.
        target = tf.math.log(out[0, idx] + 1e-12) if _is_probabilities(out_np) else out[0, idx]
    grads = tape.gradient(target, fmap)
    if grads is None:
        raise ValueError(f"no gradient from the output to layer {layer_name!r}")
    weights = tf.reduce_mean(grads[0], axis=(0, 1))
    cam = tf.nn.relu(tf.reduce_sum(fmap[0] * weights, axis=-1)).numpy().astype(np.float32)
    top = float(cam.max())
    cam = cam / top if top > 0 else np.zeros_like(cam)
    return GradCam(cam, idx, probs.astype(np.float32))


def upsample(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Heatmap resized (bilinear) to ``size`` = (width, height), values kept in [0, 1]."""
    img = Image.fromarray(np.asarray(heatmap, np.float32), "F").resize(size, Image.Resampling.BILINEAR)
    return np.clip(np.asarray(img, np.float32), 0.0, 1.0)


def place_in_frame(heatmap: np.ndarray, frame_size: tuple[int, int],
                   region: Sequence[float]) -> np.ndarray:
    """A heatmap computed on a crop, put back into the whole photo (zero outside the crop).
    ``region`` = (left, top, right, bottom) in pixels of the photo, as ``preprocess.crop_box`` gives."""
    w, h = frame_size
    out = np.zeros((h, w), np.float32)
    left, top, right, bottom = (int(round(v)) for v in region)
    left, top = max(left, 0), max(top, 0)
    right, bottom = min(right, w), min(bottom, h)
    if right > left and bottom > top:
        out[top:bottom, left:right] = upsample(heatmap, (right - left, bottom - top))
    return out


def overlay(image: Image.Image, heatmap: np.ndarray, alpha: float = 0.45, colormap: str = "jet") -> Image.Image:
    """The photo with the heatmap blended on top (heat shown where the map is high)."""
    from matplotlib import colormaps

    base = image.convert("RGB")
    heat = upsample(heatmap, base.size) if heatmap.shape != (base.height, base.width) else heatmap
    colours = colormaps[colormap](heat)[..., :3].astype(np.float32) * 255.0
    a = (alpha * np.clip(heat, 0, 1) ** 0.5)[..., None]  # faint where the model did not look
    out = np.asarray(base, np.float32) * (1 - a) + colours * a
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8), "RGB")


def overlay_png(image: Image.Image, heatmap: np.ndarray, alpha: float = 0.45) -> bytes:
    """PNG bytes of ``overlay`` (what the worker uploads as ``heatmap.png``)."""
    buf = io.BytesIO()
    overlay(image, heatmap, alpha).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def mass_in_box(heatmap: np.ndarray, box: Sequence[float]) -> float:
    """Share of the heatmap's mass inside ``box`` (fractions); a uniform map scores the box's area."""
    h, w = heatmap.shape
    x0, y0, x1, y1 = box
    total = float(heatmap.sum())
    if total <= 0:
        return 0.0
    ys = (np.arange(h) + 0.5) / h
    xs = (np.arange(w) + 0.5) / w
    inside = ((ys >= y0) & (ys <= y1))[:, None] & ((xs >= x0) & (xs <= x1))[None, :]
    return float(heatmap[inside].sum() / total)
