"""Firebase ID tokens in the Auth emulator's format (unsigned JWTs, ``alg: none``).

Unlike the official emulator, localbase enforces ``exp`` when it checks a token for rules, because
a patient app that keeps using an expired token against production would fail there too.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

ISSUER_PREFIX = "https://securetoken.google.com/"
LIFETIME_S = 3600


class InvalidToken(ValueError):
    pass


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def encode_unsigned(payload: dict[str, Any]) -> str:
    header = {"alg": "none", "typ": "JWT"}
    return f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(payload).encode())}."


def decode_unverified(token: str) -> dict[str, Any]:
    parts = token.split(".")
    if len(parts) != 3:
        raise InvalidToken("not a JWT")
    try:
        payload = json.loads(_unb64url(parts[1]))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidToken(f"unreadable JWT payload: {exc}") from None
    if not isinstance(payload, dict):
        raise InvalidToken("JWT payload is not an object")
    return payload


def decode_id_token(token: str, project_id: str, now: float | None = None) -> dict[str, Any]:
    """Check an ID token the way production would (audience, issuer, subject, expiry)."""
    claims = decode_unverified(token)
    if claims.get("aud") != project_id:
        raise InvalidToken("token audience is not this project")
    if claims.get("iss") != ISSUER_PREFIX + project_id:
        raise InvalidToken("token issuer is not this project")
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub or len(sub) > 128:
        raise InvalidToken("token has no valid subject")
    exp = claims.get("exp")
    if not isinstance(exp, int | float) or exp <= (time.time() if now is None else now):
        raise InvalidToken("token expired")
    return claims


def mint_id_token(
    project_id: str, uid: str, claims: dict[str, Any] | None = None, now: float | None = None, **standard: Any
) -> str:
    """An emulator-format ID token; custom claims first so standard fields win on clashes."""
    issued = int(time.time() if now is None else now)
    payload: dict[str, Any] = dict(claims or {})
    payload.update(standard)
    payload.update(
        {
            "iat": issued,
            "exp": issued + LIFETIME_S,
            "auth_time": standard.get("auth_time", issued),
            "aud": project_id,
            "iss": ISSUER_PREFIX + project_id,
            "sub": uid,
            "user_id": uid,
        }
    )
    return encode_unsigned(payload)
