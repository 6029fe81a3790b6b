"""How a picked photo gets from the browser into the app's process (the patient's "device").

Flet's web file picker can hand a file over in two ways. With ``with_data=True`` the browser reads it
and sends it inside one message on the page's websocket: measured here, 0.55-0.7 s for a 2.6 MB
12 MP photo on 2 cores before Python saw a byte, with the page frozen on the new-case screen
meanwhile. The other way is the picker's upload: the browser PUTs the raw file to Flet's upload
endpoint at a URL signed for that one file and valid for minutes, while the page already shows
"Checking the photo". That is the default (``upload``); ``DERMALOOP_CLIENT_PHOTO_TRANSFER=websocket``
selects the first way, for a proxy in front of the app that refuses PUT and as the benchmark's
baseline (bench/bench_client.py).

Uploaded files land in a private folder of the device's data directory and are read once and
deleted at once: a picked photo can carry the home's GPS position in its EXIF, and only the cleaned
copy that ``client.photos.prepare`` makes is kept. Leftovers of a process that died mid-upload are
deleted when the app starts.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import uuid
from collections.abc import Mapping
from pathlib import Path

from dermaloop.preprocess import MAX_BYTES

log = logging.getLogger("client")

UPLOAD = "upload"
WEBSOCKET = "websocket"
TRANSFERS = (UPLOAD, WEBSOCKET)
TRANSFER_ENV = "DERMALOOP_CLIENT_PHOTO_TRANSFER"
FOLDER = "incoming"
SUFFIX = ".part"
URL_SECONDS = 600  # a 60 MB photo over a slow phone link still finishes within it


def transfer_mode(environ: Mapping[str, str] | None = None) -> str:
    """The configured transfer; an unknown value is an error at start, not a silent fallback."""
    value = (os.environ if environ is None else environ).get(TRANSFER_ENV, "").strip().lower() or UPLOAD
    if value not in TRANSFERS:
        raise ValueError(f"{TRANSFER_ENV} must be one of {', '.join(TRANSFERS)}, not {value!r}")
    return value


def prepare_folder(data_dir: Path, environ: dict[str, str] | None = None) -> Path:
    """Make the private folder uploads land in, empty it of leftovers, and point Flet's upload
    endpoint at it (Flet reads these variables when it builds its web server, so call this before
    serving). Without a signing key of the operator's own, a random one per process signs the URLs."""
    env = os.environ if environ is None else environ
    folder = Path(data_dir) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    for leftover in folder.iterdir():
        if leftover.is_file():
            leftover.unlink(missing_ok=True)
            log.info("deleted an unfinished photo transfer left by an earlier run: %s", leftover.name)
    env["FLET_UPLOAD_DIR"] = str(folder.resolve())
    env["FLET_MAX_UPLOAD_SIZE"] = str(MAX_BYTES)  # the endpoint refuses more (client.photos says why)
    env.setdefault("FLET_SECRET_KEY", secrets.token_urlsafe(32))
    return folder


class Incoming:
    """One browser session's photos on their way in, oldest first. Only the patient's latest pick is
    answered: a pick replaced by another before its upload finished is deleted when it arrives."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._lock = threading.Lock()
        self._waiting: list[tuple[str, str]] = []  # (the picked file's name, the file it lands in)

    def expect(self, name: str) -> str:
        """A new pick of a file called ``name``: the name of the file its upload is to land in."""
        target = uuid.uuid4().hex + SUFFIX
        with self._lock:
            self._waiting.append((name, target))
        return target

    def arrived(self, name: str) -> bytes | None:
        """The upload of ``name`` finished: its bytes if it is the latest pick, else None (and, either
        way, its file is gone from the folder)."""
        target, latest = self._pop(name)
        if target is None:
            return None
        path = self.folder / target
        try:
            return path.read_bytes() if latest else None
        finally:
            path.unlink(missing_ok=True)

    def failed(self, name: str) -> bool:
        """The upload of ``name`` failed: forget it and delete what arrived. True when it was the
        latest pick (the patient is waiting for it)."""
        target, latest = self._pop(name)
        if target is not None:
            (self.folder / target).unlink(missing_ok=True)
        return latest

    def clear(self) -> None:
        """The session ends: nothing more will be answered, so nothing half-sent is kept."""
        with self._lock:
            waiting, self._waiting = self._waiting, []
        for _, target in waiting:
            (self.folder / target).unlink(missing_ok=True)

    def _pop(self, name: str) -> tuple[str | None, bool]:
        with self._lock:
            for i, (picked, target) in enumerate(self._waiting):
                if picked == name:
                    del self._waiting[i]
                    return target, i == len(self._waiting)  # nothing newer left behind it
        return None, False
