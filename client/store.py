"""The phone's local store: every case, its photo and its chat, kept before anything goes online.

The patient app is offline first: a photo is diagnosed on the device and must survive a dead
network, a killed app and a reboot until it reached the server. So a case is written here *before*
anything else happens to it, and everything the sync engine (``client.sync``) needs to resume later
lives here too: the status, the resumable upload's session URL, the last error, the server's latest
copy of the case and the chat, the last-read mark of each chat, the chat messages written offline
(the outbox, until the server has them), and each browser's signed-in session (for coming back
signed in after a reload or a restart, without the password).

Layout under ``root`` (one folder per device; rows are keyed by the signed-in uid)::

    store.sqlite3            cases, messages, outbox, read marks, sessions by browser key (SQLite, WAL)
    images/<uid hash>/       the photos, one file per case

Nothing is stored half-way: a photo goes to a temporary name, is fsynced and renamed, and only then
is its row committed in one transaction; if that fails the file is removed again. What a crash
between the two leaves (a file without a row) is deleted the next time the store opens. Bad input
(a note over the case domain's limits, an empty photo, an unknown status) is refused with
:class:`StoreError` before anything is written.

One :class:`LocalStore` may be used from several threads at once (the UI and the sync engine).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dermaloop import cases
from dermaloop.cases import Status

try:  # POSIX: the store knows whether another instance has the folder open
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["DB_FILE", "IMAGES_DIR", "LocalCase", "LocalStore", "RowSessionStore", "StoreError"]

DB_FILE = "store.sqlite3"
IMAGES_DIR = "images"
_LOCK_FILE = ".store.lock"
_SCHEMA_VERSION = 1
_EXTENSIONS = {"image/jpeg": ".jpg", "image/png": ".png", "image/webp": ".webp"}
_DEVICE_KEYS = frozenset({"modelVersion", "top", "risk", "quality", "box", "at", "demonstration", "unsure",
                          "predictionSet"})
_RISKS = ("low", "moderate", "high")
_STATUS_VALUES = frozenset(s.value for s in Status)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cases (
    uid TEXT NOT NULL,
    case_id TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    status TEXT NOT NULL,
    image_file TEXT,                 -- relative to the store's root; NULL: the photo is on the server only
    content_type TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    device TEXT,                     -- JSON
    note TEXT,                       -- JSON
    research_consent INTEGER NOT NULL,
    sent_anyway INTEGER NOT NULL,
    same_lesion_as TEXT,
    upload_url TEXT,
    last_error TEXT,
    remote TEXT,                     -- JSON: the server's latest copy of the case
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (uid, case_id)
);
CREATE INDEX IF NOT EXISTS cases_by_time ON cases (uid, created_at);
CREATE TABLE IF NOT EXISTS messages (
    uid TEXT NOT NULL,
    case_id TEXT NOT NULL,
    msg_id TEXT NOT NULL,
    at INTEGER NOT NULL,
    sender_role TEXT,
    data TEXT NOT NULL,              -- JSON: the message as the server has it
    PRIMARY KEY (uid, case_id, msg_id)
);
CREATE TABLE IF NOT EXISTS read_marks (
    uid TEXT NOT NULL,
    case_id TEXT NOT NULL,
    last_read_at INTEGER NOT NULL,
    PRIMARY KEY (uid, case_id)
);
CREATE TABLE IF NOT EXISTS settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    key_hash TEXT PRIMARY KEY,       -- sha256 of the browser's random key (the key itself is not kept)
    uid TEXT NOT NULL,
    data TEXT NOT NULL,              -- JSON: UserSession.to_dict()
    updated_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    uid TEXT NOT NULL,
    case_id TEXT NOT NULL,
    msg_id TEXT NOT NULL,            -- made on the device: every retry writes the same message
    created_at INTEGER NOT NULL,
    record TEXT NOT NULL,            -- JSON: cases.message_record(...)
    last_error TEXT,                 -- plain words once the server refused it for good
    PRIMARY KEY (uid, case_id, msg_id)
);
"""


class StoreError(ValueError):
    """Input the store refuses (nothing was written): a note over the limits, an empty photo, an
    unknown status, a case id that exists... ``str()`` says what is wrong in plain words."""


def _now_ms() -> int:
    return int(time.time() * 1000)


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


def _unjson(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _status(value: Any) -> Status:
    try:
        return Status(value)
    except ValueError:
        raise StoreError(f"unknown case status {value!r}; expected one of "
                         f"{', '.join(s.value for s in Status)}") from None


def _key(name: str, value: Any) -> str:
    """A uid (``name`` "uid") or case id as the database accepts it (the case domain's own check)."""
    try:
        if name == "uid":
            cases.patient_cases_path(value)
        else:
            cases.job_path(value)
    except cases.CaseError as exc:
        raise StoreError(str(exc)) from None
    return value


@dataclass(frozen=True)
class LocalCase:
    """One case as the phone knows it. ``remote`` is the server's latest copy (None: not on the
    server, or not seen there yet); ``image_path`` is None for a case made on another device."""

    case_id: str
    uid: str
    created_at: int  # ms
    status: Status
    image_path: Path | None
    content_type: str
    sha256: str
    bytes: int
    width: int
    height: int
    device: dict[str, Any] | None
    note: dict[str, str] | None
    research_consent: bool
    sent_anyway: bool  # the device checks declined the photo and the patient sent it anyway
    same_lesion_as: str | None  # "same spot as an earlier case"
    upload_url: str | None
    last_error: str | None  # plain words, for the patient
    remote: dict[str, Any] | None
    updated_at: int  # ms

    @property
    def pending(self) -> bool:
        """Not on the server yet: the sync engine still has to send it."""
        return self.status in cases.LOCAL_STATUSES

    @property
    def problem(self) -> str | None:
        """What went wrong, in words for the patient: a local refusal, or the server's failure."""
        if self.last_error:
            return self.last_error
        failure = (self.remote or {}).get("failure")
        if self.status == Status.FAILED and isinstance(failure, dict):
            return cases.failure_message(failure.get("reason"))
        return None

    def image_record(self) -> dict[str, Any]:
        """The case's ``image`` record (raises ``cases.CaseError`` if the row no longer fits it)."""
        return cases.image_record(self.uid, self.case_id, self.sha256, self.content_type, self.bytes,
                                  self.width, self.height)

    def server_case(self) -> dict[str, Any]:
        """The case as the patient creates it on the server (``cases.new_case``)."""
        return cases.new_case(self.uid, self.case_id, self.image_record(), self.research_consent,
                              note=self.note, device=self.device, sent_anyway=self.sent_anyway,
                              same_lesion_as=self.same_lesion_as)


class RowSessionStore:
    """An ``UploadSessionStore`` (``dermaloop.storage``) kept in the case's row, so the resumable
    session URL survives the app being killed and lives and dies with the case."""

    def __init__(self, store: LocalStore, uid: str, case_id: str):
        self.store, self.uid, self.case_id = store, uid, case_id

    def load(self) -> str | None:
        case = self.store.get(self.uid, self.case_id)
        return case.upload_url if case is not None else None

    def save(self, url: str) -> None:
        self.store._set_upload_url(self.uid, self.case_id, url)

    def clear(self) -> None:
        self.store._set_upload_url(self.uid, self.case_id, None)


def _check_note(note: Any) -> dict[str, str] | None:
    if note is None:
        return None
    if not isinstance(note, Mapping) or set(note) - {"site", "text"}:
        raise StoreError("a note is a dict with 'site' and/or 'text' (see dermaloop.cases.note_record)")
    site, text = note.get("site"), note.get("text")
    if any(v is not None and not isinstance(v, str) for v in (site, text)):
        raise StoreError("a note's site and text are text")
    try:
        return cases.note_record(site, text)
    except cases.CaseError as exc:
        raise StoreError(str(exc)) from None


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_device(device: Any) -> dict[str, Any] | None:
    """The on-device result in the shape ``cases.device_record`` makes and the rules accept."""
    if device is None:
        return None
    if not isinstance(device, Mapping):
        raise StoreError("the device result must be a dict made by dermaloop.cases.device_record")
    extra = set(device) - _DEVICE_KEYS
    if extra:
        raise StoreError(f"the device result has fields the server does not take: {', '.join(sorted(extra))}")
    version = device.get("modelVersion")
    if not isinstance(version, str) or not 1 <= len(version) <= 100:
        raise StoreError("the device result must name its model version (1 to 100 characters)")
    if "at" not in device or not (_number(device["at"]) or device["at"] == cases.SERVER_TIMESTAMP):
        raise StoreError("the device result needs 'at' (ms, or the server timestamp)")
    if "risk" in device and device["risk"] not in _RISKS:
        raise StoreError(f"the device risk must be one of {', '.join(_RISKS)}")
    top = device.get("top", [])
    if not isinstance(top, list) or len(top) > 3 or not all(
            isinstance(t, Mapping) and isinstance(t.get("label"), str) and _number(t.get("p"))
            and 0 <= t["p"] <= 1 and isinstance(t.get("name", ""), str) for t in top):
        raise StoreError("the device top list holds at most 3 {label, name, p} with p between 0 and 1")
    quality = device.get("quality", {})
    if not isinstance(quality, Mapping) or not isinstance(quality.get("ok", False), bool):
        raise StoreError("the device quality is {ok: bool, issues: [...]}")
    box = device.get("box", [])
    if not isinstance(box, list) or not all(_number(v) for v in box):
        raise StoreError("the device box is a list of numbers")
    if "demonstration" in device and device["demonstration"] is not True:
        raise StoreError("the device demonstration mark is true or absent")
    if "unsure" in device and not isinstance(device["unsure"], bool):
        raise StoreError("the device unsure flag is a bool")
    labels = device.get("predictionSet", [])
    if not isinstance(labels, list) or len(labels) > cases.MAX_PREDICTION_SET or not all(
            isinstance(label, str) and 1 <= len(label) <= 64 for label in labels):
        raise StoreError(f"the device prediction set lists at most {cases.MAX_PREDICTION_SET} class ids")
    return json.loads(json.dumps(device))  # a plain copy, as it will be stored


def _positive(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise StoreError(f"the photo's {name} must be a positive whole number of pixels, not {value!r}")
    return value


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class LocalStore:
    """The device's store under ``root`` (made if missing, readable by this user only).

    Close it with :meth:`close` (or use it as a context manager). Methods taking ``uid`` only ever
    see that user's rows, so one phone can be shared by several patients one after the other."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.root / IMAGES_DIR).mkdir(exist_ok=True, mode=0o700)
        self._lock = threading.RLock()
        path = self.root / DB_FILE
        fresh = not path.exists()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        if fresh:
            with contextlib.suppress(OSError):
                os.chmod(path, 0o600)  # it holds the refresh token
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        # One device-wide session from before sessions were kept per browser: no browser can claim it.
        self._db.execute("DELETE FROM settings WHERE key = 'session'")
        self._db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
        self._lock_handle = self._open_lock()
        self._closed = False

    # ---- life cycle ---------------------------------------------------------------------------
    def _open_lock(self) -> Any:
        """Hold a shared lock on the folder; whoever opens it alone first removes crash leftovers
        (a photo renamed into place whose row never committed, temporary files)."""
        handle = open(self.root / _LOCK_FILE, "a+b")  # noqa: SIM115 - held open for the store's life
        if fcntl is None:
            self._remove_leftovers()
            return handle
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pass  # another instance has the folder open: its files may be mid-write, leave them
        else:
            self._remove_leftovers()
        fcntl.flock(handle.fileno(), fcntl.LOCK_SH)
        return handle

    def _remove_leftovers(self) -> None:
        known = {row[0] for row in self._db.execute("SELECT image_file FROM cases WHERE image_file IS NOT NULL")}
        images = self.root / IMAGES_DIR
        for folder in images.iterdir():
            if not folder.is_dir():
                continue
            for entry in folder.iterdir():
                if entry.relative_to(self.root).as_posix() not in known:
                    entry.unlink(missing_ok=True)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._db.close()
            self._lock_handle.close()

    def __enter__(self) -> LocalStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _user_images(self, uid: str) -> Path:
        return self.root / IMAGES_DIR / hashlib.sha256(uid.encode()).hexdigest()[:24]

    # ---- cases ---------------------------------------------------------------------------------
    def add_case(self, uid: str, image: bytes, *, content_type: str | None = None, width: int | None = None,
                 height: int | None = None, device: Mapping[str, Any] | None = None,
                 note: Mapping[str, str] | None = None, research_consent: bool = False, sent_anyway: bool = False,
                 same_lesion_as: str | None = None, status: str | None = None, case_id: str | None = None,
                 created_at: int | None = None) -> LocalCase:
        """Keep a new case: the photo file, then its row, or nothing at all.

        ``content_type``, ``width`` and ``height`` are read from the photo when not given.
        ``status`` defaults to ``diagnosed_on_device`` with a ``device`` result, else ``captured``.
        ``case_id`` (default: a new push id, fixed here for the case's whole life, so a case can
        never be created twice on the server) and ``created_at`` (ms) are for restores and tests.
        Raises :class:`StoreError` for input the case domain or the rules would refuse."""
        from dermaloop.database import new_push_id

        uid = _key("uid", uid)
        case_id = _key("caseId", case_id) if case_id is not None else new_push_id()
        data = bytes(image)
        if not data:
            raise StoreError("the photo is empty (0 bytes)")
        if content_type is None or width is None or height is None:
            from dermaloop.submit_cli import SubmitError, describe_image

            try:
                found = describe_image(data)
            except SubmitError as exc:
                raise StoreError(str(exc)) from None
            content_type = content_type or found[0]
            width = found[1] if width is None else width
            height = found[2] if height is None else height
        width, height = _positive("width", width), _positive("height", height)
        digest = hashlib.sha256(data).hexdigest()
        try:
            cases.image_record(uid, case_id, digest, content_type, len(data), width, height)
        except cases.CaseError as exc:
            raise StoreError(str(exc)) from None
        note = _check_note(note)
        device = _check_device(device)
        status = _status(status or (Status.DIAGNOSED_ON_DEVICE if device else Status.CAPTURED))
        if status not in (Status.CAPTURED, Status.DIAGNOSED_ON_DEVICE):
            raise StoreError(f"a new case starts as captured or diagnosed_on_device, not {status.value}")
        if same_lesion_as is not None:
            same_lesion_as = _key("caseId", same_lesion_as)
            if self.get(uid, same_lesion_as) is None:
                raise StoreError(f"there is no earlier case {same_lesion_as} to link this one to")
        now = _now_ms()
        created_at = now if created_at is None else int(created_at)

        folder = self._user_images(uid)
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        token = secrets.token_hex(4)
        final = folder / f"{case_id}.{token}{_EXTENSIONS[content_type]}"
        temp = folder / f".{case_id}.{token}.tmp"
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, final)
            _fsync_dir(folder)
            row = {
                "uid": uid, "case_id": case_id, "created_at": created_at, "status": status.value,
                "image_file": final.relative_to(self.root).as_posix(), "content_type": content_type,
                "sha256": digest, "bytes": len(data), "width": width, "height": height,
                "device": _json(device), "note": _json(note), "research_consent": int(bool(research_consent)),
                "sent_anyway": int(bool(sent_anyway)), "same_lesion_as": same_lesion_as, "updated_at": now,
            }
            columns = ", ".join(row)
            try:
                with self._transaction() as db:
                    db.execute(f"INSERT INTO cases ({columns}) VALUES ({', '.join('?' * len(row))})",
                               tuple(row.values()))
            except sqlite3.IntegrityError:
                raise StoreError(f"case {case_id} already exists on this device") from None
        except BaseException:
            temp.unlink(missing_ok=True)
            final.unlink(missing_ok=True)
            raise
        case = self.get(uid, case_id)
        assert case is not None
        return case

    def _case(self, row: sqlite3.Row) -> LocalCase:
        return LocalCase(
            case_id=row["case_id"], uid=row["uid"], created_at=row["created_at"], status=Status(row["status"]),
            image_path=None if row["image_file"] is None else self.root / row["image_file"],
            content_type=row["content_type"], sha256=row["sha256"], bytes=row["bytes"], width=row["width"],
            height=row["height"], device=_unjson(row["device"]), note=_unjson(row["note"]),
            research_consent=bool(row["research_consent"]), sent_anyway=bool(row["sent_anyway"]),
            same_lesion_as=row["same_lesion_as"], upload_url=row["upload_url"], last_error=row["last_error"],
            remote=_unjson(row["remote"]), updated_at=row["updated_at"])

    def _query(self, sql: str, *args: Any) -> list[LocalCase]:
        with self._lock:
            return [self._case(row) for row in self._db.execute(sql, args).fetchall()]

    def get(self, uid: str, case_id: str) -> LocalCase | None:
        found = self._query("SELECT * FROM cases WHERE uid = ? AND case_id = ?", uid, case_id)
        return found[0] if found else None

    def cases(self, uid: str) -> list[LocalCase]:
        """The user's cases, newest first (made here or, once seen on the server, elsewhere)."""
        return self._query("SELECT * FROM cases WHERE uid = ? ORDER BY created_at DESC, case_id DESC", uid)

    def pending(self, uid: str) -> list[LocalCase]:
        """The user's cases that are not on the server yet, in the order they were made."""
        marks = ", ".join("?" * len(cases.LOCAL_STATUSES))
        return self._query(f"SELECT * FROM cases WHERE uid = ? AND status IN ({marks}) ORDER BY created_at, case_id",
                           uid, *sorted(cases.LOCAL_STATUSES))

    def image_bytes(self, case: LocalCase) -> bytes:
        """The photo's bytes (``FileNotFoundError`` if it is on the server only, or was lost)."""
        if case.image_path is None:
            raise FileNotFoundError(f"case {case.case_id} has no photo on this device")
        return case.image_path.read_bytes()

    def _update(self, uid: str, case_id: str, where: str = "", **fields: Any) -> bool:
        fields["updated_at"] = _now_ms()
        sets = ", ".join(f"{name} = ?" for name in fields)
        with self._transaction() as db:
            done = db.execute(f"UPDATE cases SET {sets} WHERE uid = ? AND case_id = ? {where}",
                              (*fields.values(), uid, case_id))
            return done.rowcount > 0

    def set_status(self, uid: str, case_id: str, status: str, *, last_error: str | None = None) -> bool:
        """Set the status (and the plain-words error, cleared when None); False if no such case."""
        return self._update(uid, case_id, status=_status(status).value, last_error=last_error)

    def mark_failed(self, uid: str, case_id: str, error: str) -> bool:
        """The case cannot be sent as it is: ``failed`` with ``error`` in words for the patient."""
        return self._update(uid, case_id, status=Status.FAILED.value, last_error=error, upload_url=None)

    def mark_queued(self, uid: str, case_id: str) -> bool:
        """The case and its job are on the server. Only moves a case that is still local, so a
        later status the server already reported is never taken back."""
        marks = ", ".join("?" * len(cases.LOCAL_STATUSES))
        fields = {"status": Status.QUEUED.value, "last_error": None, "updated_at": _now_ms()}
        with self._transaction() as db:
            done = db.execute(
                "UPDATE cases SET status = ?, last_error = ?, updated_at = ? "
                f"WHERE uid = ? AND case_id = ? AND status IN ({marks})",
                (*fields.values(), uid, case_id, *sorted(cases.LOCAL_STATUSES)))
            return done.rowcount > 0

    def retry(self, uid: str, case_id: str) -> bool:
        """Put a case that failed *on this device* (never reached the server) back in the queue."""
        case = self.get(uid, case_id)
        if case is None or case.status != Status.FAILED or case.remote is not None or case.image_path is None:
            return False
        status = Status.DIAGNOSED_ON_DEVICE if case.device else Status.CAPTURED
        return self._update(uid, case_id, "AND remote IS NULL", status=status.value, last_error=None)

    def upload_session(self, uid: str, case_id: str) -> RowSessionStore:
        """Where ``UserStorage.upload(session_store=...)`` keeps this case's session URL."""
        return RowSessionStore(self, uid, case_id)

    def _set_upload_url(self, uid: str, case_id: str, url: str | None) -> None:
        self._update(uid, case_id, upload_url=url)

    # ---- the server's copy -----------------------------------------------------------------------
    def apply_remote(self, uid: str, case_id: str, remote: Mapping[str, Any] | None) -> bool:
        """Take the server's copy of a case (None: not there). Its status wins over the local one;
        a case made on another device gets a row of its own (without a photo file here).
        Returns whether the row changed."""
        with self._lock:
            return self._apply_remote(uid, case_id, remote)

    def apply_remote_all(self, uid: str, value: Mapping[str, Any] | None) -> set[str]:
        """Take the server's copy of all of the user's cases (a full listing); a case the server
        no longer has keeps its row and loses its remote copy. Returns the ids that changed."""
        value = value if isinstance(value, Mapping) else {}
        changed = set()
        with self._lock:
            gone = {row[0] for row in self._db.execute(
                "SELECT case_id FROM cases WHERE uid = ? AND remote IS NOT NULL", (uid,))} - set(value)
            for case_id in sorted(gone):
                if self._apply_remote(uid, case_id, None):
                    changed.add(case_id)
            for case_id, remote in value.items():
                if self._apply_remote(uid, case_id, remote):
                    changed.add(case_id)
        return changed

    def _apply_remote(self, uid: str, case_id: str, remote: Any) -> bool:
        remote = dict(remote) if isinstance(remote, Mapping) else None
        current = self.get(uid, case_id)
        if current is None:
            if remote is None:
                return False
            try:
                _key("caseId", case_id)
            except StoreError:
                return False
            return self._insert_remote(uid, case_id, remote)
        if remote == current.remote:
            return False
        fields: dict[str, Any] = {"remote": _json(remote)}
        status = remote.get("status") if remote else None
        if status in _STATUS_VALUES and status != current.status:
            fields["status"] = status
            fields["last_error"] = None
        if remote is not None:
            fields["upload_url"] = None  # on the server: no upload left to resume
        return self._update(uid, case_id, **fields)

    def _insert_remote(self, uid: str, case_id: str, remote: dict[str, Any]) -> bool:
        image = remote.get("image") if isinstance(remote.get("image"), dict) else {}
        consent = remote.get("consent") if isinstance(remote.get("consent"), dict) else {}
        status = remote.get("status")
        created = remote.get("createdAt")
        now = _now_ms()
        row = {
            "uid": uid, "case_id": case_id, "created_at": created if isinstance(created, int) else now,
            "status": status if status in _STATUS_VALUES else Status.QUEUED.value,
            "image_file": None, "content_type": str(image.get("contentType") or ""),
            "sha256": str(image.get("sha256") or ""), "bytes": int(image.get("bytes") or 0),
            "width": int(image.get("width") or 0), "height": int(image.get("height") or 0),
            "device": _json(remote.get("device")), "note": _json(remote.get("note")),
            "research_consent": int(consent.get("research") is True), "sent_anyway": 0, "same_lesion_as": None,
            "remote": _json(remote), "updated_at": now,
        }
        with self._transaction() as db:
            db.execute(f"INSERT OR IGNORE INTO cases ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                       tuple(row.values()))
        return True

    # ---- chat ----------------------------------------------------------------------------------
    def replace_messages(self, uid: str, case_id: str, messages: Mapping[str, Any] | None) -> None:
        """Keep the server's messages of one case (``{msgId: message}``; None: none)."""
        with self._transaction() as db:
            db.execute("DELETE FROM messages WHERE uid = ? AND case_id = ?", (uid, case_id))
            self._insert_messages(db, uid, case_id, messages)

    def replace_all_messages(self, uid: str, value: Mapping[str, Any] | None) -> None:
        """Keep the server's messages of all of the user's cases (``{caseId: {msgId: message}}``)."""
        with self._transaction() as db:
            db.execute("DELETE FROM messages WHERE uid = ?", (uid,))
            for case_id, messages in (value or {}).items():
                self._insert_messages(db, uid, case_id, messages)

    @staticmethod
    def _insert_messages(db: sqlite3.Connection, uid: str, case_id: str, messages: Any) -> None:
        if not isinstance(messages, Mapping):
            return
        for msg_id, message in messages.items():
            if not isinstance(message, Mapping):
                continue
            at = message.get("at")
            db.execute("INSERT OR REPLACE INTO messages VALUES (?, ?, ?, ?, ?, ?)",
                       (uid, case_id, str(msg_id), at if isinstance(at, int) else 0,
                        message.get("senderRole"), _json(dict(message))))
            # An answer lost on the way: the server has it, so it is sent.
            db.execute("DELETE FROM outbox WHERE uid = ? AND case_id = ? AND msg_id = ?", (uid, case_id, str(msg_id)))

    def messages(self, uid: str, case_id: str) -> list[dict[str, Any]]:
        """The case's messages, oldest first, each with its ``id``."""
        with self._lock:
            rows = self._db.execute("SELECT msg_id, data FROM messages WHERE uid = ? AND case_id = ? "
                                    "ORDER BY at, msg_id", (uid, case_id)).fetchall()
        return [{**json.loads(data), "id": msg_id} for msg_id, data in rows]

    def mark_read(self, uid: str, case_id: str, at: int | None = None) -> int:
        """Remember the chat as read up to ``at`` (default: its newest message); returns the mark.
        A mark never moves back."""
        with self._transaction() as db:
            if at is None:
                at = db.execute("SELECT COALESCE(MAX(at), 0) FROM messages WHERE uid = ? AND case_id = ?",
                                (uid, case_id)).fetchone()[0]
            db.execute("INSERT INTO read_marks VALUES (?, ?, ?) ON CONFLICT (uid, case_id) "
                       "DO UPDATE SET last_read_at = MAX(last_read_at, excluded.last_read_at)",
                       (uid, case_id, int(at)))
            return db.execute("SELECT last_read_at FROM read_marks WHERE uid = ? AND case_id = ?",
                              (uid, case_id)).fetchone()[0]

    def last_read(self, uid: str, case_id: str) -> int:
        with self._lock:
            row = self._db.execute("SELECT last_read_at FROM read_marks WHERE uid = ? AND case_id = ?",
                                   (uid, case_id)).fetchone()
        return row[0] if row else 0

    def unread(self, uid: str, case_id: str) -> int:
        """Dermatologist messages newer than the read mark."""
        with self._lock:
            return self._db.execute(
                "SELECT COUNT(*) FROM messages WHERE uid = ? AND case_id = ? AND sender_role = ? AND at > "
                "COALESCE((SELECT last_read_at FROM read_marks WHERE uid = ? AND case_id = ?), 0)",
                (uid, case_id, cases.DERMATOLOGIST, uid, case_id)).fetchone()[0]

    # ---- signed-in sessions, one per browser ---------------------------------------------------------
    @staticmethod
    def _key_hash(key: Any) -> str:
        if not isinstance(key, str) or not 16 <= len(key) <= 200:
            raise StoreError("a browser's sign-in key is a random text of 16 to 200 characters")
        return hashlib.sha256(key.encode()).hexdigest()

    def save_session(self, key: str, data: Mapping[str, Any]) -> None:
        """Keep ``UserSession.to_dict()`` under one browser's random ``key``, so that browser comes
        back signed in after a reload or an app restart. Only the key's hash is kept: the key lives
        in the browser, the session (with its refresh token: the database file is readable by this
        user only) here, and neither is any use without the other. Pass it as the session's
        ``on_change`` so renewed tokens are kept too."""
        key_hash = self._key_hash(key)
        if not isinstance(data, Mapping) or not isinstance(data.get("uid"), str):
            raise StoreError("a session to save is UserSession.to_dict()")
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO sessions VALUES (?, ?, ?, ?)",
                       (key_hash, data["uid"], _json(dict(data)), _now_ms()))

    def load_session(self, key: str) -> dict[str, Any] | None:
        """The session saved under ``key``, for ``AuthClient.restore`` (None: that browser is not
        signed in, or the key is not one this device made)."""
        try:
            key_hash = self._key_hash(key)
        except StoreError:
            return None
        with self._lock:
            row = self._db.execute("SELECT data FROM sessions WHERE key_hash = ?", (key_hash,)).fetchone()
        return None if row is None else json.loads(row[0])

    def forget_session(self, key: str) -> None:
        """Sign one browser out on this device (the others stay signed in)."""
        try:
            key_hash = self._key_hash(key)
        except StoreError:
            return
        with self._transaction() as db:
            db.execute("DELETE FROM sessions WHERE key_hash = ?", (key_hash,))

    # ---- chat messages waiting to be sent -------------------------------------------------------
    def queue_message(self, uid: str, case_id: str, msg_id: str, record: Mapping[str, Any]) -> None:
        """Keep a message the patient wrote until the server has it. ``msg_id`` is made once, here
        on the device, so however often it is sent there is one message."""
        _key("uid", uid)
        _key("caseId", case_id)
        _key("caseId", msg_id)  # a push id, like a case id
        if not isinstance(record, Mapping) or not isinstance(record.get("text"), str):
            raise StoreError("a message to send is cases.message_record(...)")
        with self._transaction() as db:
            db.execute("INSERT OR IGNORE INTO outbox VALUES (?, ?, ?, ?, ?, NULL)",
                       (uid, case_id, msg_id, _now_ms(), _json(dict(record))))

    def outbox(self, uid: str, case_id: str | None = None, *, failed: bool | None = None) -> list[dict[str, Any]]:
        """The user's messages not on the server yet, oldest first: ``{"case_id", "id", "record",
        "created_at", "error"}``. ``failed``: only those the server refused (True) or not (False)."""
        sql = "SELECT case_id, msg_id, created_at, record, last_error FROM outbox WHERE uid = ?"
        args: list[Any] = [uid]
        if case_id is not None:
            sql += " AND case_id = ?"
            args.append(case_id)
        if failed is not None:
            sql += " AND last_error IS NOT NULL" if failed else " AND last_error IS NULL"
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY created_at, msg_id", args).fetchall()
        return [{"case_id": c, "id": m, "created_at": at, "record": json.loads(r), "error": e}
                for c, m, at, r, e in rows]

    def message_sent(self, uid: str, case_id: str, msg_id: str) -> None:
        """The server has the message: it leaves the outbox."""
        with self._transaction() as db:
            db.execute("DELETE FROM outbox WHERE uid = ? AND case_id = ? AND msg_id = ?", (uid, case_id, msg_id))

    def message_refused(self, uid: str, case_id: str, msg_id: str, error: str) -> None:
        """The server refused the message for good: it stays, marked, so the patient sees it was
        not sent (it is not tried again)."""
        with self._transaction() as db:
            db.execute("UPDATE outbox SET last_error = ? WHERE uid = ? AND case_id = ? AND msg_id = ?",
                       (error, uid, case_id, msg_id))

    # ---- forgetting a user -------------------------------------------------------------------------
    def remove_user(self, uid: str) -> None:
        """Forget everything of ``uid`` on this device: rows, photos, chat, unsent messages, read
        marks, and their sessions in every browser. Rows go first: a crash before the files are
        gone leaves files without rows, which the next start deletes."""
        with self._transaction() as db:
            for table in ("cases", "messages", "read_marks", "outbox", "sessions"):
                db.execute(f"DELETE FROM {table} WHERE uid = ?", (uid,))
        shutil.rmtree(self._user_images(uid), ignore_errors=True)
