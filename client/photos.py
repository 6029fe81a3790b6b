"""A picked photo, made safe to keep and send: decoded, upright, RGB, at most ``MAX_SIDE`` pixels on
its long side, re-encoded as JPEG with no metadata (a phone photo's EXIF can hold the home's GPS).

Everything the patient can pick is checked here with a message in plain words, before anything is
stored: not an image, corrupt or truncated, empty, too large, HEIC without a decoder.

The app answers from a small decode (``decode(..., draft=True)``: JPEG draft mode, 1/2 to 1/8 scale,
as ``dermaloop diagnose`` does; the device model sees 224-260 px of it) and makes the full-size copy
to keep in the background (:class:`KeptCopy`) while the patient reads the answer: on a 12 MP photo
that takes the full decode and the re-encode, about half the app's time, off the way to the answer.

Phones save HEIC. With ``pillow-heif`` installed (a dependency; manylinux, macOS and Windows wheels)
a HEIC is decoded here, upright (libheif applies the photo's rotation), and leaves as a JPEG like any
other photo, so nothing after this module, the cloud included, ever sees HEIC. Without it the
patient is told how to send a JPEG instead.
"""

from __future__ import annotations

import hashlib
import io
import threading
from concurrent.futures import Future
from dataclasses import dataclass

from PIL import Image, ImageOps

from dermaloop.preprocess import DRAFT_MIN_SIDE, MAX_BYTES, MAX_PIXELS, ImageError, load_image

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


def check_size(size: int, name: str = "photo") -> None:
    """Refuse a file by its size alone: before its bytes are sent anywhere when the picker tells it."""
    if size <= 0:
        raise PhotoError(f"{name} is empty (0 bytes). Please pick the photo again.")
    if size > MAX_BYTES:
        raise PhotoError(f"{name} is too large ({size / 1e6:.0f} MB). Please pick a photo under "
                         f"{MAX_BYTES // 1_000_000} MB.")


def decode(data: bytes, name: str = "photo", *, draft: bool = False) -> Image.Image:
    """The picked file as upright RGB, or a PhotoError saying why not. ``draft``: a large JPEG is
    decoded at the smallest power-of-two scale keeping both sides >= 1024 px (enough to answer
    from and to preview, several times faster); other formats decode at full size either way."""
    check_size(len(data), name)
    try:
        if any(magic in data[:32] for magic in HEIC_MAGIC):
            return _load_heic(data, name)
        return load_image(data, draft_min_side=DRAFT_MIN_SIDE if draft else None)
    except ImageError as exc:
        text = str(exc)
        if "corrupt" in text or "truncated" in text:
            raise PhotoError(f"{name} is damaged or incomplete. Please take the photo again.") from exc
        if "MP" in text:
            raise PhotoError(f"{name} has too many pixels ({text.split('; ')[0].removeprefix('image is ')}). "
                             "Please pick a smaller photo.") from exc
        raise PhotoError(f"{name} is not a photo this app can read. Please pick a JPEG, PNG or WebP photo.") from exc


def holds_every_pixel(data: bytes, image: Image.Image) -> bool:
    """Whether ``image`` (``decode``'s answer for ``data``) is the photo at full size: only a large
    JPEG's draft decode is smaller. Then the kept copy is made from it instead of decoding the file
    again (a HEIC, a PNG or a smaller JPEG would otherwise be decoded twice at full size)."""
    try:
        with Image.open(io.BytesIO(data)) as header:
            size = header.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False
    return sorted(size) == sorted(image.size)


def prepare(data: bytes, name: str = "photo", decoded: Image.Image | None = None) -> Photo:
    """The copy to keep and send: full size (up to ``MAX_SIDE``), upright, JPEG without metadata.
    ``decoded``: ``data`` already decoded at full size (``holds_every_pixel``); it is not changed."""
    img = decode(data, name) if decoded is None else decoded.copy()
    if max(img.size) > MAX_SIDE:
        img.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)  # no exif= argument: metadata is dropped
    jpeg = buf.getvalue()
    return Photo(img, jpeg, hashlib.sha256(jpeg).hexdigest(), img.width, img.height)


class KeptCopy:
    """``prepare`` on a thread of its own, started once the answer is on its way to the screen;
    ``result()`` waits for it (by the time the patient has read the answer and pressed "Save and
    send", it is long done) and raises its PhotoError if the full decode fails where the small one
    did not."""

    def __init__(self, data: bytes, name: str, decoded: Image.Image | None = None) -> None:
        self._data, self._name, self._decoded = data, name, decoded
        self._future: Future[Photo] = Future()
        self._lock = threading.Lock()
        self._started = False

    def start(self) -> KeptCopy:
        with self._lock:  # the answer's thread and a quick "Save and send" may both ask
            if self._started:
                return self
            self._started = True
        threading.Thread(target=self._make, name="photo-copy", daemon=True).start()
        return self

    def _make(self) -> None:
        try:
            self._future.set_result(prepare(self._data, self._name, self._decoded))
        except BaseException as exc:  # handed to whoever asks for the copy
            self._future.set_exception(exc)
        finally:
            self._data, self._decoded = b"", None

    def result(self) -> Photo:
        self.start()
        return self._future.result()


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
