"""The one way DermaLoop programs reach Firebase Auth.

* End-user apps (patient app, reviewer portal) sign up, sign in and manage their account through
  the Identity Toolkit and Secure Token REST APIs, as the mobile and web SDKs do: :class:`AuthClient`
  returns a :class:`UserSession` whose :meth:`~UserSession.id_token` refreshes itself before expiry,
  so it can be handed to ``dermaloop.database.UserDatabase`` and ``dermaloop.storage.UserStorage`` as
  their token source. A session survives a restart of the app: save :meth:`UserSession.to_dict`,
  give it back to :meth:`AuthClient.restore`; no password is asked again until the refresh token
  is revoked (then :class:`~dermaloop.errors.Unauthenticated`). ``UserSession.role`` reads the
  ``role`` claim of the user's own ID token.
* Admin programs (``dermaloop users``, the worker) use firebase-admin's ``auth`` module through the
  helpers at the bottom (create a user with a role, set a role, verify tokens).

Which backend answers is decided only by ``FIREBASE_AUTH_EMULATOR_HOST`` (via
:class:`dermaloop.settings.Settings`): unset means Google's production endpoints. Errors are
:mod:`dermaloop.errors` classes (``AuthError`` is this service's); offline is
:class:`~dermaloop.errors.Unavailable`, also while a session refreshes its token.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import requests

from dermaloop.errors import (
    Conflict,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ServiceError,
    Unauthenticated,
    error_class,
)
from dermaloop.http import Endpoint, RetryPolicy
from dermaloop.settings import Settings, load_settings

log = logging.getLogger(__name__)

ROLES = ("patient", "dermatologist", "admin")
PRODUCTION_IDENTITY = "https://identitytoolkit.googleapis.com/v1"
PRODUCTION_SECURETOKEN = "https://securetoken.googleapis.com/v1"
REFRESH_MARGIN_S = 300  # refresh an ID token this long before it expires
SESSION_FORMAT = 1  # version of UserSession.to_dict()


class AuthError(ServiceError):
    """A refused or failed Auth call; ``code`` is Firebase's (EMAIL_EXISTS, INVALID_PASSWORD, ...).

    What is raised is also an instance of the kind of failure (:mod:`dermaloop.errors`): a wrong
    password or a revoked refresh token is :class:`~dermaloop.errors.Unauthenticated`, an existing
    email :class:`~dermaloop.errors.Conflict`, no network :class:`~dermaloop.errors.Unavailable`."""

    service = "Auth"


# Firebase's error codes (the part of the message before " : ") by the kind of failure they are.
_UNAUTHENTICATED_CODES = frozenset({
    "INVALID_PASSWORD", "EMAIL_NOT_FOUND", "INVALID_LOGIN_CREDENTIALS", "INVALID_REFRESH_TOKEN",
    "TOKEN_EXPIRED", "INVALID_ID_TOKEN", "USER_DISABLED", "USER_NOT_FOUND", "CREDENTIAL_TOO_OLD_LOGIN_AGAIN",
    "INVALID_CUSTOM_TOKEN", "USER_MISMATCH",
})
_CONFLICT_CODES = frozenset({"EMAIL_EXISTS", "DUPLICATE_EMAIL", "DUPLICATE_LOCAL_ID"})
_KIND_BY_STATUS = {400: InvalidArgument, 401: Unauthenticated, 403: PermissionDenied, 404: NotFound, 409: Conflict}


def _kind(code: str, status: int) -> type | None:
    if code in _UNAUTHENTICATED_CODES:
        return Unauthenticated
    if code in _CONFLICT_CODES:
        return Conflict
    return _KIND_BY_STATUS.get(status)


def _raise_for(response: requests.Response, endpoint: Endpoint) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.ok and isinstance(body, dict):
        return body
    if response.ok:  # a success that is not Firebase's JSON: something else answered
        endpoint.json(response)
        raise endpoint.unavailable(f"HTTP {response.status_code} answer that is not a JSON object",
                                   status=response.status_code)
    address = endpoint.address
    error = body.get("error", {}) if isinstance(body, dict) else {}
    if not isinstance(error, dict):
        error = {"message": str(error)}
    message = error.get("message") or response.text[:200] or response.reason
    code, _, detail = str(message).partition(" : ")
    code, detail = code.strip(), detail.strip() or str(message)
    text = f"{code}: {detail}" if detail and detail != code else code
    cls = error_class(AuthError, _kind(code, response.status_code))
    raise cls(text, message=detail, code=code, status=response.status_code, address=address)


def decode_claims(id_token: str) -> dict[str, Any]:
    """The payload of a JWT, not verified: for reading one's own token (the servers verify it)."""
    try:
        payload = id_token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, UnicodeDecodeError):
        return {}
    return claims if isinstance(claims, dict) else {}


@dataclass
class UserSession:
    """A signed-in user: uid, current ID token and refresh token; refreshes itself when needed.

    An app keeps the user signed in across restarts by saving :meth:`to_dict` (it holds the
    refresh token: store it like a password) and calling :meth:`AuthClient.restore` on the next
    start; ``on_change`` is called after every token renewal so the saved copy can be rewritten.
    """

    client: AuthClient
    uid: str
    refresh_token: str
    _id_token: str
    expires_at: float
    email: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    on_change: Callable[[UserSession], None] | None = field(default=None, repr=False, compare=False)

    def id_token(self) -> str:
        """A valid ID token (refreshed over the network when close to expiry).

        Raises :class:`~dermaloop.errors.Unauthenticated` if the refresh token was revoked or the
        account disabled or deleted, :class:`~dermaloop.errors.Unavailable` when offline."""
        changed = False
        with self._lock:
            if not self._id_token or time.time() > self.expires_at - REFRESH_MARGIN_S:
                fresh = self.client.refresh(self.refresh_token)
                self._id_token, self.refresh_token, self.expires_at = fresh._id_token, fresh.refresh_token, fresh.expires_at
                changed = True
            token = self._id_token
        if changed:
            self._changed()
        return token

    def force_refresh(self) -> str:
        """New ID token now, e.g. to pick up a role claim an admin just set."""
        with self._lock:
            self.expires_at = 0
        return self.id_token()

    __call__ = id_token  # a UserSession is a token source for UserDatabase / UserStorage

    def _set_tokens(self, id_token: str, refresh_token: str, expires_in: float) -> None:
        with self._lock:
            self._id_token, self.refresh_token = id_token, refresh_token
            self.expires_at = time.time() + expires_in
        self._changed()

    def _changed(self) -> None:
        if self.on_change is None:
            return
        try:
            self.on_change(self)
        except Exception:  # the app failing to save must not fail the request that refreshed
            log.exception("UserSession.on_change raised; the session goes on with its new tokens")

    @property
    def claims(self) -> dict[str, Any]:
        """The claims of the current ID token (decoded, not verified: it is our own token and the
        servers verify it). Uses the held token even if expired, so it works offline; only a
        session restored without an ID token fetches one."""
        token = self._id_token or self.id_token()
        return decode_claims(token)

    @property
    def role(self) -> str | None:
        """The ``role`` custom claim ("patient", "dermatologist", "admin") or None. A role an admin
        just set shows after :meth:`force_refresh`."""
        role = self.claims.get("role")
        return role if isinstance(role, str) else None

    def to_dict(self) -> dict[str, Any]:
        """What :meth:`AuthClient.restore` needs, as JSON-ready values."""
        with self._lock:
            return {"version": SESSION_FORMAT, "uid": self.uid, "email": self.email,
                    "refresh_token": self.refresh_token, "id_token": self._id_token,
                    "expires_at": self.expires_at}


class AuthClient:
    """End-user REST client (the calls a Firebase SDK makes).

    ``retry`` sets how hard idempotent calls (sign-in, token refresh, lookup) are retried when the
    network or the server fails; sign-up and account deletion are only repeated when the request
    certainly never reached the server."""

    def __init__(self, settings: Settings | None = None, http: requests.Session | None = None, timeout: float = 30,
                 retry: RetryPolicy | None = None):
        self.settings = settings or load_settings()
        self.http = http or requests.Session()
        self.timeout = timeout
        host = self.settings.auth_emulator_host
        if host:
            self.identity = f"http://{host}/identitytoolkit.googleapis.com/v1"
            self.securetoken = f"http://{host}/securetoken.googleapis.com/v1"
            identity_address = securetoken_address = f"http://{host}"
        else:
            self.identity, self.securetoken = PRODUCTION_IDENTITY, PRODUCTION_SECURETOKEN
            identity_address, securetoken_address = PRODUCTION_IDENTITY[:-3], PRODUCTION_SECURETOKEN[:-3]
        self._identity = Endpoint(AuthError, identity_address, self.http, timeout, retry)
        self._securetoken = Endpoint(AuthError, securetoken_address, self.http, timeout, retry)

    def _post(self, action: str, body: dict[str, Any], idempotent: bool = True) -> dict[str, Any]:
        response = self._identity.request("POST", f"{self.identity}/accounts:{action}", idempotent=idempotent,
                                          params={"key": self.settings.api_key}, json=body)
        return _raise_for(response, self._identity)

    def _session(self, body: dict[str, Any]) -> UserSession:
        return UserSession(self, body["localId"], body["refreshToken"], body["idToken"],
                           time.time() + int(body.get("expiresIn", 3600)), body.get("email"))

    def sign_up(self, email: str, password: str, display_name: str | None = None) -> UserSession:
        body: dict[str, Any] = {"email": email, "password": password, "returnSecureToken": True}
        if display_name:
            body["displayName"] = display_name
        # Not idempotent: a repeat after the account was made would answer EMAIL_EXISTS.
        return self._session(self._post("signUp", body, idempotent=False))

    def sign_in(self, email: str, password: str) -> UserSession:
        return self._session(self._post("signInWithPassword",
                                        {"email": email, "password": password, "returnSecureToken": True}))

    def refresh(self, refresh_token: str) -> UserSession:
        """Exchange a refresh token for a new ID token (a new session object; email unknown)."""
        response = self._securetoken.request(
            "POST", f"{self.securetoken}/token", idempotent=True, params={"key": self.settings.api_key},
            data={"grant_type": "refresh_token", "refresh_token": refresh_token})
        body = _raise_for(response, self._securetoken)
        return UserSession(self, body["user_id"], body["refresh_token"], body["id_token"],
                           time.time() + int(body.get("expires_in", 3600)))

    def restore(self, data: Mapping[str, Any],
                on_change: Callable[[UserSession], None] | None = None) -> UserSession:
        """The session saved with :meth:`UserSession.to_dict`, without any network call (so an app
        starts offline). An expired ID token is refreshed on first use; a refresh token that was
        revoked then raises :class:`~dermaloop.errors.Unauthenticated`."""
        uid, refresh_token = data.get("uid"), data.get("refresh_token")
        if not isinstance(uid, str) or not uid or not isinstance(refresh_token, str) or not refresh_token:
            raise ValueError("a saved session needs 'uid' and 'refresh_token' (from UserSession.to_dict())")
        id_token = data.get("id_token") or ""
        expires_at = data.get("expires_at")
        if not isinstance(id_token, str) or decode_claims(id_token).get("sub") not in (None, uid):
            id_token = ""  # not this user's token: fetch a fresh one
        if expires_at is None and id_token:
            expires_at = decode_claims(id_token).get("exp")
        if not id_token or not isinstance(expires_at, int | float):
            id_token, expires_at = "", 0.0
        email = data.get("email")
        return UserSession(self, uid, refresh_token, id_token, float(expires_at),
                           email if isinstance(email, str) else None, on_change=on_change)

    def lookup(self, id_token: str) -> dict[str, Any]:
        """The account record (UserInfo) of the token's user."""
        users = self._post("lookup", {"idToken": id_token}).get("users") or []
        if not users:
            raise error_class(AuthError, Unauthenticated)("USER_NOT_FOUND: no account for this token",
                                                          message="no account for this token", code="USER_NOT_FOUND",
                                                          status=400, address=self._identity.address)
        return users[0]

    def update(self, session: UserSession, display_name: str | None = None, password: str | None = None) -> dict[str, Any]:
        """Change the display name and/or password; a password change renews the session's tokens."""
        body: dict[str, Any] = {"idToken": session.id_token(), "returnSecureToken": True}
        if display_name is not None:
            body["displayName"] = display_name
        if password is not None:
            body["password"] = password
        # A password change invalidates the token it was sent with, so it must not be repeated.
        result = self._post("update", body, idempotent=password is None)
        if result.get("idToken"):
            session._set_tokens(result["idToken"], result["refreshToken"], int(result.get("expiresIn", 3600)))
        return result

    def delete(self, session: UserSession) -> None:
        self._post("delete", {"idToken": session.id_token()}, idempotent=False)


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
