"""The one way DermaLoop programs reach Firebase Auth.

* End-user apps (patient app, reviewer portal) sign up, sign in and manage their account through
  the Identity Toolkit and Secure Token REST APIs, as the mobile and web SDKs do: :class:`AuthClient`
  returns a :class:`UserSession` whose :meth:`~UserSession.id_token` refreshes itself before expiry,
  so it can be handed to ``dermaloop.database.UserDatabase`` and ``dermaloop.storage.UserStorage`` as
  their token source.
* Admin programs (``dermaloop users``, the worker) use firebase-admin's ``auth`` module through the
  helpers at the bottom (create a user with a role, set a role, verify tokens).

Which backend answers is decided only by ``FIREBASE_AUTH_EMULATOR_HOST`` (via
:class:`dermaloop.settings.Settings`): unset means Google's production endpoints.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import requests

from dermaloop.settings import Settings, load_settings

ROLES = ("patient", "dermatologist", "admin")
PRODUCTION_IDENTITY = "https://identitytoolkit.googleapis.com/v1"
PRODUCTION_SECURETOKEN = "https://securetoken.googleapis.com/v1"
REFRESH_MARGIN_S = 300  # refresh an ID token this long before it expires


class AuthError(Exception):
    """A refused Auth call; ``code`` is Firebase's (EMAIL_EXISTS, INVALID_PASSWORD, ...)."""

    def __init__(self, code: str, message: str, status: int):
        super().__init__(f"{code}: {message}" if message and message != code else code)
        self.code, self.status = code, status


def _raise_for(response: requests.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.ok and isinstance(body, dict):
        return body
    error = body.get("error", {}) if isinstance(body, dict) else {}
    message = error.get("message") or response.text[:200] or response.reason
    code, _, detail = str(message).partition(" : ")
    raise AuthError(code.strip(), detail.strip() or str(message), response.status_code)


@dataclass
class UserSession:
    """A signed-in user: uid, current ID token and refresh token; refreshes itself when needed."""

    client: AuthClient
    uid: str
    refresh_token: str
    _id_token: str
    expires_at: float
    email: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def id_token(self) -> str:
        """A valid ID token (refreshed over the network when close to expiry)."""
        with self._lock:
            if time.time() > self.expires_at - REFRESH_MARGIN_S:
                fresh = self.client.refresh(self.refresh_token)
                self._id_token, self.refresh_token, self.expires_at = fresh._id_token, fresh.refresh_token, fresh.expires_at
            return self._id_token

    def force_refresh(self) -> str:
        """New ID token now, e.g. to pick up a role claim an admin just set."""
        with self._lock:
            self.expires_at = 0
        return self.id_token()

    __call__ = id_token  # a UserSession is a token source for UserDatabase / UserStorage


class AuthClient:
    """End-user REST client (the calls a Firebase SDK makes)."""

    def __init__(self, settings: Settings | None = None, http: requests.Session | None = None, timeout: float = 30):
        self.settings = settings or load_settings()
        self.http = http or requests.Session()
        self.timeout = timeout
        host = self.settings.auth_emulator_host
        if host:
            self.identity = f"http://{host}/identitytoolkit.googleapis.com/v1"
            self.securetoken = f"http://{host}/securetoken.googleapis.com/v1"
        else:
            self.identity, self.securetoken = PRODUCTION_IDENTITY, PRODUCTION_SECURETOKEN

    def _post(self, action: str, body: dict[str, Any]) -> dict[str, Any]:
        response = self.http.post(f"{self.identity}/accounts:{action}", params={"key": self.settings.api_key},
                                  json=body, timeout=self.timeout)
        return _raise_for(response)

    def _session(self, body: dict[str, Any]) -> UserSession:
        return UserSession(self, body["localId"], body["refreshToken"], body["idToken"],
                           time.time() + int(body.get("expiresIn", 3600)), body.get("email"))

    def sign_up(self, email: str, password: str, display_name: str | None = None) -> UserSession:
        body: dict[str, Any] = {"email": email, "password": password, "returnSecureToken": True}
        if display_name:
            body["displayName"] = display_name
        return self._session(self._post("signUp", body))

    def sign_in(self, email: str, password: str) -> UserSession:
        return self._session(self._post("signInWithPassword",
                                        {"email": email, "password": password, "returnSecureToken": True}))

    def refresh(self, refresh_token: str) -> UserSession:
        response = self.http.post(f"{self.securetoken}/token", params={"key": self.settings.api_key},
                                  data={"grant_type": "refresh_token", "refresh_token": refresh_token},
                                  timeout=self.timeout)
        body = _raise_for(response)
        return UserSession(self, body["user_id"], body["refresh_token"], body["id_token"],
                           time.time() + int(body.get("expires_in", 3600)))

    def lookup(self, id_token: str) -> dict[str, Any]:
        """The account record (UserInfo) of the token's user."""
        users = self._post("lookup", {"idToken": id_token}).get("users") or []
        if not users:
            raise AuthError("USER_NOT_FOUND", "no account for this token", 400)
        return users[0]

    def update(self, session: UserSession, display_name: str | None = None, password: str | None = None) -> dict[str, Any]:
        """Change the display name and/or password; a password change renews the session's tokens."""
        body: dict[str, Any] = {"idToken": session.id_token(), "returnSecureToken": True}
        if display_name is not None:
            body["displayName"] = display_name
        if password is not None:
            body["password"] = password
        result = self._post("update", body)
        if result.get("idToken"):
            with session._lock:
                session._id_token, session.refresh_token = result["idToken"], result["refreshToken"]
                session.expires_at = time.time() + int(result.get("expiresIn", 3600))
        return result

    def delete(self, session: UserSession) -> None:
        self._post("delete", {"idToken": session.id_token()})


# ---- admin helpers (firebase-admin; work the same against localbase and production) ----------


def _admin(settings: Settings | None):
    from firebase_admin import auth

    from dermaloop.admin_app import get_app

    return auth, get_app(settings)


def check_role(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    return role


def create_user(email: str, password: str, role: str, display_name: str | None = None,
                settings: Settings | None = None):
    """Create an account with a ``role`` claim, or, if the email exists, update it to match.

    Idempotent so that provisioning scripts can be re-run; the password is reset to the given one.
    Returns ``(UserRecord, created: bool)``.
    """
    auth, app = _admin(settings)
    check_role(role)
    try:
        user = auth.get_user_by_email(email, app=app)
        created = False
        changes: dict[str, Any] = {"password": password}
        if display_name is not None:
            changes["display_name"] = display_name
        auth.update_user(user.uid, app=app, **changes)
    except auth.UserNotFoundError:
        user = auth.create_user(email=email, password=password, display_name=display_name, app=app)
        created = True
    set_role(user.uid, role, settings)
    return auth.get_user(user.uid, app=app), created


def set_role(uid: str, role: str, settings: Settings | None = None):
    """Set the ``role`` claim (other custom claims are kept); takes effect on the next token refresh."""
    auth, app = _admin(settings)
    check_role(role)
    claims = dict(auth.get_user(uid, app=app).custom_claims or {})
    claims["role"] = role
    auth.set_custom_user_claims(uid, claims, app=app)
    return auth.get_user(uid, app=app)


def get_user_by_email(email: str, settings: Settings | None = None):
    auth, app = _admin(settings)
    return auth.get_user_by_email(email, app=app)


def list_users(settings: Settings | None = None):
    """Every account (iterates firebase-admin's pages)."""
    auth, app = _admin(settings)
    return list(auth.list_users(app=app).iterate_all())


def verify_id_token(id_token: str, settings: Settings | None = None, check_revoked: bool = True) -> dict[str, Any]:
    """Claims of a valid ID token (``uid`` included); raises firebase-admin's errors otherwise."""
    auth, app = _admin(settings)
    return auth.verify_id_token(id_token, app=app, check_revoked=check_revoked)


def revoke(uid: str, settings: Settings | None = None) -> None:
    auth, app = _admin(settings)
    auth.revoke_refresh_tokens(uid, app=app)
