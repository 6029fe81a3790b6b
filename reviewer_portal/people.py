"""What to call a colleague: a uid becomes the name they chose, read once per session.

Claims, reviews, the audit and the chat store uids (stable, and what the rules check), but "being
reviewed by 7fQ2x..." tells a dermatologist nothing. The readable name is ``/users/{uid}/displayName``,
which the rules let every dermatologist (and admin) read and only its user write. Nobody else keeps
that field up to date for staff, so a dermatologist's portal session publishes its own name on
sign-in (:func:`publish_own`): the Auth display name, else the email, never overwriting a name the
user set themself. :class:`Names` caches what it read per session (one GET per colleague, not per
redraw); a failed read shows the uid and is asked again a minute later.
"""

from __future__ import annotations

import threading
import time

from dermaloop import cases
from dermaloop.database import UserDatabase
from dermaloop.errors import ServiceError, Unauthenticated

RETRY_AFTER_S = 60.0
MAX_NAME_CHARS = 100  # database.rules.json: /users/{uid}/displayName is 1..100 characters


def _display_name_path(uid: str) -> str:
    return f"{cases.user_path(uid)}/displayName"


class Names:
    """uid -> display name for one signed-in session (thread-safe: redraws and clicks ask it)."""

    def __init__(self, db: UserDatabase) -> None:
        self.db = db
        self._known: dict[str, str | None] = {}
        self._failed: dict[str, float] = {}
        self._lock = threading.Lock()

    def remember(self, uid: str, name: str | None) -> None:
        with self._lock:
            self._known[uid] = name

    def of(self, uid: str | None) -> str:
        """The display name of ``uid``, or the uid itself when none is known (or it cannot be read now).
        Raises :class:`~dermaloop.errors.Unauthenticated` only: the session ended."""
        if not uid:
            return "someone"
        with self._lock:
            if uid in self._known:
                return self._known[uid] or uid
            if time.monotonic() - self._failed.get(uid, -RETRY_AFTER_S) < RETRY_AFTER_S:
                return uid
        try:
            value = self.db.get(_display_name_path(uid))
        except Unauthenticated:
            raise
        except (ServiceError, cases.CaseError):  # offline, refused, or not a valid key
            with self._lock:
                self._failed[uid] = time.monotonic()
            return uid
        name = value.strip() if isinstance(value, str) and value.strip() else None
        self.remember(uid, name)
        return name or uid


def publish_own(db: UserDatabase, uid: str, auth_name: str | None, email: str | None) -> str | None:
    """Make sure colleagues can read a name for ``uid``; returns the name now stored (None if none
    could be). A name already stored stays unless the Auth display name says otherwise."""
    path = _display_name_path(uid)
    stored = db.get(path)
    stored = stored if isinstance(stored, str) and stored.strip() else None
    wanted = (auth_name or "").strip() or stored or (email or "").strip() or None
    if wanted is None:
        return None
    wanted = wanted[:MAX_NAME_CHARS]
    if wanted != stored:
        db.set(path, wanted)
    return wanted
