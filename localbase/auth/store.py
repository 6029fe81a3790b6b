"""Auth accounts in SQLite: users, scrypt password hashes, refresh tokens, deletion tombstones.

Refresh tokens are random and opaque (only their SHA-256 is stored), unlike the official emulator's
base64 JSON, so a refresh token cannot be forged from a uid. Deleted uids leave a tombstone, so ID
tokens a deleted user still holds are refused by the rules of the other services, while tokens that
tests mint for uids Auth never knew keep working (the RTDB tests rely on that).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

# scrypt cost: 16 MiB of memory and tens of milliseconds per hash on a small server.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
_PUSH_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    uid TEXT PRIMARY KEY,
    email TEXT UNIQUE,
    password_hash BLOB,
    salt BLOB,
    display_name TEXT,
    photo_url TEXT,
    phone_number TEXT,
    email_verified INTEGER NOT NULL DEFAULT 0,
    disabled INTEGER NOT NULL DEFAULT 0,
    custom_attributes TEXT,
    provider TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    last_login_at INTEGER,
    last_refresh_at INTEGER,
    password_updated_at INTEGER,
    valid_since INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS refresh_tokens (
    token_sha256 TEXT PRIMARY KEY,
    uid TEXT NOT NULL,
    provider TEXT NOT NULL,
    extra_claims TEXT NOT NULL DEFAULT '{}',
    created_at INTEGER NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS refresh_tokens_uid ON refresh_tokens(uid);
CREATE TABLE IF NOT EXISTS deleted_users (uid TEXT PRIMARY KEY, deleted_at INTEGER NOT NULL);
"""

USER_COLUMNS = (
    "uid", "email", "password_hash", "salt", "display_name", "photo_url", "phone_number", "email_verified",
    "disabled", "custom_attributes", "provider", "created_at", "last_login_at", "last_refresh_at",
    "password_updated_at", "valid_since",
)


def hash_password(password: str, salt: bytes | None = None) -> tuple[bytes, bytes]:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    return digest, salt


def check_password(password: str, digest: bytes | None, salt: bytes | None) -> bool:
    if not digest or not salt:
        return False
    return hmac.compare_digest(hash_password(password, salt)[0], digest)


def new_uid() -> str:
    return "".join(secrets.choice(_PUSH_CHARS) for _ in range(28))


def now_ms() -> int:
    return int(time.time() * 1000)


class AuthStore:
    """All account state; safe to call from several threads (one connection, one lock)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(refresh_tokens)")}
            if "revoked" not in columns:  # a data directory from before revocation was recorded
                self._db.execute("ALTER TABLE refresh_tokens ADD COLUMN revoked INTEGER NOT NULL DEFAULT 0")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # reads -----------------------------------------------------------------------------------
    def get(self, uid: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM users WHERE uid = ?", (uid,)).fetchone()
        return dict(row) if row else None

    def by_email(self, email: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM users WHERE email = ?", (email.lower(),)).fetchone()
        return dict(row) if row else None

    def by_phone(self, phone: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM users WHERE phone_number = ?", (phone,)).fetchone()
        return dict(row) if row else None

    def page(self, after: str, limit: int) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM users WHERE uid > ? ORDER BY uid LIMIT ?", (after, limit)
            ).fetchall()
        return [dict(r) for r in rows]

    def is_deleted(self, uid: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM deleted_users WHERE uid = ?", (uid,)).fetchone() is not None

    # writes ----------------------------------------------------------------------------------
    def create(self, fields: dict[str, Any]) -> dict[str, Any]:
        """Insert a user; raises KeyError('uid'|'email') on a duplicate."""
        now = now_ms()
        row = {c: None for c in USER_COLUMNS}
        row.update(email_verified=0, disabled=0, created_at=now, valid_since=now // 1000)
        row.update(fields)
        if row["email"]:
            row["email"] = row["email"].lower()
        with self._lock:
            if self.get(row["uid"]):
                raise KeyError("uid")
            if row["email"] and self.by_email(row["email"]):
                raise KeyError("email")
            self._db.execute(
                f"INSERT INTO users ({', '.join(USER_COLUMNS)}) VALUES ({', '.join('?' * len(USER_COLUMNS))})",
                [row[c] for c in USER_COLUMNS],
            )
            self._db.execute("DELETE FROM deleted_users WHERE uid = ?", (row["uid"],))
        return row

    def update(self, uid: str, changes: dict[str, Any]) -> dict[str, Any]:
        """Apply column changes; raises KeyError('email') if the new email belongs to someone else."""
        unknown = set(changes) - set(USER_COLUMNS)
        if unknown:
            raise ValueError(f"unknown columns {unknown}")
        with self._lock:
            if changes.get("email"):
                changes["email"] = changes["email"].lower()
                other = self.by_email(changes["email"])
                if other and other["uid"] != uid:
                    raise KeyError("email")
            if changes:
                sets = ", ".join(f"{c} = ?" for c in changes)
                self._db.execute(f"UPDATE users SET {sets} WHERE uid = ?", [*changes.values(), uid])
            user = self.get(uid)
        if user is None:
            raise LookupError(uid)
        return user

    def delete(self, uid: str) -> bool:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                gone = self._db.execute("DELETE FROM users WHERE uid = ?", (uid,)).rowcount > 0
                self._db.execute("DELETE FROM refresh_tokens WHERE uid = ?", (uid,))
                if gone:
                    self._db.execute(
                        "INSERT OR REPLACE INTO deleted_users (uid, deleted_at) VALUES (?, ?)", (uid, now_ms())
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return gone

    def clear(self) -> None:
        """The emulator's reset: every account and token goes (no tombstones: a fresh start)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            for table in ("users", "refresh_tokens", "deleted_users"):
                self._db.execute(f"DELETE FROM {table}")
            self._db.execute("COMMIT")

    # refresh tokens --------------------------------------------------------------------------
    def issue_refresh_token(self, uid: str, provider: str, extra_claims: dict[str, Any] | None = None) -> str:
        token = "lb1." + base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
        with self._lock:
            self._db.execute(
                "INSERT INTO refresh_tokens (token_sha256, uid, provider, extra_claims, created_at) VALUES (?,?,?,?,?)",
                (_sha(token), uid, provider, json.dumps(extra_claims or {}), int(time.time())),
            )
        return token

    def refresh_token_info(self, token: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM refresh_tokens WHERE token_sha256 = ?", (_sha(token),)).fetchone()
        return dict(row) if row else None

    def revoke_refresh_tokens(self, uid: str) -> None:
        """Every refresh token the user holds stops working (kept, marked, so a refresh with one is
        answered TOKEN_EXPIRED, as production answers, rather than INVALID_REFRESH_TOKEN)."""
        with self._lock:
            self._db.execute("UPDATE refresh_tokens SET revoked = 1 WHERE uid = ?", (uid,))


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
