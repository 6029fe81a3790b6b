"""Staying signed in per browser: a reload or an app restart does not ask for the password again.

The browser keeps only an opaque random key (Flet's ``SharedPreferences``: the browser's local
storage on the web, the phone's preferences in a built app); the device's
:class:`~client.store.LocalStore` maps that key's hash to the saved session. Neither half is any use
alone, a new key is made at every sign-in, and two browsers served by the same app process each
hold their own key, so they never see each other's session. Signing out or "delete my data"
forgets both halves.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass

from client.store import LocalStore
from dermaloop.auth import AuthClient, UserSession
from dermaloop.errors import ServiceError, Unauthenticated

log = logging.getLogger(__name__)

PREFERENCE = "dermaloop.signin_key"  # the name the browser keeps the key under
SESSION_ENDED = ("You were signed out: your sign-in is no longer valid (it was ended on the server, or the "
                 "account changed). Please sign in again. Your cases on this device are kept.")


@dataclass(frozen=True)
class Check:
    """What the backend said about a restored session: ``ended`` (sign in again, with ``message``),
    or not (also when the backend could not be reached: the app works offline)."""

    ended: bool
    message: str | None = None


class RememberedSessions:
    """The device's half of "stay signed in": browser key -> saved session, in ``store``."""

    def __init__(self, store: LocalStore, auth: AuthClient) -> None:
        self.store = store
        self.auth = auth

    def remember(self, session: UserSession) -> str:
        """Keep ``session`` under a new random key (returned, for the browser to keep); renewed
        tokens are saved under it too."""
        key = secrets.token_urlsafe(32)
        self.store.save_session(key, session.to_dict())
        session.on_change = lambda s: self.store.save_session(key, s.to_dict())
        return key

    def restore(self, key: str | None) -> UserSession | None:
        """The session saved under the browser's ``key``, without any network call (so the app
        opens offline); None if there is none. A saved copy that cannot be read is forgotten."""
        if not isinstance(key, str):
            return None
        data = self.store.load_session(key)
        if data is None:
            return None
        try:
            session = self.auth.restore(data)
        except ValueError:
            log.warning("a saved session could not be read; forgetting it")
            self.store.forget_session(key)
            return None
        session.on_change = lambda s: self.store.save_session(key, s.to_dict())
        return session

    def check(self, key: str, session: UserSession) -> Check:
        """Ask Auth for a fresh ID token: a revoked or refused refresh token ends the session here
        (it is forgotten); no network leaves it as it is."""
        try:
            session.force_refresh()
        except Unauthenticated as exc:
            log.info("a restored session was refused (%s); forgetting it", exc)
            self.forget(key)
            return Check(True, SESSION_ENDED)
        except ServiceError as exc:
            log.info("a restored session could not be checked now (%s)", exc)
        return Check(False)

    def forget(self, key: str | None) -> None:
        if isinstance(key, str):
            self.store.forget_session(key)
