"""The one image preprocessing path shared by training, the device app and the cloud worker.

Every path goes image bytes -> ``load_image`` (decode, EXIF orientation, safety limits) ->
``to_model_input`` (crop, resize, optional colour constancy) -> float32 pixels in [0, 255]. The
backbone's own normalisation is the model's first layer, so nothing here depends on the model
family, and the TFLite uint8 input is exactly ``to_model_input(...).astype(np.uint8)``: pixel values
are rounded to integers before they leave this module, so float and quantised paths see the same
numbers.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "ImageError",
    "PreprocessConfig",
    "load_image",
    "to_model_input",
    "crop_box",
    "shades_of_grey",
    "SYMMETRIES",
    "symmetric_image",
    "symmetric_pixels",
    "MAX_PIXELS",
    "MAX_BYTES",
]

# A 108-megapixel phone photo is the largest legitimate input we expect; anything bigger is refused
# before its pixels are decoded (decompression bombs decode to gigabytes from a few kilobytes).
MAX_PIXELS = 120_000_000
MAX_BYTES = 60 * 1024 * 1024
SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF"})
# JPEGs are decoded at the smallest power-of-two reduction that keeps both sides >= this (draft mode):
# a 12 MP photo then decodes at 1/2 or 1/4 scale, several times faster, with plenty left for a 260 px model.
DRAFT_MIN_SIDE = 1024


class ImageError(ValueError):
    """The input is not an image we can safely use (unreadable, truncated, too large, unsupported)."""


@dataclass(frozen=True)
class PreprocessConfig:
    """What a model expects; stored in its model card so every runtime preprocesses identically."""

    size: int = 224
    crop_fraction: float = 1.0  # side of the centre square crop as a fraction of the shorter side
    box_margin: float = 0.15  # context kept around a lesion box, as a fraction of the box side
    colour_constancy: bool = False  # shades-of-grey (p=6) white balance
    resample: str = "bicubic"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessConfig:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


def _open(source: str | os.PathLike[str] | bytes | bytearray | memoryview) -> Image.Image:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise ImageError("empty image data")
        if len(data) > MAX_BYTES:
            raise ImageError(f"image data is {len(data)} bytes; the limit is {MAX_BYTES}")
        stream: Any = io.BytesIO(data)
        label = "image data"
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            n = path.stat().st_size
        except OSError as exc:
            raise ImageError(f"cannot read {path}: {exc.strerror or exc}") from exc
        if n > MAX_BYTES:
            raise ImageError(f"{path} is {n} bytes; the limit is {MAX_BYTES}")
        stream = path
        label = str(path)
    else:
        raise TypeError(f"expected a path or bytes, not {type(source).__name__}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(stream)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{label}: too many pixels (possible decompression bomb)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{label}: not a readable image ({exc})") from exc
    return img


def load_image(source: str | os.PathLike[str] | bytes | bytearray | memoryview,
               draft_min_side: int | None = DRAFT_MIN_SIDE, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode an image file or bytes to an upright RGB ``PIL.Image``.

    Refuses unsupported formats, oversized files and decompression bombs (checked from the header,
    before decoding) with ``ImageError``. Large JPEGs decode in Pillow's draft mode down to the
    smallest scale whose sides stay >= ``draft_min_side`` (``None`` decodes at full size).
    """
    img = _open(source)
    try:
        if img.format not in SUPPORTED_FORMATS:
            raise ImageError(f"unsupported image format {img.format!r}; use JPEG, PNG or WebP")
        width, height = img.size
        if width < 1 or height < 1:
            raise ImageError(f"image has no pixels ({width}x{height})")
        if width * height > max_pixels:
            raise ImageError(f"image is {width}x{height} = {width * height / 1e6:.0f} MP; "
                             f"the limit is {max_pixels / 1e6:.0f} MP")
        if img.format in ("JPEG", "MPO") and draft_min_side and min(width, height) > 2 * draft_min_side:
            img.draft("RGB", (draft_min_side, draft_min_side))
        try:
            img.load()
            upright = ImageOps.exif_transpose(img)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise ImageError(f"image data is corrupt or truncated ({exc})") from exc
        return _to_rgb(upright)
    finally:
        img.close()


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img.copy()
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit/float greyscale: Pillow's convert("RGB") clips instead of scaling.
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if a.max() > 255 else 255.0
        return Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent areas become white, as a photo viewer shows them, not black.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _check_box(box: Sequence[float]) -> tuple[float, float, float, float]:
    if len(box) != 4:
        raise ValueError(f"box must be (x0, y0, x1, y1), got {box!r}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(np.isfinite(v) for v in (x0, y0, x1, y1)):
        raise ValueError(f"box has non-finite values: {box!r}")
    if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
        raise ValueError(f"box must be fractions of width/height with 0 <= x0 < x1 <= 1, got {box!r}")
    return x0, y0, x1, y1


def crop_box(width: int, height: int, box: Sequence[float] | None = None,
             config: PreprocessConfig | None = None) -> tuple[float, float, float, float]:
    """The square pixel region (left, top, right, bottom) that becomes the model input.

    Without a box: the centre square of ``crop_fraction`` of the shorter side. With a lesion box
    (fractions of width/height): a square around the box with ``box_margin`` context, shifted to stay
    inside the image (and shrunk only if the image is too small for it).
    """
    cfg = config or PreprocessConfig()
    if box is None:
        side = min(width, height) * cfg.crop_fraction
        cx, cy = width / 2.0, height / 2.0
    else:
        x0, y0, x1, y1 = _check_box(box)
        bw, bh = (x1 - x0) * width, (y1 - y0) * height
        side = max(bw, bh) * (1.0 + 2.0 * cfg.box_margin)
        side = min(max(side, 16.0), float(min(width, height)))
        cx, cy = (x0 + x1) / 2.0 * width, (y0 + y1) / 2.0 * height
    left = min(max(cx - side / 2.0, 0.0), width - side)
    top = min(max(cy - side / 2.0, 0.0), height - side)
    return left, top, left + side, top + side


# The 8 symmetries of the square. A dermoscopic or close-up skin photo has no "up", so each is a
# label-preserving view: training augments with them and the cloud model averages over them at test
# time. One table serves both the PIL images of training and the pixel arrays of the runtimes, so a
# view means the same thing on every path (tested).
SYMMETRIES = ("orig", "rot90", "rot180", "rot270", "flip", "vflip", "transpose", "transverse")
_PIL_SYMMETRY = {"rot90": Image.Transpose.ROTATE_90, "rot180": Image.Transpose.ROTATE_180,
                 "rot270": Image.Transpose.ROTATE_270, "flip": Image.Transpose.FLIP_LEFT_RIGHT,
                 "vflip": Image.Transpose.FLIP_TOP_BOTTOM, "transpose": Image.Transpose.TRANSPOSE,
                 "transverse": Image.Transpose.TRANSVERSE}
_ARRAY_SYMMETRY = {"rot90": lambda a: np.rot90(a, 1, axes=(1, 2)), "rot180": lambda a: a[:, ::-1, ::-1],
                   "rot270": lambda a: np.rot90(a, 3, axes=(1, 2)), "flip": lambda a: a[:, :, ::-1],
                   "vflip": lambda a: a[:, ::-1], "transpose": lambda a: np.swapaxes(a, 1, 2),
                   "transverse": lambda a: np.swapaxes(a, 1, 2)[:, ::-1, ::-1]}  # on (N, H, W, C)


def _unknown_symmetry(name: str) -> ValueError:
    return ValueError(f"unknown symmetry {name!r}; choose from {', '.join(SYMMETRIES)}")


def symmetric_image(img: Image.Image, name: str) -> Image.Image:
    """``img`` under one of ``SYMMETRIES`` (``rot90`` is counter-clockwise, as in PIL)."""
    if name == "orig":
        return img
    if name not in _PIL_SYMMETRY:
        raise _unknown_symmetry(name)
    return img.transpose(_PIL_SYMMETRY[name])


def symmetric_pixels(pixels: np.ndarray, name: str) -> np.ndarray:
    """The same symmetry on a batch of model inputs shaped (N, H, W, C)."""
    if name == "orig":
        return pixels
    if name not in _ARRAY_SYMMETRY:
        raise _unknown_symmetry(name)
    return _ARRAY_SYMMETRY[name](pixels)


def shades_of_grey(pixels: np.ndarray, power: float = 6.0) -> np.ndarray:
    """Shades-of-grey colour constancy (Finlayson & Trezzi 2004), common in ISIC challenge pipelines.

    Estimates the illuminant as the Minkowski p-norm of each channel and rescales the channels so the
    estimate becomes neutral grey; removes camera/lighting colour casts between dermatoscopes.
    """
    x = pixels.astype(np.float64)
    norm = np.power(np.mean(np.power(x, power), axis=(0, 1)), 1.0 / power)
    norm = np.maximum(norm, 1e-6)
    illuminant = norm / np.sqrt(np.sum(norm**2))
    return np.clip(x / (illuminant * np.sqrt(3.0)), 0.0, 255.0)


_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
             "lanczos": Image.Resampling.LANCZOS}


def to_model_input(img: Image.Image, size: int | None = None, box: Sequence[float] | None = None,
                   config: PreprocessConfig | None = None) -> np.ndarray:
    """Crop and resize an RGB image to a float32 (size, size, 3) array of integer pixel values in [0, 255].

    ``box`` is an optional lesion box (x0, y0, x1, y1) as fractions of width and height. ``size``
    overrides ``config.size``.
    """
    if not isinstance(img, Image.Image):
        raise TypeError(f"expected a PIL image, not {type(img).__name__}")
    cfg = config or PreprocessConfig()
    side = int(size if size is not None else cfg.size)
    if side < 1:
        raise ValueError(f"size must be positive, got {side}")
    if img.mode != "RGB":
        img = _to_rgb(img)
    region = crop_box(img.width, img.height, box, cfg)
    resized = img.resize((side, side), _RESAMPLE[cfg.resample], box=region)
    pixels = np.asarray(resized, dtype=np.float32)
    if cfg.colour_constancy:
        pixels = np.round(shades_of_grey(pixels)).astype(np.float32)
    return pixels


def preprocess_file(source: str | os.PathLike[str] | bytes, config: PreprocessConfig,
                    box: Sequence[float] | None = None) -> np.ndarray:
    """``load_image`` then ``to_model_input``: the whole path from a file to the model's input."""
    return to_model_input(load_image(source), box=box, config=config)
