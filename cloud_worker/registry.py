"""Which cloud model the worker runs, and swapping it without dropping jobs.

Publishing, downloading, hash checks and following ``/models/cloud/current`` are
``dermaloop.registry``'s (shared with retraining and the apps). This module is the worker's part:
it holds the current ``CloudModel`` and swaps a reference when the registry's follower has loaded a
new version, so batches that already started finish on the old model, the next batch uses the new
one, and each result records the version that produced it (``model.version``). A version that
fails to load is logged by the follower and the old model stays.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cloud_worker.model import CloudModel
from dermaloop.registry import Follower, Loaded

log = logging.getLogger("cloud_worker")


class ModelProvider:
    """The model the next batch uses; ``loader`` turns a verified model directory into a model."""

    def __init__(self, model: CloudModel, loader: Callable[[Path], CloudModel]) -> None:
        self._model = model
        self._loader = loader
        self._lock = threading.Lock()
        self._follower: Follower[CloudModel] | None = None
        self.on_swap: Callable[[CloudModel], None] | None = None

    def current(self) -> CloudModel:
        with self._lock:
            return self._model

    def swap(self, model: CloudModel) -> None:
        """Serve ``model`` from the next batch on (a batch holds the model it started with)."""
        with self._lock:
            old, self._model = self._model, model
        log.info("model swapped", extra={"fields": {"from": old.version, "to": model.version}})
        if self.on_swap:
            self.on_swap(model)

    # ---- following the published pointer --------------------------------------------------
    def follow(self, app: Any, bucket: Any, cache_dir: Path) -> None:
        """Follow ``/models/cloud/current`` (``dermaloop.registry.Follower``) and swap in each new
        version once it is downloaded, verified and loaded."""
        current = self.current()
        self._follower = Follower("cloud", cache_dir, self._load, self._swap_loaded, app=app, bucket=bucket,
                                  initial=Loaded(current.version, current)).start()

    def stop(self) -> None:
        follower, self._follower = self._follower, None
        if follower is not None:
            follower.stop()

    def _load(self, model_dir: Path) -> CloudModel:
        model = self._loader(model_dir)
        if model.version != model_dir.name:
            log.warning("published model's card names another version",
                        extra={"fields": {"pointer": model_dir.name, "card": model.version}})
        return model

    def _swap_loaded(self, loaded: Loaded[CloudModel]) -> None:
        self.swap(loaded.model)
