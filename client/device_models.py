"""Model updates on the phone: download the published device model as the signed-in patient.

The app ships with a device model (its local model directory) and diagnoses offline with it. When
retraining publishes a new one, ``/models/device/current`` names it (``dermaloop.registry``); any
signed-in user may read the pointer, the version record and the files, so the phone fetches them
with the patient's own rights (``UserDatabase`` and ``UserStorage``), not as admin.

A version is used only when it is complete and every file matches the sha256 the version record
lists (``dermaloop.registry.verify_files``, the check the worker's downloads use too): files go
to a fresh temporary folder that is renamed to ``<app data>/models/device/{version}`` only after
that check, so a cut download or a file changed after publication is never loaded. The version in
use and the one before it are remembered in ``state.json`` (the previous one is kept on disk for a
quick way back); older ones are deleted. The pointer is followed wherever it goes, so a rollback
published by moving it back is followed too.

Offline, with no pointer, or when a download fails, the phone keeps what it has: the newest
verified download, else the local model directory it shipped with.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dermaloop.auth import UserSession
from dermaloop.database import UserDatabase
from dermaloop.errors import ServiceError, Unavailable
from dermaloop.http import RetryPolicy
from dermaloop.model_dir import CARD
from dermaloop.registry import (
    SAFE_VERSION,
    IntegrityError,
    ModelFile,
    RegistryError,
    record_files,
    verify_files,
)
from dermaloop.settings import Settings
from dermaloop.storage import UserStorage

__all__ = ["BUNDLED", "DOWNLOADED", "KIND", "DeviceModelChoice", "DeviceModels"]

log = logging.getLogger(__name__)

KIND = "device"
BUNDLED = "bundled"  # the local model directory the app shipped with
DOWNLOADED = "downloaded"  # a published version, verified, under <app data>/models/device/
STATE_FILE = "state.json"


# The registry's locations (docs/ARCHITECTURE.md "RTDB data model" and "Storage paths"); the registry
# itself builds them inline for its admin transport.
def pointer_path() -> str:
    return f"models/{KIND}/current"


def version_path(version: str) -> str:
    return f"models/{KIND}/versions/{version}"


def object_path(version: str, relpath: str) -> str:
    return f"models/{KIND}/{version}/{relpath}"


def _safe_version(value: Any) -> str | None:
    ok = isinstance(value, str) and SAFE_VERSION.match(value) and value not in (".", "..")
    return value if ok else None


@dataclass(frozen=True)
class DeviceModelChoice:
    """The device model to load: its folder, its version (None: the bundled card names none) and
    where it came from (:data:`BUNDLED` or :data:`DOWNLOADED`)."""

    version: str | None
    path: Path
    source: str


def _bundled_version(path: Path) -> str | None:
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return _safe_version(json.loads((path / CARD).read_text()).get("version"))
    return None


def _write_json(path: Path, value: Any) -> None:
    """Replace ``path`` atomically (write, fsync, rename): a crash leaves the old or the new state."""
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(temp, "w") as fh:
        json.dump(value, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(temp, path)


class DeviceModels:
    """The phone's device models under ``app_dir/models/device``, with ``bundled`` (the app's own
    model directory) as the fallback. :meth:`current` never touches the network; :meth:`update`
    asks the pointer and downloads what it names; :meth:`start` does that whenever it moves."""

    def __init__(self, app_dir: str | os.PathLike[str], bundled: str | os.PathLike[str], session: UserSession,
                 settings: Settings, *, request_retry: RetryPolicy | None = None) -> None:
        self.dir = Path(app_dir) / "models" / KIND
        self.dir.mkdir(parents=True, exist_ok=True)
        self.bundled = Path(bundled)
        self.db = UserDatabase(session, settings, retry=request_retry)
        self.storage = UserStorage(session, settings, retry=request_retry)
        self.failure: tuple[str, str] | None = None  # (version, why) of the last download that failed
        self._lock = threading.RLock()  # the state file and what is verified: held briefly
        self._updating = threading.Lock()  # one update at a time; current() never waits for a download
        self._verified: set[str] = set()  # versions checked since this object was made
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._listener: Any = None
        self._thread: threading.Thread | None = None

    # ---- what is on the phone -----------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        with contextlib.suppress(OSError, ValueError):
            state = json.loads((self.dir / STATE_FILE).read_text())
            if isinstance(state, dict):
                return state
        return {}

    def _usable(self, entry: Any) -> str | None:
        """The version of a state entry if its folder is complete and verified, else None."""
        if not isinstance(entry, dict) or not (version := _safe_version(entry.get("version"))):
            return None
        if version in self._verified:
            return version
        path = self.dir / version
        try:
            files = record_files(entry)
        except RegistryError:
            return None
        try:
            problem = verify_files(path, files) if path.is_dir() else "missing"
        except OSError as exc:  # replaced while being read (a download of it is under way)
            problem = str(exc)
        if problem is not None:
            log.warning("downloaded device model %s does not match its record; not using it", version)
            return None
        self._verified.add(version)
        return version

    def current(self) -> DeviceModelChoice:
        """The model to use now, without the network: the newest verified download (or the one
        before it), else the bundled model directory."""
        with self._lock:
            state = self._state()
            for key in ("current", "previous"):
                version = self._usable(state.get(key))
                if version is not None:
                    return DeviceModelChoice(version, self.dir / version, DOWNLOADED)
            return DeviceModelChoice(_bundled_version(self.bundled), self.bundled, BUNDLED)

    # ---- following the published pointer ------------------------------------------------------------
    def update(self) -> DeviceModelChoice:
        """Download the version ``/models/device/current`` names if the phone does not have it, and
        return the model to use. Offline, with no pointer, or if the version cannot be fetched or
        verified (then :attr:`failure` says why), the current choice stays."""
        with self._updating:
            choice = self.current()
            try:
                wanted = self.db.get(pointer_path())
            except Unavailable as exc:
                log.info("model update skipped (offline): %s", exc)
                return choice
            version = _safe_version(wanted)
            if version is None:
                if wanted is not None:
                    log.warning("ignoring an unsafe device model pointer %r", wanted)
                return choice
            if version == choice.version:
                return choice
            if version == _bundled_version(self.bundled):  # the app shipped with it
                return DeviceModelChoice(version, self.bundled, BUNDLED)
            try:
                record = self.db.get(version_path(version))
                if not isinstance(record, dict):
                    raise RegistryError(f"/models/{KIND}/versions/{version} does not exist")
                files = record_files(record)
                self._download(version, files)
            except (RegistryError, ServiceError, OSError) as exc:
                log.warning("cannot fetch device model %s; keeping %s: %s", version, choice.version, exc)
                self.failure = (version, str(exc))
                return choice
            with self._lock:
                self._remember(version, files, choice)
            self.failure = None
            log.info("device model %s downloaded and verified", version)
            return DeviceModelChoice(version, self.dir / version, DOWNLOADED)

    def _download(self, version: str, files: list[ModelFile]) -> None:
        target = self.dir / version
        if target.is_dir() and verify_files(target, files) is None:
            return  # already here (the previous version, or a download the state file missed)
        if target.exists():
            self._discard(target)
        temp = self.dir / f".{version}~{uuid.uuid4().hex[:8]}.partial"
        temp.mkdir()
        try:
            for f in files:
                dest = temp / f.path
                dest.parent.mkdir(parents=True, exist_ok=True)
                with open(dest, "wb") as fh:
                    fh.write(self.storage.download(object_path(version, f.path)))
                    fh.flush()
                    os.fsync(fh.fileno())
            problem = verify_files(temp, files)
            if problem is not None:
                raise IntegrityError(f"device model {version}: {problem} (changed after publication or corrupted)")
            temp.rename(target)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        with self._lock:
            self._verified.add(version)

    def _remember(self, version: str, files: list[ModelFile], before: DeviceModelChoice) -> None:
        """Make ``version`` current, the one in use before it previous; delete the rest."""
        state = self._state()
        previous = None
        if before.source == DOWNLOADED and before.version != version:
            previous = next((entry for entry in (state.get("current"), state.get("previous"))
                             if isinstance(entry, dict) and entry.get("version") == before.version), None)
        entry = {"version": version, "files": [f.to_json() for f in files]}
        _write_json(self.dir / STATE_FILE, {"current": entry, "previous": previous})
        keep = {version, previous.get("version") if isinstance(previous, dict) else None, STATE_FILE}
        for item in self.dir.iterdir():
            if item.name not in keep:
                self._discard(item)
        self._verified &= {v for v in keep if v}

    @staticmethod
    def _discard(path: Path) -> None:
        if path.is_dir() and not path.is_symlink():
            doomed = path.with_name(f".{path.name.lstrip('.')}~{uuid.uuid4().hex[:8]}.discard")
            path.rename(doomed)  # out of the way at once; deleting can take a while
            shutil.rmtree(doomed, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    # ---- in the background ------------------------------------------------------------------------
    def start(self, on_update: Callable[[DeviceModelChoice], None]) -> DeviceModels:
        """Check now and whenever the pointer moves (a listener as the patient), on one thread;
        ``on_update(choice)`` when the model to use changed."""
        self._stop.clear()
        self._wake.set()
        self._thread = threading.Thread(target=self._loop, args=(on_update,), name="device-models", daemon=True)
        self._thread.start()
        self._listener = self.db.listen(pointer_path(), lambda _event: self._wake.set())
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._listener is not None:
            self._listener.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(30)

    def _loop(self, on_update: Callable[[DeviceModelChoice], None]) -> None:
        using = self.current()
        while not self._stop.is_set():
            self._wake.wait()
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                choice = self.update()
            except Exception:
                log.exception("device model update failed")
                continue
            if (choice.version, choice.path) != (using.version, using.path):
                using = choice
                try:
                    on_update(choice)
                except Exception:
                    log.exception("on_update raised")
