"""What lives with the app's process, the patient's "device": its local store, the consent records and
the on-device model. Shared by every browser session this process serves; nothing in it belongs to
one signed-in user (those are ``client.app.PatientApp``, one per session).
"""

from __future__ import annotations

import io
import logging
import threading
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from client.consent import ConsentStore
from client.photos import Photo
from client.store import LocalStore
from dermaloop.settings import Settings

log = logging.getLogger("client")


class Device:
    def __init__(self, settings: Settings, data_dir: Path) -> None:
        self.settings = settings
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = LocalStore(self.data_dir)
        self.consent = ConsentStore(self.data_dir)
        self._lock = threading.Lock()
        self._path = None
        self._models = None  # client.device_models.DeviceModels, once someone signed in
        self._model_dir: Path | None = None  # the device model in use (None: newest bundled)
        self.model_note: str | None = None

    def follow_models(self, session) -> None:
        """Keep the device model up to date with ``/models/device/current`` (read as ``session``'s
        user: any signed-in user may read models). The first sign-in starts it; the bundled model
        answers until a newer published version has been downloaded and verified."""
        from client.device_models import DeviceModels
        from dermaloop.analysis.device_classifier import newest_device_model_dir

        with self._lock:
            if self._models is not None:
                return
            bundled = newest_device_model_dir(self.settings.models_dir)
            if bundled is None:
                return
            self._models = DeviceModels(self.data_dir, bundled, session, self.settings)
        self._use(self._models.current())
        self._models.start(self._use)

    def _use(self, choice) -> None:
        with self._lock:
            if choice.path != self._model_dir:
                log.info("device model %s (%s)", choice.version, choice.source)
                self._model_dir, self._path = choice.path, None  # reopened on the next answer

    def stop(self) -> None:
        if self._models is not None:
            self._models.stop()

    def device_path(self):
        """The on-device path, opened once (TFLite only). Without the analysis model the photo checks
        still run on the centre square; without a classifier the answer says so."""
        with self._lock:
            if self._path is None:
                from dermaloop.analysis.on_device import AnalysisModelMissing, open_device_path

                models = self.settings.models_dir
                try:
                    self._path = open_device_path(models, self._model_dir)
                except AnalysisModelMissing as exc:
                    log.warning("%s; answering without the lesion finder", exc)
                    self.model_note = "The lesion finder is not on this device yet: the centre of the photo was used."
                    self._path = open_device_path(models, self._model_dir, localise=False)
            return self._path

    def answer(self, photo: Photo | Image.Image) -> dict[str, Any]:
        """The instant answer for a photo (``DeviceResult.to_json()`` plus the case's device record):
        a prepared Photo, or the upright RGB image of a small decode (``client.photos.decode``)."""
        result = self.device_path().run(photo.image if isinstance(photo, Photo) else photo)
        out = result.to_json()
        out["record"] = result.case_record() if result.model_version else None
        return out


PREVIEW_SIDE = 720  # twice the 360 px it is shown at: sharp on a phone's 2x screen


def preview_png(image: Image.Image, box: list[float] | None, max_side: int = PREVIEW_SIDE) -> bytes:
    """A small picture of the photo with the proposed lesion box drawn on it (JPEG: a tenth of a
    PNG's bytes, so the answer screen appears sooner)."""
    preview = image.copy()
    preview.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    if box:
        x0, y0, x1, y1 = box
        w, h = preview.size
        width = max(2, round(min(w, h) / 150))
        ImageDraw.Draw(preview).rectangle((x0 * w, y0 * h, x1 * w, y1 * h), outline=(0, 200, 255), width=width)
    buf = io.BytesIO()
    preview.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def thumbnail_png(path: Path, side: int = 96) -> bytes | None:
    try:
        with Image.open(path) as img:
            img.draft("RGB", (side, side))  # a stored 12 MP JPEG decodes at 1/8 scale, not in full
            img = img.convert("RGB")
            img.thumbnail((side, side))
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            return buf.getvalue()
    except OSError:
        return None
