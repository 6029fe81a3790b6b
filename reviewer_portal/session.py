"""One dermatologist's signed-in session: the role gate, the clients and the live copies.

Every browser session of the portal owns one :class:`PortalSession`; nothing per user lives in
module globals, so many dermatologists use one portal process at once, each as themself (the rules
see their own ID token). The live copies are :class:`dermaloop.database.Mirror` objects of the
paths the queue needs; when the server ends access for good (revoked or disabled account, a role
withdrawn) a mirror's ``on_cancel`` fires and the session reports that it ended.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from dermaloop import cases
from dermaloop.auth import AuthClient, UserSession
from dermaloop.database import Mirror, UserDatabase
from dermaloop.errors import ServiceError, Unauthenticated, Unavailable
from dermaloop.settings import Settings
from dermaloop.storage import UserStorage

log = logging.getLogger("reviewer_portal")

PORTAL_ROLES = ("dermatologist", "admin")
NOT_FOR_PATIENTS = ("This portal is for dermatologists. Patients use the DermaLoop app to send photos "
                    "and read their results.")


class NotAllowed(Exception):
    """The account signed in but may not use the portal (no dermatologist or admin role)."""


def sign_in(auth: AuthClient, email: str, password: str) -> UserSession:
    """Sign in and check the role claim; raises :class:`NotAllowed` with the words to show."""
    session = auth.sign_in(email, password)
    role = session.role
    if role not in PORTAL_ROLES:
        # A role an admin just granted appears only in a fresh token.
        role = decode_role(session.force_refresh())
    if role not in PORTAL_ROLES:
        raise NotAllowed(NOT_FOR_PATIENTS if role in (None, "patient") else
                         f"Your account's role ({role}) does not give access to this portal.")
    return session


def decode_role(token: str) -> str | None:
    from dermaloop.auth import decode_claims

    role = decode_claims(token).get("role")
    return role if isinstance(role, str) else None


class PortalSession:
    """The signed-in dermatologist's database/storage clients and live copies."""

    MIRRORED = ("queue", "cases", "claims", "messages")

    def __init__(self, user: UserSession, settings: Settings, on_change: Callable[[str], None],
                 on_ended: Callable[[str], None]) -> None:
        self.user = user
        self.uid = user.uid
        self.email = user.email or user.uid
        self.settings = settings
        self.db = UserDatabase(user, settings)
        self.storage = UserStorage(user, settings)
        self._on_change = on_change
        self._on_ended = on_ended
        self._ended = threading.Event()
        self.online = True
        self.mirrors: dict[str, Mirror] = {}
        for name in self.MIRRORED:
            self.mirrors[name] = self._mirror(name, name)
        self.mirrors["reads"] = self._mirror("reads", cases.reads_path(self.uid))

    def _mirror(self, name: str, path: str) -> Mirror:
        return self.db.mirror(path, on_change=lambda event: self._on_change(name),
                              on_cancel=lambda reason: self.end(f"Your session ended ({reason}). Please sign in again."),
                              on_error=self._error, on_state=lambda state: self._state(name, state))

    def _error(self, exc: ServiceError) -> None:
        if isinstance(exc, Unavailable):
            self.online = False
            self._on_change("connection")

    def _state(self, name: str, state: str) -> None:
        online = all(m.state == "connected" for m in self.mirrors.values() if hasattr(m, "listener"))
        if state == "connected" and online != self.online:
            self.online = online
            self._on_change("connection")

    def wait_synced(self, timeout: float | None = None) -> bool:
        return all(m.wait_synced(timeout) for m in self.mirrors.values())

    @property
    def synced(self) -> bool:
        return all(m.synced for m in self.mirrors.values())

    def value(self, name: str) -> Any:
        return self.mirrors[name].value

    def end(self, reason: str) -> None:
        """The server ended access (revoked, disabled, role withdrawn) or the user signed out."""
        if self._ended.is_set():
            return
        self._ended.set()
        self.close()
        try:
            self._on_ended(reason)
        except Exception:
            log.exception("ending the session's screen failed")

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    def check(self, exc: BaseException) -> None:
        """End the session if ``exc`` says the token is no good any more."""
        if isinstance(exc, Unauthenticated):
            self.end("Your session ended (signed out elsewhere or the account was disabled). Please sign in again.")

    def close(self) -> None:
        for mirror in self.mirrors.values():
            mirror.close()
