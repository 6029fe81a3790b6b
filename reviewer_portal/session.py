"""One dermatologist's signed-in session: the role gate, the clients and the live copies.

Every browser session of the portal owns one :class:`PortalSession`; nothing per user lives in
module globals, so many dermatologists use one portal process at once, each as themself (the rules
see their own ID token). The live copies are :class:`dermaloop.database.Mirror` objects of the
paths the queue needs; when the server ends access for good (revoked or disabled account, a role
withdrawn) a mirror's ``on_cancel`` fires and the session reports that it ended.

An ``admin`` (a clinical lead or maintainer) gets a read-only session: the rules let that role read
what dermatologists read but write nothing (no claim, review, message or read mark), so the session
keeps no ``/reads`` copy and ``read_only`` tells the screens to leave the write controls out.
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
from reviewer_portal.people import Names, publish_own

log = logging.getLogger("reviewer_portal")

PORTAL_ROLES = ("dermatologist", "admin")
READ_ONLY_ROLES = ("admin",)
READ_ONLY_BANNER = ("Read-only: you are signed in as admin. You can look at the queue, the cases, their review "
                    "history, the messages and the monitoring figures; claiming, reviewing and chatting are for "
                    "dermatologists.")
SESSION_ENDED = ("Your session ended: the account was signed out everywhere, disabled or deleted, or its role "
                 "changed. Please sign in again.")
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
    """The signed-in dermatologist's (or admin's) database/storage clients, live copies and names."""

    MIRRORED = ("queue", "cases", "claims", "messages")

    def __init__(self, user: UserSession, settings: Settings, on_change: Callable[[str], None],
                 on_ended: Callable[[str], None]) -> None:
        self.user = user
        self.uid = user.uid
        self.email = user.email or user.uid
        self.role = user.role
        self.read_only = self.role in READ_ONLY_ROLES
        self.settings = settings
        self.db = UserDatabase(user, settings)
        self.storage = UserStorage(user, settings)
        self.names = Names(self.db)
        self._on_change = on_change
        self._on_ended = on_ended
        self._ended = threading.Event()
        self.online = True
        self.mirrors: dict[str, Mirror] = {}
        for name in self.MIRRORED:
            self.mirrors[name] = self._mirror(name, name)
        if not self.read_only:  # the rules give each dermatologist their own read marks, admins none
            self.mirrors["reads"] = self._mirror("reads", cases.reads_path(self.uid))

    def _mirror(self, name: str, path: str) -> Mirror:
        return self.db.mirror(path, on_change=lambda event: self._on_change(name),
                              on_cancel=lambda reason: self._cancelled(name, reason),
                              on_error=self._error, on_state=lambda state: self._state(name, state))

    def _cancelled(self, name: str, reason: str) -> None:
        log.info("the server ended %s's copy of %s: %s", self.uid, name, reason)
        self.end(SESSION_ENDED)

    def publish_name(self) -> None:
        """Let colleagues see this dermatologist's name instead of their uid (admins write nothing)."""
        if self.read_only:
            return
        auth_name = self.user.claims.get("name")
        try:
            stored = publish_own(self.db, self.uid, auth_name if isinstance(auth_name, str) else None,
                                 self.user.email)
        except ServiceError as exc:  # offline or refused: colleagues see the uid meanwhile
            self.check(exc)
            log.info("publishing the display name of %s failed: %s", self.uid, exc)
            return
        self.names.remember(self.uid, stored)

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
        mirror = self.mirrors.get(name)
        return mirror.value if mirror is not None else {}

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
            log.info("the server refused %s's token: %s", self.uid, exc)
            self.end(SESSION_ENDED)

    def close(self) -> None:
        for mirror in self.mirrors.values():
            mirror.close()
