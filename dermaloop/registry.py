"""The model registry: publishing model versions and following the published pointer.

Data (docs/ARCHITECTURE.md)::

    RTDB    /models/{kind}/current              the version everybody should run (a string)
            /models/{kind}/versions/{version}   {storagePath, createdAt, files: [{path, sha256, bytes}],
                                                 card, metrics, parent, publishedBy}
            /modelAudit/{kind}/{pushId}         every pointer move: {action (publish | promote |
                                                 rollback), version, previous, by, at, reason, decision}
    Storage models/{kind}/{version}/{path}      the version's files

``kind`` is "cloud" (the worker's Keras model), "device" (the app's TFLite model) or "localiser"
(the photo-analysis model). Publishing writes the files first, then the version record, and only
then moves the pointer, so a follower never sees a pointer to a version whose files are not there.
A published version is immutable: its record lists every file with its sha256, re-publishing the
same name with other content is refused, and followers verify every file against the record, so
a Storage object changed after publication is refused rather than served.

A :class:`Follower` listens to the pointer and loads each new version in the background on one
loader thread that always takes the newest pointer value it has seen, and a loaded model is only
swapped in if its version is still the newest pointer value: rapid moves v1 -> v2 -> v3 end on v3,
whatever the load times. Downloads go to a fresh temporary directory and are renamed into the cache
only once every file matched its hash; leftovers of a crashed download are deleted, never reused;
a cached version is re-verified before every use.

This module is shared by the worker, retraining and the apps: it imports no cloud_worker,
training, localbase, Keras or TensorFlow (the caller's ``loader`` does the model-specific part).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import mimetypes
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Generic, TypeVar

from dermaloop.admin_handles import acting_user, app_or_default, bucket_or_default, reference
from dermaloop.admin_listen import close_listener, listener_alive
from dermaloop.model_dir import CARD, sha256_file
from dermaloop.settings import Settings

try:  # POSIX: one download of a version at a time across processes sharing a cache
    import fcntl
except ImportError:  # pragma: no cover - Windows: only threads of one process are serialised
    fcntl = None  # type: ignore[assignment]

__all__ = ["KINDS", "SAFE_VERSION", "RegistryError", "PublishConflict", "IntegrityError", "ModelFile", "Published",
           "Loaded", "Follower", "publish", "set_current", "promote", "rollback", "history", "audit_path", "current_version", "version_record", "fetch",
           "publish_files", "record_files", "verify_files"]

log = logging.getLogger(__name__)

KINDS = ("cloud", "device", "localiser")
SAFE_VERSION = re.compile(r"^[A-Za-z0-9._-]{1,100}$")
CARD_FIELD_LIMIT = 16_384  # bytes of JSON: larger card fields stay in Storage's card.json only
_RTDB_BAD_KEY = re.compile(r"[.$#\[\]/\x00-\x1f\x7f]")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

T = TypeVar("T")


class RegistryError(RuntimeError):
    """A version cannot be published or fetched (missing, malformed, unsafe name...)."""


class PublishConflict(RegistryError):
    """The version name is already published with other content: versions are immutable."""


class IntegrityError(RegistryError):
    """A downloaded file does not match the sha256 or size in the version record."""


@dataclass(frozen=True)
class ModelFile:
    """One file of a version: ``path`` relative to the version's folder (POSIX separators)."""

    path: str
    sha256: str
    bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "bytes": self.bytes}


@dataclass(frozen=True)
class Published:
    """What :func:`publish` did. ``created`` is False when the identical version was already
    published (nothing uploaded); ``current`` says whether the pointer names this version now."""

    kind: str
    version: str
    storage_path: str
    files: tuple[ModelFile, ...]
    created: bool
    current: bool


@dataclass(frozen=True)
class Loaded(Generic[T]):
    """A version a :class:`Follower` serves: the loader's result for ``path`` (None for a model the
    caller loaded itself, e.g. a local directory the worker started with)."""

    version: str
    model: T
    path: Path | None = None


# ---- names and records ----------------------------------------------------------------------

def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise RegistryError(f"model kind must be one of {', '.join(KINDS)}, not {kind!r}")


def _check_version(version: Any) -> str:
    if not isinstance(version, str) or not SAFE_VERSION.match(version) or version in (".", ".."):
        raise RegistryError(f"refusing model version name {version!r} (allowed: 1-100 of A-Z a-z 0-9 . _ -)")
    return version


def _safe_relpath(path: Any) -> str:
    """A record's file path, refused if it could escape the version's folder or cache directory."""
    if not isinstance(path, str) or not path or "\\" in path or "\x00" in path or path.startswith("/"):
        raise RegistryError(f"unsafe file path in a version record: {path!r}")
    parts = PurePosixPath(path).parts
    if any(p in ("", ".", "..") for p in parts) or "/".join(parts) != path:
        raise RegistryError(f"unsafe file path in a version record: {path!r}")
    return path


def _record_files(record: dict[str, Any]) -> list[ModelFile]:
    """The files of a version record (a list; RTDB may hand back a dict keyed by index)."""
    raw = record.get("files")
    if isinstance(raw, dict):
        raw = [raw[k] for k in sorted(raw, key=lambda k: int(k) if str(k).isdigit() else 0)]
    if not isinstance(raw, list) or not raw:
        raise RegistryError("the version record lists no files (published without hashes?); publish it again "
                            "with dermaloop.registry.publish")
    files = []
    for item in raw:
        if not isinstance(item, dict):
            raise RegistryError(f"malformed file entry in a version record: {item!r}")
        sha, size = item.get("sha256"), item.get("bytes")
        if not isinstance(sha, str) or not _SHA256.match(sha) or not isinstance(size, int) or size < 0:
            raise RegistryError(f"malformed file entry in a version record: {item!r}")
        files.append(ModelFile(_safe_relpath(item.get("path")), sha, size))
    if len({f.path for f in files}) != len(files):
        raise RegistryError("a version record lists the same file twice")
    return files


def _storage_path(record: dict[str, Any]) -> str:
    path = record.get("storagePath")
    if not isinstance(path, str) or not path.strip("/"):
        raise RegistryError("the version record has no storagePath")
    return _safe_relpath(path.strip("/"))


def current_version(kind: str, *, app: Any = None, settings: Settings | None = None) -> str | None:
    """The version ``/models/{kind}/current`` names, or None (nothing published, or a name that is
    not a safe version name: it is never used as a path)."""
    _check_kind(kind)
    value = reference(f"models/{kind}/current", app_or_default(app, settings)).get()
    if not isinstance(value, str) or not value:
        return None
    try:
        return _check_version(value)
    except RegistryError:
        log.warning("ignoring an unsafe model pointer", extra={"fields": {"kind": kind, "pointer": value}})
        return None


def version_record(kind: str, version: str, *, app: Any = None, settings: Settings | None = None) -> dict | None:
    """The record ``/models/{kind}/versions/{version}``, or None if that version is not published."""
    _check_kind(kind)
    record = reference(f"models/{kind}/versions/{_check_version(version)}", app_or_default(app, settings)).get()
    return record if isinstance(record, dict) else None


def set_current(kind: str, version: str, *, app: Any = None, settings: Settings | None = None) -> None:
    """Move ``/models/{kind}/current`` to an already published version (:func:`promote` with no
    reason given). Refused if the version has no record: followers would fail."""
    promote(kind, version, app=app, settings=settings)


def audit_path(kind: str) -> str:
    """``/modelAudit/{kind}``: one entry per pointer move (admin only: it names who moved it)."""
    _check_kind(kind)
    return f"modelAudit/{kind}"


def _move_pointer(kind: str, version: str, action: str, *, by: str | None, reason: str, decision: str | None,
                  app: Any) -> str | None:
    """Move the pointer by a transaction (two maintainers moving it at once both see the true
    previous version), then append the audit entry. Returns the previous version."""

    seen: list[Any] = []

    def move(current: Any) -> Any:
        seen.append(current)
        return version

    reference(f"models/{kind}/current", app).transaction(move)
    previous = seen[-1] if seen and isinstance(seen[-1], str) else None
    entry = {"action": action, "version": version, "by": acting_user(by), "at": {".sv": "timestamp"}}
    optional = {"previous": previous, "reason": (reason or "").strip()[:2000] or None, "decision": decision}
    entry.update({k: v for k, v in optional.items() if v is not None})
    try:
        reference(audit_path(kind), app).push(entry)
    except Exception as exc:
        raise RegistryError(f"/models/{kind}/current now names {version} (it named {previous}), but its audit "
                            f"entry could not be written: {exc}") from exc
    log.info("model pointer moved", extra={"fields": {"kind": kind, "action": action, "from": previous, "to": version}})
    return previous


def promote(kind: str, version: str, *, by: str | None = None, reason: str = "", decision: str | None = None,
            app: Any = None, settings: Settings | None = None) -> str | None:
    """Make a published version the one everybody runs, with an audit entry saying who, when, why
    and (``decision``) which retraining decision record allowed it. Returns the previous version.
    An unknown version is refused before anything moves: followers would have nothing to load."""
    app = app_or_default(app, settings)
    version = _check_version(version)
    if version_record(kind, version, app=app) is None:
        raise RegistryError(f"/models/{kind}/versions/{version} does not exist: publish it first "
                            f"(see 'dermaloop models list --kind {kind}')")
    return _move_pointer(kind, version, "promote", by=by, reason=reason, decision=decision, app=app)


def history(kind: str, *, limit: int = 50, app: Any = None, settings: Settings | None = None) -> list[dict]:
    """The pointer's audit entries, oldest first (at most the last ``limit``)."""
    raw = reference(audit_path(kind), app_or_default(app, settings)).order_by_key().limit_to_last(limit).get() or {}
    return [dict(v, id=k) for k, v in sorted(raw.items()) if isinstance(v, dict)]


def rollback(kind: str, *, to: str | None = None, by: str | None = None, reason: str = "", app: Any = None,
             settings: Settings | None = None) -> str:
    """Point ``kind`` back at the version that was current before the current one was promoted (or
    at ``to``) and record it. "Before" comes from the audit trail (the last publish or promotion of
    the current version), else from the version record's ``parent``; so rollbacks in a row walk back
    through the promotions. Returns the version now current."""
    app = app_or_default(app, settings)
    current = current_version(kind, app=app)
    if to is None:
        if current is None:
            raise RegistryError(f"nothing to roll back: /models/{kind}/current is not set")
        # The promotion (or publish) that made it current; a rollback entry would point forward again.
        made_current = [e for e in history(kind, limit=1000, app=app)
                        if e.get("version") == current and e.get("action") != "rollback"]
        to = made_current[-1].get("previous") if made_current else None
        if not to:
            to = (version_record(kind, current, app=app) or {}).get("parent")
        if not isinstance(to, str) or not to:
            raise RegistryError(f"cannot roll back {kind} {current}: no earlier version is recorded; name one "
                                "with --to")
    to = _check_version(to)
    if to == current:
        raise RegistryError(f"{kind} {to} is already current")
    if version_record(kind, to, app=app) is None:
        raise RegistryError(f"/models/{kind}/versions/{to} does not exist: cannot roll back to it")
    _move_pointer(kind, to, "rollback", by=by, reason=reason, decision=None, app=app)
    return to


# ---- publishing -----------------------------------------------------------------------------

def _walk(root: Path) -> Iterator[str]:
    """Relative POSIX paths of the regular files under ``root``; hidden names (``.DS_Store``,
    ``.partial`` folders) and symlinked folders are skipped."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if not name.startswith(".") and path.is_file():
                yield path.relative_to(root).as_posix()


def publish_files(model_dir: str | Path, kind: str) -> list[str]:
    """The files of ``model_dir`` that make up a ``kind`` version, as relative POSIX paths.

    "cloud"/"device" (the model-directory layout of ``dermaloop.model_dir``): the top-level files
    (card.json, labels.json, split.json), the kind's folder and its reports (``reports/{kind}*``),
    so a phone never downloads the cloud model and the worker never the TFLite files.
    "localiser" (``<models dir>/localiser/<version>/``): every file of the directory.
    """
    _check_kind(kind)
    root = Path(model_dir)
    if not root.is_dir():
        raise RegistryError(f"{root} is not a directory")
    names = list(_walk(root))
    if kind != "localiser":
        def wanted(rel: str) -> bool:
            parts = rel.split("/")
            return (len(parts) == 1 or parts[0] == kind
                    or (parts[0] == "reports" and len(parts) > 2 and parts[1].split("_")[0] == kind))

        names = [n for n in names if wanted(n)]
        if not any(n.startswith(f"{kind}/") for n in names):
            raise RegistryError(f"{root} has no {kind}/ model files: not a {kind} model directory")
    if not names:
        raise RegistryError(f"{root} holds no files to publish")
    return names


def _rtdb_safe(value: Any, where: str, dropped: list[str]) -> Any:
    """``value`` as the Realtime Database can store it: keys with ``. $ # [ ] /`` are dropped (and
    noted), non-finite numbers become absent, anything else non-JSON becomes its text."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            key = str(key)
            if not key or _RTDB_BAD_KEY.search(key) or len(key.encode()) > 768:
                dropped.append(f"{where}/{key}")
                continue
            safe = _rtdb_safe(item, f"{where}/{key}", dropped)
            if safe is not None:
                out[key] = safe
        return out or None
    if isinstance(value, (list, tuple)):
        items = [_rtdb_safe(v, f"{where}/{i}", dropped) for i, v in enumerate(value)]
        return items if any(v is not None for v in items) else None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _card_for_record(card: dict[str, Any]) -> tuple[dict[str, Any] | None, list[str]]:
    """The card as stored in the version record: RTDB-safe, without the per-file hash maps (the
    record's ``files`` has them) and without fields over ``CARD_FIELD_LIMIT`` (card.json in Storage
    keeps everything). Returns (card, names of what was left out)."""
    dropped: list[str] = []
    kept: dict[str, Any] = {}
    for key, value in card.items():
        if key in ("files", "file_bytes") or len(json.dumps(value, default=str)) > CARD_FIELD_LIMIT:
            dropped.append(key)
            continue
        kept[key] = value
    return _rtdb_safe(kept, "", dropped), [d.lstrip("/") for d in dropped]


def _card_metrics(card: dict[str, Any], kind: str) -> Any:
    section = card.get(kind)
    if isinstance(section, dict) and section.get("metrics") is not None:
        return section["metrics"]
    found = {k: v for k, v in card.items() if k.endswith("metrics") and v is not None}  # the localiser's card
    return found or None


def _check_against_card(root: Path, card: dict[str, Any], files: list[ModelFile]) -> None:
    """Refuse to publish a directory whose files no longer match the hashes its own card records."""
    expected: dict[str, str] = {}
    if isinstance(card.get("files"), dict):
        expected.update({str(k): v for k, v in card["files"].items() if isinstance(v, str)})
    if isinstance(card.get("file"), str) and isinstance(card.get("sha256"), str):
        expected[card["file"]] = card["sha256"]
    for f in files:
        if f.path in expected and expected[f.path] != f.sha256:
            raise RegistryError(f"{root / f.path} does not match the sha256 in its {CARD}: corrupt or replaced")


def _same_files(record: dict[str, Any], files: list[ModelFile]) -> bool:
    try:
        theirs = {f.path: (f.sha256, f.bytes) for f in _record_files(record)}
    except RegistryError:
        return False
    return theirs == {f.path: (f.sha256, f.bytes) for f in files}


class _AlreadyPublished(Exception):
    pass


def publish(model_dir: str | Path, kind: str, version: str | None = None, *, parent: str | None = None,
            make_current: bool = True, metrics: dict[str, Any] | None = None, published_by: str | None = None,
            app: Any = None, bucket: Any = None, settings: Settings | None = None) -> Published:
    """Publish ``model_dir`` as version ``version`` of ``kind`` and (``make_current``) point
    ``/models/{kind}/current`` at it.

    Order, so that followers never see a half-published version: every file is uploaded to
    ``models/{kind}/{version}/{path}`` (its sha256 also in the object's metadata; never over an
    existing object with other content), then the version record is created by a transaction (two
    publishers of one name cannot both win), then the pointer moves. The version defaults to the card's ``version`` and must equal it when both are
    given (results record the card's version). ``parent`` defaults to the version current before.
    Publishing a version that exists with other files raises :class:`PublishConflict` before
    anything is uploaded; publishing identical content uploads nothing (it still moves the pointer
    when ``make_current``).
    """
    _check_kind(kind)
    root = Path(model_dir)
    card: dict[str, Any] = {}
    if (root / CARD).is_file():
        try:
            card = json.loads((root / CARD).read_text())
        except json.JSONDecodeError as exc:
            raise RegistryError(f"{root / CARD}: malformed JSON ({exc})") from exc
        if not isinstance(card, dict):
            raise RegistryError(f"{root / CARD} is not a JSON object")
    elif kind != "localiser":
        raise RegistryError(f"{root} is not a model directory (no {CARD})")
    card_version = card.get("version")
    if version is None:
        if card_version is None:
            raise RegistryError(f"no version given and {root / CARD} names none")
        version = card_version
    version = _check_version(version)
    if card_version is not None and card_version != version:
        raise RegistryError(f"{root / CARD} says version {card_version!r}, not {version!r}: results record the "
                            "card's version, so the two must agree")
    if kind != "localiser" and not isinstance(card.get(kind), dict):
        raise RegistryError(f"{root / CARD} has no {kind} section: not a {kind} model")

    names = publish_files(root, kind)
    files = [ModelFile(rel, sha256_file(root / rel), (root / rel).stat().st_size) for rel in names]
    _check_against_card(root, card, files)

    app = app_or_default(app, settings)
    record_ref = reference(f"models/{kind}/versions/{version}", app)
    storage_path = f"models/{kind}/{version}"
    existing = record_ref.get()
    if isinstance(existing, dict):
        if not _same_files(existing, files):
            raise PublishConflict(f"{kind} version {version} is already published with other files; versions "
                                  "are immutable: publish under a new version name")
        return _finish(kind, version, storage_path, files, False, make_current, app, published_by)

    if parent is None:
        parent = current_version(kind, app=app)
    _upload(bucket_or_default(bucket, settings), root, storage_path, files, kind, version)

    card_entry, trimmed = _card_for_record(card) if card else (None, [])
    record: dict[str, Any] = {
        "storagePath": storage_path,
        "createdAt": int(time.time() * 1000),
        "files": [f.to_json() for f in files],
        "publishedBy": acting_user(published_by),
    }
    optional = {"card": card_entry, "cardTrimmed": trimmed or None,
                "metrics": _rtdb_safe(metrics if metrics is not None else _card_metrics(card, kind), "", []),
                "parent": parent if parent and parent != version else None}
    record.update({k: v for k, v in optional.items() if v is not None})

    def create(current: Any) -> Any:
        if isinstance(current, dict):
            if _same_files(current, files):
                raise _AlreadyPublished
            raise PublishConflict(f"{kind} version {version} was published with other files meanwhile")
        return record

    try:
        record_ref.transaction(create)
        created = True
    except _AlreadyPublished:
        created = False
    log.info("model version published", extra={"fields": {"kind": kind, "version": version, "files": len(files),
                                                            "created": created}})
    return _finish(kind, version, storage_path, files, created, make_current, app, published_by)


def _upload(bucket: Any, root: Path, storage_path: str, files: list[ModelFile], kind: str, version: str) -> None:
    """Upload each file only where no object is yet (``ifGenerationMatch=0``): the registry never
    overwrites bytes that a record may point at. An object already there with the same sha256
    (metadata) and size is what an earlier, interrupted publish of this content left: kept."""
    from google.api_core import exceptions as gexc

    for f in files:
        name = f"{storage_path}/{f.path}"
        blob = bucket.blob(name)
        blob.metadata = {"sha256": f.sha256}
        content_type = mimetypes.guess_type(f.path)[0] or "application/octet-stream"
        try:
            blob.upload_from_filename(str(root / f.path), content_type=content_type, if_generation_match=0)
        except gexc.PreconditionFailed:
            there = bucket.get_blob(name)
            if there is None or (there.metadata or {}).get("sha256") != f.sha256 or there.size != f.bytes:
                raise PublishConflict(f"{name} already exists in Storage with other content (left by an unfinished "
                                      f"publish of {kind} version {version}?): delete models/{kind}/{version}/ "
                                      "there or publish under a new version name") from None


def _finish(kind: str, version: str, storage_path: str, files: list[ModelFile], created: bool,
            make_current: bool, app: Any, by: str | None) -> Published:
    if make_current and current_version(kind, app=app) != version:
        _move_pointer(kind, version, "publish", by=by, reason="", decision=None, app=app)
    return Published(kind, version, storage_path, tuple(files), created, make_current)


# ---- fetching into a local cache --------------------------------------------------------------

_thread_locks: dict[str, threading.Lock] = {}
_thread_locks_guard = threading.Lock()


@contextlib.contextmanager
def _version_lock(cache_dir: Path, version: str) -> Iterator[None]:
    """Hold the cache's lock for ``version``: one download or verification of a version at a time,
    across the threads and processes sharing ``cache_dir`` (so leftovers seen under the lock are
    certainly dead)."""
    path = cache_dir / f".{version}.lock"
    with _thread_locks_guard:
        local = _thread_locks.setdefault(str(path.resolve()), threading.Lock())
    with local, open(path, "a+b") as handle:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _remove_leftovers(cache_dir: Path, version: str) -> None:
    """Delete what a crashed download of ``version`` left: its temporary and discarded folders (and
    the ``.{version}.partial`` folder of the registry before this one). Never reused: their files
    may be truncated."""
    for entry in cache_dir.iterdir():
        name = entry.name
        if name == f".{version}.partial" or (name.startswith(f".{version}~")
                                             and name.endswith((".partial", ".discard"))):
            log.info("removing a leftover partial download", extra={"fields": {"path": str(entry)}})
            _remove(entry)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def record_files(record: dict[str, Any]) -> list[ModelFile]:
    """The files a version record lists, checked (safe relative paths, sha256 hex, sizes), for
    code that downloads a version through another transport (the patient app, as the user)."""
    return _record_files(record)


def verify_files(root: str | Path, files: list[ModelFile]) -> str | None:
    """None if the folder ``root`` holds exactly ``files`` with their sizes and sha256, else what is
    wrong. It does no I/O beyond reading ``root``, so every downloader verifies the same way:
    :func:`fetch` (admin) and the patient app's model updater (``client.device_models``)."""
    root = Path(root)
    present = set(_walk_all(root))
    expected = {f.path for f in files}
    if present != expected:
        missing, extra = sorted(expected - present), sorted(present - expected)
        return f"missing {missing[:3]}, unexpected {extra[:3]}"
    for f in files:
        path = root / f.path
        if path.stat().st_size != f.bytes or sha256_file(path) != f.sha256:
            return f"{f.path} does not match its sha256"
    return None


def _walk_all(root: Path) -> Iterator[str]:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            yield (Path(dirpath) / name).relative_to(root).as_posix()


def _discard(path: Path) -> None:
    doomed = path.with_name(f".{path.name}~{uuid.uuid4().hex[:8]}.discard")
    path.rename(doomed)  # gone from the cache at once; deleting can take a while
    _remove(doomed)


def fetch(kind: str, version: str, cache_dir: str | Path, *, app: Any = None, bucket: Any = None,
          settings: Settings | None = None, record: dict[str, Any] | None = None) -> Path:
    """``cache_dir/{version}`` holding exactly the files of a published version, each verified
    against the version record's sha256.

    A complete cached copy is re-verified and used; a corrupt one is discarded and downloaded
    again. Downloads go to a fresh temporary folder that is renamed into place only when every file
    matched, so ``cache_dir/{version}`` is never half there; on any error (e.g.
    :class:`IntegrityError` for a Storage object changed after publication) the temporary folder is
    removed and nothing in the cache changes.
    """
    _check_kind(kind)
    version = _check_version(version)
    if record is None:
        record = version_record(kind, version, app=app, settings=settings)
        if record is None:
            raise RegistryError(f"/models/{kind}/versions/{version} does not exist")
    files = _record_files(record)
    prefix = _storage_path(record)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / version
    with _version_lock(cache_dir, version):
        _remove_leftovers(cache_dir, version)
        if target.exists():
            problem = verify_files(target, files) if target.is_dir() else "not a directory"
            if problem is None:
                return target
            log.warning("cached model version does not match its record; downloading it again",
                        extra={"fields": {"kind": kind, "version": version, "problem": problem}})
            _discard(target)
        from google.api_core import exceptions as gexc

        bucket = bucket_or_default(bucket, settings)
        tmp = cache_dir / f".{version}~{uuid.uuid4().hex[:8]}.partial"
        tmp.mkdir()
        try:
            for f in files:
                dest = tmp / f.path
                dest.parent.mkdir(parents=True, exist_ok=True)
                name = f"{prefix}/{f.path}"
                try:
                    bucket.blob(name).download_to_filename(str(dest))
                except gexc.NotFound:
                    raise RegistryError(f"{kind} version {version}: {name} is missing in Storage") from None
                digest, size = sha256_file(dest), dest.stat().st_size
                if digest != f.sha256 or size != f.bytes:
                    raise IntegrityError(f"{kind} version {version}: {name} does not match the published sha256 "
                                         f"(expected {f.sha256[:12]}.. {f.bytes} bytes, got {digest[:12]}.. "
                                         f"{size} bytes): changed after publication or corrupted")
            tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("model version downloaded", extra={"fields": {"kind": kind, "version": version, "files": len(files)}})
    return target


# ---- following the pointer ----------------------------------------------------------------------

class Follower(Generic[T]):
    """Serve whatever ``/models/{kind}/current`` names, loading new versions in the background.

    ``loader(path)`` turns a verified cache directory into a model (e.g. ``load_device_model``);
    ``on_swap(loaded)`` is called after each swap, from the loader thread. ``initial`` is what the
    caller serves already (not reloaded while the pointer names it).

    One loader thread works through requests: it always takes the newest pointer value seen, and a
    result is swapped in only if its version is still the newest pointer value, so a slow load of
    an older version can never replace a newer one. A version that fails to load (download, hash,
    loader) is logged, the current model keeps serving, and it is retried only when the pointer
    names it again or after ``retry_s``. Every ``resync_s`` the pointer is also read directly (and
    a dead listener replaced), so a dropped stream cannot leave the follower behind.
    """

    def __init__(self, kind: str, cache_dir: str | Path, loader: Callable[[Path], T],
                 on_swap: Callable[[Loaded[T]], None] | None = None, *, app: Any = None, bucket: Any = None,
                 settings: Settings | None = None, initial: Loaded[T] | None = None,
                 resync_s: float = 30.0, retry_s: float = 60.0) -> None:
        _check_kind(kind)
        self.kind = kind
        self.cache_dir = Path(cache_dir)
        self._loader = loader
        self._on_swap = on_swap
        self._app = app_or_default(app, settings)
        self._bucket = bucket_or_default(bucket, settings)
        self._resync_s = resync_s
        self._retry_s = retry_s
        self._cond = threading.Condition()
        self._current: Loaded[T] | None = initial
        self._wanted: str | None = None  # newest pointer value seen
        self._seq = 0  # bumped whenever the pointer value changes
        self._failed: tuple[str, int, float] | None = None  # (version, seq, monotonic time)
        self._failure: tuple[str, str] | None = None
        self._stop = threading.Event()
        self._listener: Any = None
        self._threads: list[threading.Thread] = []

    # ---- what is served ---------------------------------------------------------------------
    def current(self) -> Loaded[T] | None:
        """The version being served (None until one is loaded)."""
        with self._cond:
            return self._current

    @property
    def pointer(self) -> str | None:
        """The newest pointer value seen (may still be loading)."""
        with self._cond:
            return self._wanted

    @property
    def failure(self) -> tuple[str, str] | None:
        """(version, error) of the last load that failed, until a later load succeeds."""
        with self._cond:
            return self._failure

    # ---- life cycle -------------------------------------------------------------------------
    def start(self) -> Follower[T]:
        """Start the loader and resync threads and listen to the pointer."""
        for target, name in ((self._load_loop, f"model-load-{self.kind}"), (self._resync_loop,
                                                                              f"model-resync-{self.kind}")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        self._listen()
        log.info("following the model pointer", extra={"fields": {"kind": self.kind,
                                                                   "serving": getattr(self._current, "version", None)}})
        return self

    def stop(self) -> None:
        """Stop listening and loading; a load in progress finishes in the background and is dropped."""
        self._stop.set()
        listener, self._listener = self._listener, None
        close_listener(listener)
        with self._cond:
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=1.0)

    # ---- pointer events ---------------------------------------------------------------------
    def _listen(self) -> None:
        self._listener = reference(f"models/{self.kind}/current", self._app).listen(self._on_event)

    def _on_event(self, event: Any) -> None:
        try:
            if event.path == "/":
                self._see(event.data)
        except Exception:  # an exception would end firebase-admin's listener thread
            log.exception("model pointer event failed")

    def _see(self, value: Any) -> None:
        if value is not None and not (isinstance(value, str) and SAFE_VERSION.match(value)):
            log.warning("ignoring an unsafe model pointer", extra={"fields": {"kind": self.kind, "pointer": value}})
            return
        with self._cond:
            if value == self._wanted:
                return
            self._wanted = value
            self._seq += 1
            self._cond.notify_all()
        if value is None:
            log.warning("the model pointer is empty; keeping the current model", extra={"fields": {"kind": self.kind}})

    def _resync_loop(self) -> None:
        while not self._stop.wait(self._resync_s):
            try:
                if self._listener is not None and not listener_alive(self._listener):
                    log.warning("model pointer listener died; listening again", extra={"fields": {"kind": self.kind}})
                    self._listen()
                self._see(reference(f"models/{self.kind}/current", self._app).get())
            except Exception as exc:
                log.warning("reading the model pointer failed", extra={"fields": {"kind": self.kind,
                                                                                  "error": str(exc)}})
            with self._cond:
                self._cond.notify_all()  # a failed version may be due for a retry

    # ---- loading ----------------------------------------------------------------------------
    def _next(self) -> tuple[str, int] | None:
        """Block until a version other than the served one is wanted (and not a fresh failure)."""
        with self._cond:
            while not self._stop.is_set():
                wanted = self._wanted
                serving = self._current.version if self._current else None
                if wanted is not None and wanted != serving:
                    failed = self._failed
                    if failed is None or failed[0] != wanted or failed[1] != self._seq:
                        return wanted, self._seq
                    wait = failed[2] + self._retry_s - time.monotonic()
                    if wait <= 0:
                        return wanted, self._seq
                    self._cond.wait(wait)
                else:
                    self._cond.wait()
            return None

    def _superseded(self, version: str) -> bool:
        with self._cond:
            return self._stop.is_set() or self._wanted != version

    def _load_loop(self) -> None:
        while (job := self._next()) is not None:
            version, seq = job
            log.info("loading model version", extra={"fields": {"kind": self.kind, "version": version}})
            try:
                path = fetch(self.kind, version, self.cache_dir, app=self._app, bucket=self._bucket)
                if self._superseded(version):  # do not spend a model load on a version nobody wants
                    log.info("model version superseded before loading",
                             extra={"fields": {"kind": self.kind, "version": version}})
                    continue
                model = self._loader(path)
            except Exception as exc:
                log.error("cannot load the published model; keeping the current one",
                          extra={"fields": {"kind": self.kind, "version": version, "error": str(exc)}})
                with self._cond:
                    self._failed = (version, seq, time.monotonic())
                    self._failure = (version, str(exc))
                continue
            with self._cond:
                if self._stop.is_set() or self._wanted != version:
                    log.info("model version superseded while loading; not swapped in",
                             extra={"fields": {"kind": self.kind, "version": version, "pointer": self._wanted}})
                    continue
                loaded = Loaded(version, model, path)
                self._current = loaded
                self._failed = self._failure = None
            log.info("model version serving", extra={"fields": {"kind": self.kind, "version": version}})
            if self._on_swap is not None:
                try:
                    self._on_swap(loaded)
                except Exception:
                    log.exception("on_swap failed", extra={"fields": {"kind": self.kind, "version": version}})
