"""The case's pictures as the portal shows them: photo, Grad-CAM overlay, lesion box, all as PNGs.

Photos and heatmaps come from Storage with the dermatologist's own token. A missing or unreadable
object is reported as a sentence (``ImageMissing``), never as a broken page: the rest of the case
stays usable (a review can be given from the photo alone, or "ungradable" without one).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

from PIL import Image, ImageDraw, UnidentifiedImageError

from dermaloop.errors import NotFound, PermissionDenied, ServiceError, Unauthenticated
from dermaloop.storage import UserStorage

MAX_SIDE = 720


class ImageMissing(Exception):
    """The object is not in Storage, not readable, or not an image; the message says which."""


def fetch(storage: UserStorage, path: str | None, what: str) -> bytes:
    """Download ``path``; raises :class:`ImageMissing` (or Unauthenticated: the session ended)."""
    if not path:
        raise ImageMissing(f"No {what} was recorded for this case.")
    try:
        return storage.download(path)
    except NotFound:
        raise ImageMissing(f"The {what} is missing from Storage ({path}).") from None
    except Unauthenticated:
        raise
    except PermissionDenied:
        raise ImageMissing(f"You may not read the {what} ({path}).") from None
    except ServiceError as exc:
        raise ImageMissing(f"The {what} could not be loaded: {exc}") from None


def render(data: bytes, box: Sequence[float] | None = None, max_side: int = MAX_SIDE) -> bytes:
    """A PNG of ``data`` no larger than ``max_side``, with the lesion box (fractions) drawn if given."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            picture = img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ImageMissing(f"The stored file is not a readable image ({exc}).") from None
    picture.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    if box and len(box) == 4 and all(isinstance(v, int | float) for v in box):
        x0, y0, x1, y1 = box
        w, h = picture.size
        ImageDraw.Draw(picture).rectangle((x0 * w, y0 * h, x1 * w, y1 * h), outline=(0, 200, 255),
                                          width=max(2, round(min(w, h) / 150)))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()
