"""A picked photo, made safe to keep and send: decoded, upright, RGB, at most ``MAX_SIDE`` pixels on
its long side, re-encoded as JPEG with no metadata (a phone photo's EXIF can hold the home's GPS).

Everything the patient can pick is checked here with a message in plain words, before anything is
stored: not an image, corrupt or truncated, empty, too large, HEIC without a decoder.

Phones save HEIC. With ``pillow-heif`` installed (a dependency; manylinux, macOS and Windows wheels)
a HEIC is decoded here, upright (libheif applies the photo's rotation), and leaves as a JPEG like any
other photo, so nothing after this module, the cloud included, ever sees HEIC. Without it the
patient is told how to send a JPEG instead.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

from PIL import Image, ImageOps

from dermaloop.preprocess import MAX_BYTES, MAX_PIXELS, ImageError, load_image

MAX_SIDE = 4096  # enough for any close-up; a 12 MP photo is 4032 px on its long side
JPEG_QUALITY = 92
HEIC_MAGIC = (b"ftypheic", b"ftypheix", b"ftyphevc", b"ftypmif1", b"ftypmsf1", b"ftypheim", b"ftypheis")


class PhotoError(ValueError):
    """The picked file cannot be used as a photo; the message is for the patient."""


@dataclass(frozen=True)
class Photo:
    image: Image.Image  # upright RGB, what the device model sees
    jpeg: bytes  # what is stored and uploaded
    sha256: str
    width: int
    height: int
    content_type: str = "image/jpeg"


def prepare(data: bytes, name: str = "photo") -> Photo:
    if not data:
        raise PhotoError(f"{name} is empty (0 bytes). Please pick the photo again.")
    if len(data) > MAX_BYTES:
        raise PhotoError(f"{name} is too large ({len(data) / 1e6:.0f} MB). Please pick a photo under "
                         f"{MAX_BYTES // 1_000_000} MB.")
    try:
        if any(magic in data[:32] for magic in HEIC_MAGIC):
            img = _load_heic(data, name)
        else:
            img = load_image(data, draft_min_side=None)
    except ImageError as exc:
        text = str(exc)
        if "corrupt" in text or "truncated" in text:
            raise PhotoError(f"{name} is damaged or incomplete. Please take the photo again.") from exc
        if "MP" in text:
            raise PhotoError(f"{name} has too many pixels ({text.split('; ')[0].removeprefix('image is ')}). "
                             "Please pick a smaller photo.") from exc
        raise PhotoError(f"{name} is not a photo this app can read. Please pick a JPEG, PNG or WebP photo.") from exc
    if max(img.size) > MAX_SIDE:
        img.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)  # no exif= argument: metadata is dropped
    jpeg = buf.getvalue()
    return Photo(img, jpeg, hashlib.sha256(jpeg).hexdigest(), img.width, img.height)


def heic_supported() -> bool:
    try:
        import pillow_heif  # noqa: F401
    except ImportError:
        return False
    return True


def _load_heic(data: bytes, name: str) -> Image.Image:
    """Decode a HEIC to upright RGB, with ``load_image``'s checks (pixel limit, damaged data)."""
    try:
        import pillow_heif
    except ImportError:
        raise PhotoError(f"{name} is a HEIC photo, which this app cannot read. Set the camera to "
                         "'Most compatible' (JPEG), or share the photo as JPEG, and pick it again.") from None
    pillow_heif.register_heif_opener()  # Pillow's format registry; registering again changes nothing
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > MAX_PIXELS:
                raise ImageError(f"image is {width}x{height} = {width * height / 1e6:.0f} MP; "
                                 f"the limit is {MAX_PIXELS / 1e6:.0f} MP")
            img.load()
            return ImageOps.exif_transpose(img).convert("RGB")
    except (OSError, SyntaxError, ValueError, RuntimeError, Image.DecompressionBombError) as exc:
        if isinstance(exc, ImageError):
            raise
        raise ImageError(f"image data is corrupt or truncated ({exc})") from exc
