"""Retraining's records: the decision record in the database and the run's own state on disk.

Decision record (admin only; docs/ARCHITECTURE.md)::

    /retrainRuns/{runId}   {runId, startedAt, updatedAt, by, host, dryRun, status, inputs: {baseDataset,
                            datasetVersion, parentDataset, current: {device, cloud}, recipe, newLabels,
                            casesTaken, casesSkipped: {reason: count}}, candidate, metrics: {benchmark,
                            new_holdout}, gates: [...], decision: {promote, reason}, published, promoted,
                            labelled, error}

It is written once the gates have spoken, whether they passed or not (change control: every change
considered, with its evidence), and updated as the run publishes, promotes and labels. ``status``
says how far it got: ``refused``, ``passed`` (decided, not yet published), ``published``,
``promoted``, ``done`` (cases labelled), ``failed`` (an error after the decision), ``superseded``
(interrupted, and a later run started over because its inputs had changed).

Run state: ``OUT/runs/{runId}/state.json``, replaced atomically after every step, so a run killed
at any point (even kill -9) is resumed by the next ``dermaloop retrain`` from its last finished
step, or abandoned cleanly when its inputs changed meanwhile.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dermaloop.admin_handles import reference

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no cross-process lock
    fcntl = None  # type: ignore[assignment]

__all__ = ["RUNS_PATH", "run_path", "RunState", "new_run_id", "write_record", "update_record",
           "read_record", "skipped_counts", "json_safe", "run_lock", "RunLocked", "find_unfinished"]

RUNS_PATH = "retrainRuns"
_RUN_ID = re.compile(r"^[0-9]{8}T[0-9]{6}Z-[0-9a-f]{6}$")
_BAD_KEY = re.compile(r"[.$#\[\]/\x00-\x1f\x7f]")


class RunLocked(RuntimeError):
    """Another retraining run holds this output folder."""


def run_path(run_id: str) -> str:
    if not _RUN_ID.match(run_id):
        raise ValueError(f"{run_id!r} is not a retraining run id")
    return f"{RUNS_PATH}/{run_id}"


def new_run_id(now: float | None = None) -> str:
    """Sortable by time, unique: ``20260101T120000Z-a1b2c3``."""
    stamp = datetime.fromtimestamp(time.time() if now is None else now, UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{uuid.uuid4().hex[:6]}"


def json_safe(value: Any) -> Any:
    """``value`` as the Realtime Database stores it: numpy scalars as numbers, non-finite numbers
    and empty containers dropped, keys it refuses (``. $ # [ ] /``) with those characters as ``_``."""
    if isinstance(value, dict):
        out = {_BAD_KEY.sub("_", str(k)) or "_": json_safe(v) for k, v in value.items()}
        out = {k: v for k, v in out.items() if v is not None}
        return out or None
    if isinstance(value, (list, tuple)):
        items = [json_safe(v) for v in value]
        return items if any(v is not None for v in items) else None
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def skipped_counts(skipped: list[tuple[str, str]]) -> dict[str, int]:
    """Reasons cases were left out, counted (the reasons name no patient)."""
    def general(reason: str) -> str:
        return re.sub(r"\(.*?\)|[0-9a-f]{12,}…?|\b[A-Za-z0-9_-]{20,}\b", "…", reason).strip()[:200]

    return dict(Counter(general(r) for _, r in skipped).most_common())


def write_record(run_id: str, record: dict[str, Any], *, app: Any) -> None:
    """Create or replace the run's decision record."""
    reference(run_path(run_id), app).set(json_safe({**record, "runId": run_id, "updatedAt": int(time.time() * 1000)}))


def update_record(run_id: str, fields: dict[str, Any], *, app: Any) -> None:
    """Change some fields of the run's record (status, published, promoted, ...)."""
    safe = json_safe({**fields, "updatedAt": int(time.time() * 1000)}) or {}
    reference(run_path(run_id), app).update(safe)


def read_record(run_id: str, *, app: Any) -> dict[str, Any] | None:
    value = reference(run_path(run_id), app).get()
    return value if isinstance(value, dict) else None


# ---- the run's state on disk -----------------------------------------------------------------------


@dataclass
class RunState:
    """What a run has done so far; ``save`` after every step (atomic replace)."""

    run_id: str
    folder: Path
    started_at: int
    by: str
    inputs: dict[str, Any] = field(default_factory=dict)  # what decides whether a rerun may resume
    version: str = ""
    steps: dict[str, Any] = field(default_factory=dict)  # step name -> what it produced
    finished: bool = False

    @property
    def path(self) -> Path:
        return self.folder / "state.json"

    def done(self, step: str) -> bool:
        return step in self.steps

    def mark(self, step: str, value: Any = True) -> None:
        self.steps[step] = value
        self.save()

    def save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        data = {"run_id": self.run_id, "started_at": self.started_at, "by": self.by, "inputs": self.inputs,
                "version": self.version, "steps": self.steps, "finished": self.finished}
        tmp = self.folder / f".state.{uuid.uuid4().hex[:6]}.tmp"
        tmp.write_text(json.dumps(data, indent=1, default=str))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    @classmethod
    def load(cls, folder: Path) -> RunState | None:
        try:
            data = json.loads((folder / "state.json").read_text())
            return cls(data["run_id"], folder, int(data["started_at"]), data["by"], data.get("inputs") or {},
                       data.get("version") or "", data.get("steps") or {}, bool(data.get("finished")))
        except (OSError, ValueError, KeyError, TypeError):
            return None


def find_unfinished(runs_dir: Path) -> RunState | None:
    """The newest run under ``runs_dir`` that did not finish (killed, or failed mid-way)."""
    if not runs_dir.is_dir():
        return None
    for folder in sorted((p for p in runs_dir.iterdir() if p.is_dir() and _RUN_ID.match(p.name)), reverse=True):
        state = RunState.load(folder)
        if state is not None and not state.finished:
            return state
    return None


@contextlib.contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """One retraining run per output folder at a time (the lock dies with its process, even on kill -9)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "retrain.lock", "a+b") as handle:
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunLocked(f"another dermaloop retrain is running on {out} (it holds {out / 'retrain.lock'}); "
                                "wait for it or give another --out") from None
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
