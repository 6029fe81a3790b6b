"""Objects and resumable upload sessions: blob files on disk, metadata in SQLite.

Durability: an object's bytes are written to a temporary file, fsynced, renamed into ``blobs/`` under
a fresh random name and only then is the metadata row committed (SQLite WAL, ``synchronous=FULL``).
A crash before the commit leaves at most an unreferenced file, swept at start-up, so an object is
either fully there or not there at all; a half-written upload is never visible. Blob files are
immutable: an overwrite writes a new file and removes the old one after the commit.

Resumable sessions keep their bytes in ``uploads/<id>`` (fsynced before the server reports them as
persisted), so a session can be resumed after a broken connection or a server restart. Unfinished
sessions older than the session lifetime are removed at start-up and by :meth:`ObjectStore.expire_sessions`,
which the service runs periodically.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import shutil
import sqlite3
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c

# Object fields settable by clients (GCS JSON names -> column).
SETTABLE = {
    "contentType": "content_type",
    "cacheControl": "cache_control",
    "contentDisposition": "content_disposition",
    "contentEncoding": "content_encoding",
    "contentLanguage": "content_language",
    "customTime": "custom_time",
}
TOKENS_KEY = "firebaseStorageDownloadTokens"
MAX_NAME_BYTES = 1024
SESSION_TTL_MS = 7 * 24 * 3600 * 1000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    bucket TEXT NOT NULL,
    name TEXT NOT NULL,
    generation INTEGER NOT NULL,
    metageneration INTEGER NOT NULL,
    size INTEGER NOT NULL,
    md5 TEXT NOT NULL,
    crc32c TEXT NOT NULL,
    blob TEXT NOT NULL,
    time_created INTEGER NOT NULL,
    updated INTEGER NOT NULL,
    metadata TEXT NOT NULL DEFAULT '{}',
    download_tokens TEXT,
    content_type TEXT,
    cache_control TEXT,
    content_disposition TEXT,
    content_encoding TEXT,
    content_language TEXT,
    custom_time TEXT,
    PRIMARY KEY (bucket, name)
);
CREATE TABLE IF NOT EXISTS uploads (
    upload_id TEXT PRIMARY KEY,
    api TEXT NOT NULL,
    bucket TEXT NOT NULL,
    name TEXT NOT NULL,
    resource TEXT NOT NULL,
    declared_size INTEGER,
    preconditions TEXT NOT NULL DEFAULT '{}',
    auth TEXT,
    created INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'active',
    generation INTEGER,
    holder TEXT
);
"""


class PreconditionFailed(Exception):
    pass


class NotFound(Exception):
    pass


class InvalidName(ValueError):
    pass


def validate_name(name: str) -> str:
    """Reject names Cloud Storage refuses, plus ``.``/``..`` segments (no path tricks in rules)."""
    if not name:
        raise InvalidName("Object name must not be empty.")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise InvalidName(f"Object name is longer than {MAX_NAME_BYTES} bytes.")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise InvalidName("Object name contains a control character.")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidName("Object name is not valid UTF-8.") from None
    if any(seg in (".", "..") for seg in name.split("/")):
        raise InvalidName("Object name contains a '.' or '..' path segment.")
    if name.startswith(".well-known/acme-challenge/"):
        raise InvalidName("Object name must not start with .well-known/acme-challenge/.")
    return name


@dataclass
class Digest:
    size: int
    md5: str  # base64
    crc32c: str  # base64 of the big-endian uint32

    @property
    def crc32c_int(self) -> int:
        return struct.unpack(">I", base64.b64decode(self.crc32c))[0]


def digest_file(path: Path) -> Digest:
    md5 = hashlib.md5()
    crc = google_crc32c.Checksum()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1024 * 1024):
            md5.update(chunk)
            crc.update(chunk)
            size += len(chunk)
    return Digest(size, base64.b64encode(md5.digest()).decode(), base64.b64encode(crc.digest()).decode())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_preconditions(row: dict[str, Any] | None, pre: dict[str, int]) -> None:
    generation = row["generation"] if row else 0
    if "ifGenerationMatch" in pre and pre["ifGenerationMatch"] != generation:
        raise PreconditionFailed("ifGenerationMatch")
    if "ifGenerationNotMatch" in pre and pre["ifGenerationNotMatch"] == generation:
        raise PreconditionFailed("ifGenerationNotMatch")
    if "ifMetagenerationMatch" in pre and (row is None or pre["ifMetagenerationMatch"] != row["metageneration"]):
        raise PreconditionFailed("ifMetagenerationMatch")
    if "ifMetagenerationNotMatch" in pre and row is not None and pre["ifMetagenerationNotMatch"] == row["metageneration"]:
        raise PreconditionFailed("ifMetagenerationNotMatch")


class ObjectStore:
    def __init__(self, root: Path, session_ttl_ms: int = SESSION_TTL_MS):
        self.root = root
        self.session_ttl_ms = session_ttl_ms
        self.blobs = root / "blobs"
        self.tmp = root / "tmp"
        self.parts = root / "uploads"
        for d in (self.blobs, self.tmp, self.parts):
            d.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(root / "storage.sqlite3"), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        if "holder" not in {r[1] for r in self._db.execute("PRAGMA table_info(uploads)")}:
            self._db.execute("ALTER TABLE uploads ADD COLUMN holder TEXT")  # a store from before quotas
        self._db.execute("CREATE INDEX IF NOT EXISTS uploads_holder ON uploads(holder, state)")
        self._last_generation = self._db.execute("SELECT COALESCE(MAX(generation), 0) FROM objects").fetchone()[0]
        self._sweep()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _sweep(self) -> None:
        """Remove what a crash can leave behind: temp files and blobs no row references."""
        for leftover in self.tmp.iterdir():
            leftover.unlink(missing_ok=True)
        referenced = {r[0] for r in self._db.execute("SELECT blob FROM objects")}
        for blob in self.blobs.iterdir():
            if blob.name not in referenced:
                blob.unlink(missing_ok=True)
        self.expire_sessions()

    def expire_sessions(self) -> int:
        """Remove unfinished resumable sessions older than the session lifetime (a week by default,
        as Cloud Storage's; a day in secure mode) and their bytes, and finished sessions' records
        after a day. Returns how many unfinished sessions went."""
        now = int(time.time() * 1000)
        with self._lock:
            expired = self._db.execute("DELETE FROM uploads WHERE state = 'active' AND created < ?",
                                       (now - self.session_ttl_ms,)).rowcount
            self._db.execute("DELETE FROM uploads WHERE state != 'active' AND created < ?",
                             (now - min(self.session_ttl_ms, 24 * 3600 * 1000),))
            sessions = {r[0] for r in self._db.execute("SELECT upload_id FROM uploads WHERE state = 'active'")}
        for part in self.parts.iterdir():
            if part.name not in sessions:
                part.unlink(missing_ok=True)
        return expired

    # ---- objects --------------------------------------------------------------------------------
    def get(self, bucket: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM objects WHERE bucket = ? AND name = ?", (bucket, name)).fetchone()
        return dict(row) if row else None

    def blob_path(self, row: dict[str, Any]) -> Path:
        return self.blobs / row["blob"]

    def temp_path(self) -> Path:
        return self.tmp / uuid.uuid4().hex

    def _next_generation(self) -> int:
        self._last_generation = max(int(time.time() * 1_000_000), self._last_generation + 1)
        return self._last_generation

    def prepare_blob(self, temp: Path) -> tuple[str, Digest]:
        """Hash, fsync and move a finished temp file into ``blobs/`` (slow: run it in a thread)."""
        digest = digest_file(temp)
        with open(temp, "rb+") as fh:
            os.fsync(fh.fileno())
        blob = uuid.uuid4().hex
        os.replace(temp, self.blobs / blob)
        _fsync_dir(self.blobs)
        return blob, digest

    def commit(
        self,
        bucket: str,
        name: str,
        blob: str,
        digest: Digest,
        fields: dict[str, Any],
        preconditions: dict[str, int] | None = None,
        new_download_token: bool = False,
    ) -> dict[str, Any]:
        """Make a prepared blob the live object ``name``; on failure the blob is removed."""
        metadata = dict(fields.get("metadata") or {})
        tokens = metadata.pop(TOKENS_KEY, None)
        if tokens is None and new_download_token:
            tokens = str(uuid.uuid4())
        now = int(time.time() * 1000)
        try:
            with self._lock:
                old = self.get(bucket, name)
                check_preconditions(old, preconditions or {})
                row = {
                    "bucket": bucket, "name": name, "generation": self._next_generation(), "metageneration": 1,
                    "size": digest.size, "md5": digest.md5, "crc32c": digest.crc32c, "blob": blob,
                    "time_created": now, "updated": now, "metadata": json.dumps(metadata),
                    "download_tokens": tokens or None,
                }
                for key, column in SETTABLE.items():
                    row[column] = fields.get(key)
                columns = list(row)
                self._db.execute(
                    f"INSERT OR REPLACE INTO objects ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                    [row[c] for c in columns],
                )
        except BaseException:
            (self.blobs / blob).unlink(missing_ok=True)
            raise
        if old is not None:
            self.blob_path(old).unlink(missing_ok=True)
        return row

    def patch(self, bucket: str, name: str, changes: dict[str, Any], preconditions: dict[str, int] | None = None,
              replace: bool = False) -> dict[str, Any]:
        """Update metadata (``None`` deletes a field or a custom key); bumps the metageneration."""
        with self._lock:
            row = self.get(bucket, name)
            if row is None:
                raise NotFound(name)
            check_preconditions(row, preconditions or {})
            updates: dict[str, Any] = {}
            if replace:
                updates.update({column: None for column in SETTABLE.values()})
                updates["metadata"] = "{}"
            for key, column in SETTABLE.items():
                if key in changes:
                    value = changes[key]
                    updates[column] = str(value) if value not in (None, "") else None
            if "metadata" in changes:
                current = {} if replace else json.loads(row["metadata"])
                new = changes["metadata"] or {}
                if not isinstance(new, dict):
                    raise ValueError("metadata must be an object")
                tokens = row["download_tokens"]
                for key, value in new.items():
                    if key == TOKENS_KEY:
                        tokens = str(value) if value else None
                    elif value is None:
                        current.pop(key, None)
                    else:
                        current[key] = str(value)
                updates["metadata"] = json.dumps(current)
                updates["download_tokens"] = tokens
            updates["metageneration"] = row["metageneration"] + 1
            updates["updated"] = int(time.time() * 1000)
            sets = ", ".join(f"{c} = ?" for c in updates)
            self._db.execute(f"UPDATE objects SET {sets} WHERE bucket = ? AND name = ?", [*updates.values(), bucket, name])
            return self.get(bucket, name)  # type: ignore[return-value]

    def ensure_download_token(self, row: dict[str, Any]) -> dict[str, Any]:
        if row["download_tokens"]:
            return row
        with self._lock:
            token = str(uuid.uuid4())
            self._db.execute(
                "UPDATE objects SET download_tokens = ? WHERE bucket = ? AND name = ? AND generation = ?",
                (token, row["bucket"], row["name"], row["generation"]),
            )
            return self.get(row["bucket"], row["name"]) or row

    def set_download_tokens(self, row: dict[str, Any], tokens: list[str]) -> dict[str, Any]:
        with self._lock:
            self._db.execute(
                "UPDATE objects SET download_tokens = ? WHERE bucket = ? AND name = ?",
                (",".join(tokens) or None, row["bucket"], row["name"]),
            )
            return self.get(row["bucket"], row["name"]) or row

    def delete(self, bucket: str, name: str, preconditions: dict[str, int] | None = None) -> None:
        with self._lock:
            row = self.get(bucket, name)
            if row is None:
                raise NotFound(name)
            check_preconditions(row, preconditions or {})
            self._db.execute("DELETE FROM objects WHERE bucket = ? AND name = ?", (bucket, name))
        self.blob_path(row).unlink(missing_ok=True)

    def copy_blob(self, row: dict[str, Any]) -> Path:
        """A private copy of an object's bytes as a temp file (slow: run it in a thread)."""
        temp = self.temp_path()
        shutil.copyfile(self.blob_path(row), temp)
        return temp

    def iter_names(self, bucket: str, prefix: str, after: str) -> Iterator[dict[str, Any]]:
        """Objects with ``prefix`` whose name sorts after ``after``, in name order (in batches)."""
        start = max(prefix, after)
        inclusive = after == "" or prefix > after
        while True:
            op = ">=" if inclusive else ">"
            with self._lock:
                rows = self._db.execute(
                    f"SELECT * FROM objects WHERE bucket = ? AND name {op} ? ORDER BY name LIMIT 500", (bucket, start)
                ).fetchall()
            if not rows:
                return
            for row in rows:
                if not row["name"].startswith(prefix):
                    return
                yield dict(row)
            start, inclusive = rows[-1]["name"], False

    def list(self, bucket: str, prefix: str, delimiter: str, page_token: str, limit: int) -> tuple[list, list, str | None]:
        """(objects, prefixes, next page token) in GCS order; prefixes count toward ``limit``."""
        state = _decode_token(page_token)
        after, skip = state.get("after", ""), state.get("skip", "")
        items: list[dict[str, Any]] = []
        prefixes: list[str] = []
        emitted = 0
        last = None
        for row in self.iter_names(bucket, prefix, after):
            name = row["name"]
            if skip and name.startswith(skip):
                continue
            rollup = None
            if delimiter:
                cut = name.find(delimiter, len(prefix))
                if cut >= 0:
                    rollup = name[: cut + len(delimiter)]
            if emitted == limit:
                return items, prefixes, _encode_token(last)
            if rollup is not None:
                prefixes.append(rollup)
                skip = rollup
                last = {"after": name, "skip": rollup}
            else:
                items.append(row)
                last = {"after": name, "skip": ""}
            emitted += 1
        return items, prefixes, None

    def buckets(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT DISTINCT bucket FROM objects ORDER BY bucket")]

    # ---- resumable sessions ---------------------------------------------------------------------
    def create_session(self, api: str, bucket: str, name: str, resource: dict[str, Any], declared_size: int | None,
                       preconditions: dict[str, int], auth: dict[str, Any] | None, holder: str | None = None) -> str:
        """A new resumable session; ``holder`` (``uid:<uid>`` or ``ip:<address>``) is whose quota it counts in."""
        upload_id = secrets.token_urlsafe(24)
        (self.parts / upload_id).touch()
        with self._lock:
            self._db.execute(
                "INSERT INTO uploads (upload_id, api, bucket, name, resource, declared_size, preconditions, auth,"
                " created, holder) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (upload_id, api, bucket, name, json.dumps(resource), declared_size, json.dumps(preconditions),
                 json.dumps(auth), int(time.time() * 1000), holder),
            )
        return upload_id

    def active_sessions(self, holder: str) -> list[str]:
        """Unfinished sessions of one holder, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT upload_id FROM uploads WHERE holder = ? AND state = 'active' "
                                    "ORDER BY created, rowid", (holder,)).fetchall()
        return [r[0] for r in rows]

    def session(self, upload_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM uploads WHERE upload_id = ?", (upload_id,)).fetchone()
        if row is None:
            return None
        session = dict(row)
        for key in ("resource", "preconditions", "auth"):
            session[key] = json.loads(session[key]) if session[key] else None
        part = self.parts / upload_id
        session["received"] = part.stat().st_size if part.exists() else 0
        return session

    def part_path(self, upload_id: str) -> Path:
        return self.parts / upload_id

    def end_session(self, upload_id: str, state: str, generation: int | None = None) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE uploads SET state = ?, generation = ? WHERE upload_id = ?", (state, generation, upload_id)
            )
        self.part_path(upload_id).unlink(missing_ok=True)

    def drop_session(self, upload_id: str) -> None:
        """Forget a session and its bytes (its URL then answers 404: the client starts over)."""
        with self._lock:
            self._db.execute("DELETE FROM uploads WHERE upload_id = ?", (upload_id,))
        self.part_path(upload_id).unlink(missing_ok=True)

    def take_part(self, upload_id: str) -> Path:
        """Move a finished session's bytes to a temp file, ready for :meth:`prepare_blob`."""
        temp = self.temp_path()
        os.replace(self.part_path(upload_id), temp)
        return temp


def _encode_token(state: dict[str, str] | None) -> str | None:
    if state is None:
        return None
    return base64.urlsafe_b64encode(json.dumps(state).encode()).decode()


def _decode_token(token: str) -> dict[str, str]:
    if not token:
        return {}
    try:
        state = json.loads(base64.urlsafe_b64decode(token.encode()))
    except ValueError:
        raise ValueError("Invalid page token.") from None
    if not isinstance(state, dict):
        raise ValueError("Invalid page token.")
    return {k: str(v) for k, v in state.items() if k in ("after", "skip")}
