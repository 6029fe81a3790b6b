"""The Identity Toolkit / Secure Token REST subset that the apps and firebase-admin use.

Routes, bodies, error codes and response shapes follow the official Auth emulator
(firebase-protocols.md §2), with these deliberate differences: passwords are stored as scrypt
hashes, refresh tokens are opaque random strings, ID tokens past their ``exp`` are refused by the
end-user endpoints (as production does) and by the RTDB and Storage rules, and a password or email
change (by the user or by an admin) revokes the user's refresh tokens and sets ``validSince``, as
production does. Every change that can invalidate tokens is reported through
``Context.auth_changed``, so open database streams of that user end at once.

In secure mode (localbase.security) tokens are RS256-signed with localbase's key, whose public keys
are served at Google's paths (``tokens.X509_PATH``, ``tokens.JWKS_PATH``); admin calls need
``owner`` from this machine or the admin credential; the ``/emulator/v1`` endpoints are admin-only;
and one IP address may create only so many anonymous accounts an hour.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
from typing import Any

from aiohttp import web

from localbase import tokens
from localbase.auth.store import AuthStore, check_password, hash_password, new_uid, now_ms
from localbase.context import Context
from localbase.security import RateWindow

IDT = "/identitytoolkit.googleapis.com"
CUSTOM_TOKEN_AUDIENCE = tokens.CUSTOM_TOKEN_AUDIENCE
FORBIDDEN_CLAIMS = {
    "iss", "aud", "sub", "iat", "exp", "nbf", "jti", "nonce", "azp", "acr", "amr", "cnf", "auth_time",
    "firebase", "at_hash", "c_hash",
}
MAX_CLAIMS_CHARS = 1000
MIN_PASSWORD = 6
# Firebase's limits: an email address of at most 256 characters; passwords of at most 4096 (the
# maximum of Identity Platform's password policy). Profile strings: localbase's own cap.
MAX_EMAIL = 256
MAX_PASSWORD = 4096
MAX_PROFILE_CHARS = 2048
REDACTED = "UkVEQUNURUQ="  # base64("REDACTED"), what production returns instead of a hash
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_UID = re.compile(r"^[^\s/]{1,128}$")


class ApiError(Exception):
    """An error answered in Google's error shape; ``message`` is ``CODE`` or ``CODE : detail``."""

    def __init__(self, message: str, status: int = 400, reason: str = "invalid", status_text: str | None = None):
        super().__init__(message)
        self.message, self.status, self.reason, self.status_text = message, status, reason, status_text

    def response(self) -> web.Response:
        body: dict[str, Any] = {
            "code": self.status,
            "message": self.message,
            "errors": [{"message": self.message, "reason": self.reason, "domain": "global"}],
        }
        if self.status_text:
            body["status"] = self.status_text
        return web.json_response({"error": body}, status=self.status)


MISSING_KEY = ApiError("The request is missing a valid API key.", 403, "forbidden", "PERMISSION_DENIED")
BAD_CREDENTIALS = ApiError(
    "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other "
    "valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.",
    401, "authError", "UNAUTHENTICATED",
)


def _rfc3339(ms: int | None) -> str | None:
    if ms is None:
        return None
    stamp = dt.datetime.fromtimestamp(ms / 1000, dt.UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


class AuthService:
    def __init__(self, store: AuthStore, ctx: Context):
        self.store = store
        self.ctx = ctx
        self.project_id = ctx.project_id
        self.codec = ctx.codec

    def _changed(self, uid: str | None) -> None:
        """Tokens of ``uid`` (None: anyone) may have stopped being valid: tell the other services."""
        self.ctx.auth_changed(uid)

    # ---- shared helpers ------------------------------------------------------------------------
    def is_revoked(self, claims: dict[str, Any]) -> bool:
        """For the RTDB and Storage rules: deleted or disabled user, or a token older than validSince."""
        uid = claims.get("sub", "")
        if self.store.is_deleted(uid):
            return True
        user = self.store.get(uid)
        if user is None:
            return False  # a uid Auth never knew (tokens minted by tests): only expiry applies
        iat = claims.get("iat")
        return bool(user["disabled"]) or not isinstance(iat, int | float) or iat < user["valid_since"]

    def user_info(self, user: dict[str, Any]) -> dict[str, Any]:
        info: dict[str, Any] = {
            "localId": user["uid"],
            "emailVerified": bool(user["email_verified"]),
            "createdAt": str(user["created_at"]),
            "validSince": str(user["valid_since"]),
            "disabled": bool(user["disabled"]),
            "providerUserInfo": self._providers(user),
        }
        optional = {
            "email": user["email"],
            "displayName": user["display_name"],
            "photoUrl": user["photo_url"],
            "phoneNumber": user["phone_number"],
            "customAttributes": user["custom_attributes"],
            "lastLoginAt": str(user["last_login_at"]) if user["last_login_at"] else None,
            "lastRefreshAt": _rfc3339(user["last_refresh_at"]),
            "passwordUpdatedAt": user["password_updated_at"],
        }
        info.update({k: v for k, v in optional.items() if v is not None})
        if user["password_hash"]:
            info["passwordHash"] = REDACTED
        return info

    def _providers(self, user: dict[str, Any]) -> list[dict[str, Any]]:
        providers = []
        if user["email"] and user["password_hash"]:
            entry = {"providerId": "password", "email": user["email"], "federatedId": user["email"], "rawId": user["email"]}
            if user["display_name"]:
                entry["displayName"] = user["display_name"]
            if user["photo_url"]:
                entry["photoUrl"] = user["photo_url"]
            providers.append(entry)
        if user["phone_number"]:
            providers.append({"providerId": "phone", "phoneNumber": user["phone_number"], "rawId": user["phone_number"]})
        return providers

    def mint(self, user: dict[str, Any], provider: str, extra_claims: dict[str, Any] | None = None,
             auth_time: int | None = None) -> str:
        claims = json.loads(user["custom_attributes"] or "{}")
        claims.update(extra_claims or {})
        standard: dict[str, Any] = {}
        if user["display_name"]:
            standard["name"] = user["display_name"]
        if user["photo_url"]:
            standard["picture"] = user["photo_url"]
        if provider == "anonymous":
            standard["provider_id"] = "anonymous"
            identities: dict[str, list[str]] = {}
        else:
            identities = {}
            if user["email"]:
                standard["email"] = user["email"]
                standard["email_verified"] = bool(user["email_verified"])
                identities["email"] = [user["email"]]
            if user["phone_number"]:
                standard["phone_number"] = user["phone_number"]
                identities["phone"] = [user["phone_number"]]
        standard["firebase"] = {"identities": identities, "sign_in_provider": provider}
        if auth_time is not None:
            standard["auth_time"] = auth_time
        return tokens.mint_id_token(self.project_id, user["uid"], claims, signer=self.codec, **standard)

    def session(self, user: dict[str, Any], provider: str, extra_claims: dict[str, Any] | None = None) -> dict[str, str]:
        refresh = self.store.issue_refresh_token(user["uid"], provider, extra_claims)
        return {"idToken": self.mint(user, provider, extra_claims), "refreshToken": refresh,
                "expiresIn": str(tokens.LIFETIME_S)}

    def user_from_id_token(self, id_token: Any) -> dict[str, Any]:
        if not isinstance(id_token, str) or not id_token:
            raise ApiError("MISSING_ID_TOKEN")
        try:
            claims = self.codec.decode_id_token(id_token, self.project_id)
        except tokens.InvalidToken as exc:
            raise ApiError("TOKEN_EXPIRED" if "expired" in str(exc) else "INVALID_ID_TOKEN") from None
        user = self.store.get(claims["sub"])
        if user is None:
            raise ApiError("USER_NOT_FOUND")
        if user["disabled"]:
            raise ApiError("USER_DISABLED")
        if claims.get("iat", 0) < user["valid_since"]:
            raise ApiError("TOKEN_EXPIRED")
        return user

    def _require_user(self, uid: Any) -> dict[str, Any]:
        if not isinstance(uid, str) or not uid:
            raise ApiError("MISSING_LOCAL_ID")
        user = self.store.get(uid)
        if user is None:
            raise ApiError("USER_NOT_FOUND")
        return user

    @staticmethod
    def _check_email(email: Any) -> str:
        if not isinstance(email, str) or len(email) > MAX_EMAIL or not _EMAIL.match(email):
            raise ApiError("INVALID_EMAIL")
        return email

    @staticmethod
    def _check_password(password: Any) -> str:
        if not isinstance(password, str) or not password:
            raise ApiError("MISSING_PASSWORD")
        if len(password) < MIN_PASSWORD:
            raise ApiError(f"WEAK_PASSWORD : Password should be at least {MIN_PASSWORD} characters")
        if len(password) > MAX_PASSWORD:
            raise ApiError(f"PASSWORD_DOES_NOT_MEET_REQUIREMENTS : Password may have at most {MAX_PASSWORD} characters")
        return password

    @staticmethod
    def _profile(key: str, value: Any) -> str | None:
        """A display name, photo URL or phone number as stored: a bounded string, or None."""
        if not isinstance(value, str) or not value:
            return None
        if len(value) > MAX_PROFILE_CHARS:
            raise ApiError(f"INVALID_REQUEST : {key} longer than {MAX_PROFILE_CHARS} characters")
        return value

    @staticmethod
    def _check_claims(text: Any) -> str | None:
        if text is None:
            return None
        if not isinstance(text, str):
            raise ApiError("INVALID_CLAIMS")
        if len(text) > MAX_CLAIMS_CHARS:
            raise ApiError("CLAIMS_TOO_LARGE")
        try:
            claims = json.loads(text)
        except ValueError:
            raise ApiError("INVALID_CLAIMS") from None
        if not isinstance(claims, dict):
            raise ApiError("INVALID_CLAIMS")
        for key in claims:
            if key in FORBIDDEN_CLAIMS:
                raise ApiError(f"FORBIDDEN_CLAIM : {key}")
        return None if not claims else json.dumps(claims)

    # ---- end-user endpoints --------------------------------------------------------------------
    async def sign_up(self, body: dict[str, Any]) -> dict[str, Any]:
        email, password = body.get("email"), body.get("password")
        if email is None and password is None:
            user = self.store.create({"uid": new_uid(), "provider": "anonymous", "last_login_at": now_ms()})
            return {"kind": "identitytoolkit#SignupNewUserResponse", "localId": user["uid"],
                    **self.session(user, "anonymous")}
        if email is None:
            raise ApiError("MISSING_EMAIL")
        email = self._check_email(email)
        password = self._check_password(password)
        if self.store.by_email(email):
            raise ApiError("EMAIL_EXISTS")
        digest, salt = await asyncio.to_thread(hash_password, password)
        fields = {"uid": new_uid(), "email": email, "password_hash": digest, "salt": salt, "provider": "password",
                  "password_updated_at": now_ms(), "last_login_at": now_ms()}
        if self._profile("displayName", body.get("displayName")):
            fields["display_name"] = body["displayName"]
        try:
            user = self.store.create(fields)
        except KeyError:
            raise ApiError("EMAIL_EXISTS") from None
        out = {"kind": "identitytoolkit#SignupNewUserResponse", "localId": user["uid"], "email": user["email"]}
        if user["display_name"]:
            out["displayName"] = user["display_name"]
        return {**out, **self.session(user, "password")}

    async def sign_in_with_password(self, body: dict[str, Any]) -> dict[str, Any]:
        email = self._check_email(body.get("email"))
        password = body.get("password")
        if not isinstance(password, str) or not password:
            raise ApiError("MISSING_PASSWORD")
        user = self.store.by_email(email)
        if user is None:
            raise ApiError("EMAIL_NOT_FOUND")
        if not await asyncio.to_thread(check_password, password, user["password_hash"], user["salt"]):
            raise ApiError("INVALID_PASSWORD")
        if user["disabled"]:
            raise ApiError("USER_DISABLED")
        user = self.store.update(user["uid"], {"last_login_at": now_ms()})
        return {"kind": "identitytoolkit#VerifyPasswordResponse", "registered": True, "localId": user["uid"],
                "email": user["email"], "displayName": user["display_name"] or "", **self.session(user, "password")}

    async def sign_in_with_custom_token(self, body: dict[str, Any]) -> dict[str, Any]:
        token = body.get("token")
        if not isinstance(token, str) or not token:
            raise ApiError("MISSING_CUSTOM_TOKEN")
        try:
            payload = self.codec.decode_custom_token(token)
        except tokens.InvalidToken as exc:
            if self.codec.signed:
                raise ApiError(f"INVALID_CUSTOM_TOKEN : {exc}") from None
            raise ApiError("INVALID_CUSTOM_TOKEN : Invalid assertion format") from None
        uid = payload.get("uid")
        if payload.get("aud") != CUSTOM_TOKEN_AUDIENCE or not isinstance(uid, str) or not _UID.match(uid):
            raise ApiError("INVALID_CUSTOM_TOKEN")
        claims = payload.get("claims") if isinstance(payload.get("claims"), dict) else {}
        user = self.store.get(uid)
        is_new = user is None
        if is_new:
            user = self.store.create({"uid": uid, "provider": "custom"})
        if user["disabled"]:
            raise ApiError("USER_DISABLED")
        user = self.store.update(uid, {"last_login_at": now_ms()})
        return {"kind": "identitytoolkit#VerifyCustomTokenResponse", "isNewUser": is_new,
                **self.session(user, "custom", claims)}

    async def lookup_self(self, body: dict[str, Any]) -> dict[str, Any]:
        user = self.user_from_id_token(body.get("idToken"))
        return {"kind": "identitytoolkit#GetAccountInfoResponse", "users": [self.user_info(user)]}

    async def update_self(self, body: dict[str, Any]) -> dict[str, Any]:
        user = self.user_from_id_token(body.get("idToken"))
        for forbidden in ("customAttributes", "disableUser", "validSince", "emailVerified"):
            if forbidden in body:
                raise ApiError(f"INSUFFICIENT_PERMISSION : {forbidden} needs admin credentials")
        return await self._apply_update(user, body, end_user=True)

    async def delete_self(self, body: dict[str, Any]) -> dict[str, Any]:
        user = self.user_from_id_token(body.get("idToken"))
        self.store.delete(user["uid"])
        self._changed(user["uid"])
        return {"kind": "identitytoolkit#DeleteAccountResponse"}

    async def refresh(self, body: dict[str, Any]) -> dict[str, Any]:
        grant = body.get("grant_type") or body.get("grantType")
        token = body.get("refresh_token") or body.get("refreshToken")
        if not grant:
            raise ApiError("MISSING_GRANT_TYPE")
        if grant != "refresh_token":
            raise ApiError("INVALID_GRANT_TYPE")
        if not token:
            raise ApiError("MISSING_REFRESH_TOKEN")
        info = self.store.refresh_token_info(str(token))
        if info is None:
            raise ApiError("INVALID_REFRESH_TOKEN")
        user = self.store.get(info["uid"])
        if user is None:
            raise ApiError("USER_NOT_FOUND")
        if user["disabled"]:
            raise ApiError("USER_DISABLED")
        if info["revoked"] or info["created_at"] < user["valid_since"]:
            raise ApiError("TOKEN_EXPIRED")
        user = self.store.update(user["uid"], {"last_refresh_at": now_ms()})
        id_token = self.mint(user, info["provider"], json.loads(info["extra_claims"]), auth_time=info["created_at"])
        return {"id_token": id_token, "access_token": id_token, "expires_in": str(tokens.LIFETIME_S),
                "refresh_token": token, "token_type": "Bearer", "user_id": user["uid"], "project_id": "12345"}

    # ---- admin endpoints -----------------------------------------------------------------------
    async def admin_create(self, body: dict[str, Any]) -> dict[str, Any]:
        uid = body.get("localId") or new_uid()
        if not isinstance(uid, str) or not _UID.match(uid):
            raise ApiError("INVALID_LOCAL_ID")
        fields: dict[str, Any] = {"uid": uid, "provider": "password"}
        if body.get("email") is not None:
            fields["email"] = self._check_email(body["email"])
        if body.get("password") is not None:
            digest, salt = await asyncio.to_thread(hash_password, self._check_password(body["password"]))
            fields.update(password_hash=digest, salt=salt, password_updated_at=now_ms())
        for key, column in (("displayName", "display_name"), ("photoUrl", "photo_url"), ("phoneNumber", "phone_number")):
            if self._profile(key, body.get(key)):
                fields[column] = body[key]
        if "emailVerified" in body:
            fields["email_verified"] = int(bool(body["emailVerified"]))
        if "disabled" in body:
            fields["disabled"] = int(bool(body["disabled"]))
        if body.get("customAttributes") is not None:
            fields["custom_attributes"] = self._check_claims(body["customAttributes"])
        try:
            user = self.store.create(fields)
        except KeyError as exc:
            raise ApiError("DUPLICATE_LOCAL_ID" if exc.args[0] == "uid" else "EMAIL_EXISTS") from None
        out = {"kind": "identitytoolkit#SignupNewUserResponse", "localId": user["uid"]}
        for key, column in (("email", "email"), ("displayName", "display_name")):
            if user[column]:
                out[key] = user[column]
        return out

    async def admin_lookup(self, body: dict[str, Any]) -> dict[str, Any]:
        found: dict[str, dict[str, Any]] = {}
        for uid in body.get("localId") or []:
            if (user := self.store.get(str(uid))) is not None:
                found[user["uid"]] = user
        for email in (body.get("email") or []) + (body.get("initialEmail") or []):
            if (user := self.store.by_email(str(email))) is not None:
                found[user["uid"]] = user
        for phone in body.get("phoneNumber") or []:
            if (user := self.store.by_phone(str(phone))) is not None:
                found[user["uid"]] = user
        out: dict[str, Any] = {"kind": "identitytoolkit#GetAccountInfoResponse"}
        if found:
            out["users"] = [self.user_info(u) for u in found.values()]
        return out

    async def admin_update(self, body: dict[str, Any]) -> dict[str, Any]:
        user = self._require_user(body.get("localId"))
        return await self._apply_update(user, body, end_user=False)

    async def _apply_update(self, user: dict[str, Any], body: dict[str, Any], end_user: bool) -> dict[str, Any]:
        changes: dict[str, Any] = {}
        new_tokens = False
        if body.get("email") is not None:
            changes["email"] = self._check_email(body["email"])
            changes["email_verified"] = 0
            new_tokens = True
        if body.get("password") is not None:
            digest, salt = await asyncio.to_thread(hash_password, self._check_password(body["password"]))
            changes.update(password_hash=digest, salt=salt, password_updated_at=now_ms())
            new_tokens = True
        revoke = new_tokens
        if revoke:
            # Production signs every session out on a password or email change, by the user or by an
            # admin (a reset): refresh tokens die and older ID tokens are refused. A user changing
            # their own gets new tokens in the answer.
            changes["valid_since"] = now_ms() // 1000
        for key, column in (("displayName", "display_name"), ("photoUrl", "photo_url"), ("phoneNumber", "phone_number")):
            if key in body:
                changes[column] = self._profile(key, body[key])
        for attribute in body.get("deleteAttribute") or []:
            column = {"DISPLAY_NAME": "display_name", "PHOTO_URL": "photo_url"}.get(attribute)
            if column is None:
                raise ApiError(f"INVALID_REQUEST : unknown deleteAttribute {attribute}")
            changes[column] = None
        if "phone" in (body.get("deleteProvider") or []):
            changes["phone_number"] = None
        if "emailVerified" in body:
            changes["email_verified"] = int(bool(body["emailVerified"]))
        if "disableUser" in body:
            changes["disabled"] = int(bool(body["disableUser"]))
        if "customAttributes" in body:
            changes["custom_attributes"] = self._check_claims(body["customAttributes"])
        if "validSince" in body:
            try:
                changes["valid_since"] = int(body["validSince"])
            except (TypeError, ValueError, OverflowError):
                raise ApiError("INVALID_REQUEST : validSince must be epoch seconds") from None
            revoke = True  # revoke_refresh_tokens(uid)
        try:
            updated = self.store.update(user["uid"], changes)
        except KeyError:
            raise ApiError("EMAIL_EXISTS") from None
        if revoke:
            self.store.revoke_refresh_tokens(user["uid"])
        if revoke or "disableUser" in body:
            self._changed(user["uid"])
        out: dict[str, Any] = {"kind": "identitytoolkit#SetAccountInfoResponse", "localId": updated["uid"],
                               "emailVerified": bool(updated["email_verified"]),
                               "providerUserInfo": self._providers(updated)}
        for key, column in (("email", "email"), ("displayName", "display_name"), ("photoUrl", "photo_url")):
            if updated[column]:
                out[key] = updated[column]
        if updated["password_hash"]:
            out["passwordHash"] = REDACTED
        if new_tokens and end_user:
            out.update(self.session(updated, "password"))
        return out

    async def admin_delete(self, body: dict[str, Any]) -> dict[str, Any]:
        user = self._require_user(body.get("localId"))
        self.store.delete(user["uid"])
        self._changed(user["uid"])
        return {"kind": "identitytoolkit#DeleteAccountResponse"}

    async def admin_batch_delete(self, body: dict[str, Any]) -> dict[str, Any]:
        uids = body.get("localIds") or []
        if not isinstance(uids, list) or len(uids) > 1000:
            raise ApiError("INVALID_REQUEST : localIds must be a list of at most 1000 uids")
        for uid in uids:
            self.store.delete(str(uid))
            self._changed(str(uid))
        return {}

    def clear(self) -> dict[str, Any]:
        """The emulator's reset: every account goes, and every open session with it."""
        self.store.clear()
        self._changed(None)
        return {}

    def admin_batch_get(self, query: dict[str, str]) -> dict[str, Any]:
        try:
            limit = int(query.get("maxResults", "20"))
        except ValueError:
            raise ApiError("INVALID_REQUEST : maxResults must be an integer") from None
        if not 1 <= limit <= 1000:
            raise ApiError("INVALID_REQUEST : maxResults must be between 1 and 1000")
        rows = self.store.page(query.get("nextPageToken", ""), limit + 1)
        out: dict[str, Any] = {"kind": "identitytoolkit#DownloadAccountResponse"}
        if rows[:limit]:
            out["users"] = [self.user_info(u) for u in rows[:limit]]
        if len(rows) > limit:
            out["nextPageToken"] = rows[limit - 1]["uid"]
        return out


# ---- HTTP layer ------------------------------------------------------------------------------

_END_USER = {
    "signUp": AuthService.sign_up,
    "signInWithPassword": AuthService.sign_in_with_password,
    "signInWithCustomToken": AuthService.sign_in_with_custom_token,
    "lookup": AuthService.lookup_self,
    "update": AuthService.update_self,
    "delete": AuthService.delete_self,
}
_ADMIN = {
    "": AuthService.admin_create,
    ":lookup": AuthService.admin_lookup,
    ":update": AuthService.admin_update,
    ":delete": AuthService.admin_delete,
    ":batchDelete": AuthService.admin_batch_delete,
}
# End-user names whose admin form (Bearer owner + localId) goes to the admin handler.
_END_USER_AS_ADMIN = {"lookup": ":lookup", "update": ":update", "delete": ":delete"}
_PROJECT_ACCOUNTS = re.compile(rf"^{re.escape(IDT)}/v1/projects/([^/]+)/accounts(:\w+)?$")
_EMULATOR_ACCOUNTS = re.compile(r"^/emulator/v1/projects/([^/]+)/accounts$")
_EMULATOR_CONFIG = re.compile(r"^/emulator/v1/projects/([^/]+)/config$")


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def _is_admin(service: AuthService, request: web.Request) -> bool:
    """``Bearer owner`` / ``ya29.*`` (emulator mode; secure mode from this machine) or the admin
    credential; any other bearer token is a 401, as the emulator answers."""
    token = _bearer(request)
    if token is None:
        return False
    if service.ctx.security.admin_token(request, token, google_oauth=True):
        return True
    raise BAD_CREDENTIALS


def _has_key(request: web.Request) -> bool:
    return bool(request.query.get("key") or request.headers.get("x-goog-api-key"))


async def _json_body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    ctype = request.content_type
    if ctype == "application/x-www-form-urlencoded":
        return dict(await request.post())
    try:
        body = await request.json(loads=json.loads)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        raise ApiError("INVALID_REQUEST : body is not valid JSON") from None
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise ApiError("INVALID_REQUEST : body must be a JSON object")
    return body


_KEY_DOCUMENTS = {tokens.X509_PATH: "x509", tokens.JWKS_PATH: "jwks"}
_KEY_DOCUMENTS.update({"/www.googleapis.com" + p: kind for p, kind in list(_KEY_DOCUMENTS.items())})


def build_routes(service: AuthService, config: dict[str, Any]):
    security = service.ctx.security
    limit = security.limits.anonymous_signups_per_hour
    anonymous_signups = RateWindow(limit) if limit is not None else None

    async def dispatch(request: web.Request) -> web.StreamResponse:
        if request.method == "GET" and request.path in _KEY_DOCUMENTS:
            return key_document(_KEY_DOCUMENTS[request.path])
        try:
            return web.json_response(await route(request))
        except ApiError as exc:
            return exc.response()
        except web.HTTPRequestEntityTooLarge:
            return ApiError("INVALID_REQUEST : body too large", 413).response()
        except RecursionError:  # a JSON value nested too deeply for some step after parsing
            return ApiError("INVALID_REQUEST : body nested too deeply").response()

    def key_document(kind: str) -> web.Response:
        """The public keys that verify secure mode's ID tokens, as Google publishes its own."""
        key = security.signing_key
        if key is None:
            return ApiError("Not found: emulator mode signs no tokens (alg: none)", 404, "notFound").response()
        document = key.x509_document() if kind == "x509" else key.jwks_document()
        return web.json_response(document, headers={"Cache-Control": "public, max-age=3600"})

    def check_anonymous_signup(request: web.Request, body: dict[str, Any]) -> None:
        if anonymous_signups is None or body.get("email") is not None or body.get("password") is not None:
            return
        if not security.exempt(request) and not anonymous_signups.allow(security.client(request).ip):
            raise ApiError("TOO_MANY_ATTEMPTS_TRY_LATER : too many anonymous sign-ups from this address")

    async def route(request: web.Request) -> dict[str, Any]:
        path, method = request.path, request.method
        if path == "/" and method == "GET":
            return {"authEmulator": {"ready": True, "docs": "localbase: docs/ARCHITECTURE.md", "apiSpec": None}}
        if path.startswith(f"{IDT}/v1/accounts:") and method == "POST":
            name = path.rsplit(":", 1)[1]
            handler = _END_USER.get(name)
            if handler is None:
                raise ApiError(f"Not found: {name} is not supported by localbase", 404, "notFound")
            admin = _is_admin(service, request)
            if not admin and not _has_key(request):
                raise MISSING_KEY
            body = await _json_body(request)
            if admin and "localId" in body and name in _END_USER_AS_ADMIN:
                if name == "lookup" and isinstance(body["localId"], str):
                    body["localId"] = [body["localId"]]
                return await _ADMIN[_END_USER_AS_ADMIN[name]](service, body)
            if name == "signUp" and not admin:
                check_anonymous_signup(request, body)
            return await handler(service, body)
        if path == "/securetoken.googleapis.com/v1/token" and method == "POST":
            if not _has_key(request) and not _is_admin(service, request):
                raise MISSING_KEY
            return await service.refresh(await _json_body(request))
        if path.startswith("/emulator/") and not (security.anonymous_admin(request) or _is_admin(service, request)):
            raise BAD_CREDENTIALS  # secure mode: resetting every account is an admin's act
        if m := _PROJECT_ACCOUNTS.match(path):
            if not _is_admin(service, request):
                raise MISSING_KEY
            if m.group(1) != service.project_id:
                raise ApiError(f"PROJECT_NOT_FOUND : this localbase serves project {service.project_id}")
            op = m.group(2) or ""
            if op == ":batchGet" and method == "GET":
                return service.admin_batch_get(dict(request.query))
            if op in _ADMIN and method == "POST":
                return await _ADMIN[op](service, await _json_body(request))
        elif m := _EMULATOR_ACCOUNTS.match(path):
            if method == "DELETE":
                return service.clear()
        elif m := _EMULATOR_CONFIG.match(path):
            if method == "GET":
                return config
            if method == "PATCH":
                body = await _json_body(request)
                sign_in = body.get("signIn")
                if isinstance(sign_in, dict) and sign_in.get("allowDuplicateEmails"):
                    raise ApiError("INVALID_REQUEST : localbase does not support duplicate emails")
                return config
        raise ApiError(f"Not found: {method} {path}", 404, "notFound")

    return dispatch
