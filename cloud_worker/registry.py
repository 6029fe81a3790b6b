"""Which cloud model the worker runs, and swapping it without dropping jobs.

The retraining side publishes ``/models/cloud/versions/{v} = {storagePath, ...}`` and moves
``/models/cloud/current``. The worker listens to that pointer, downloads the new version's files
from Storage into a local cache, loads it next to the old one and swaps a reference: batches that
already started finish on the old model, the next batch uses the new one, and each result records
the version that produced it. A version that fails to load is logged and the old model stays.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from pathlib import Path

from firebase_admin import db

from cloud_worker.model import CloudModel, ModelLoadError

log = logging.getLogger("cloud_worker")
_SAFE_VERSION = re.compile(r"^[A-Za-z0-9._\-]{1,100}$")


class ModelProvider:
    def __init__(self, model: CloudModel, loader: Callable[[Path], CloudModel]) -> None:
        self._model = model
        self._loader = loader
        self._lock = threading.Lock()
        self._listener = None
        self._loading: str | None = None
        self.on_swap: Callable[[CloudModel], None] | None = None

    def current(self) -> CloudModel:
        with self._lock:
            return self._model

    def swap(self, model: CloudModel) -> None:
        with self._lock:
            old, self._model = self._model, model
        log.info("model swapped", extra={"fields": {"from": old.version, "to": model.version}})
        if self.on_swap:
            self.on_swap(model)

    # ---- following the published pointer --------------------------------------------------
    def follow(self, app, bucket, cache_dir: Path) -> None:
        """Listen to ``/models/cloud/current`` and load each new version in the background."""

        def on_event(event) -> None:
            try:
                if event.path != "/" or not isinstance(event.data, str):
                    return
                version = event.data
                if version == self.current().version or version == self._loading:
                    return
                self._loading = version
                threading.Thread(target=self._load_published, args=(app, bucket, cache_dir, version),
                                 name=f"model-load-{version}", daemon=True).start()
            except Exception:  # the listener thread must survive anything
                log.exception("model pointer event failed")

        self._listener = db.reference("models/cloud/current", app=app).listen(on_event)

    def stop(self) -> None:
        from cloud_worker.worker import close_listener

        listener, self._listener = self._listener, None
        close_listener(listener)

    def _load_published(self, app, bucket, cache_dir: Path, version: str) -> None:
        try:
            model_dir = fetch_published(app, bucket, cache_dir, version)
            model = self._loader(model_dir)
            if model.version != version:
                log.warning("published model's card names another version",
                            extra={"fields": {"pointer": version, "card": model.version}})
            self.swap(model)
        except Exception as exc:
            log.error("cannot load published model; keeping the current one",
                      extra={"fields": {"version": version, "error": str(exc)}})
        finally:
            self._loading = None


def published_version(app) -> str | None:
    current = db.reference("models/cloud/current", app=app).get()
    return current if isinstance(current, str) and current else None


def fetch_published(app, bucket, cache_dir: Path, version: str) -> Path:
    """Download a published version's files (``storagePath`` prefix) into ``cache_dir/version``."""
    if not _SAFE_VERSION.match(version):
        raise ModelLoadError(f"refusing model version name {version!r}")
    entry = db.reference(f"models/cloud/versions/{version}", app=app).get()
    if not isinstance(entry, dict) or not isinstance(entry.get("storagePath"), str):
        raise ModelLoadError(f"/models/cloud/versions/{version} has no storagePath")
    prefix = entry["storagePath"].rstrip("/") + "/"
    target = Path(cache_dir) / version
    if (target / "card.json").is_file():
        return target
    partial = Path(cache_dir) / f".{version}.partial"
    partial.mkdir(parents=True, exist_ok=True)
    count = 0
    for blob in bucket.list_blobs(prefix=prefix):
        relative = blob.name[len(prefix):]
        if not relative or relative.endswith("/") or ".." in Path(relative).parts:
            continue
        dest = partial / relative
        dest.parent.mkdir(parents=True, exist_ok=True)
        blob.download_to_filename(str(dest))
        count += 1
    if count == 0:
        raise ModelLoadError(f"no files under {prefix} in Storage")
    partial.rename(target)  # a half-downloaded version is never mistaken for a complete one
    return target
