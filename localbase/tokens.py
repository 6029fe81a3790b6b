"""Firebase ID tokens and custom tokens, in the two forms localbase speaks.

* Emulator mode (:data:`UNSIGNED`): the Auth emulator's format, unsigned JWTs (``alg: none``), which
  firebase-admin mints and accepts against an emulator. Anyone can write one for any uid, so this
  mode is for tests and one developer's machine (docs/ARCHITECTURE.md, "localbase trust model").
* Secure mode (:class:`SigningKey`): RS256 JWTs with a ``kid`` header, signed with an RSA key that
  localbase keeps in its data directory, exactly the shape production's Secure Token service issues;
  the public keys are served the way Google serves them (an x509 JSON and a JWKS). Unsigned, expired
  or wrongly signed tokens are refused. Signing and verification are PyJWT's and cryptography's.

Unlike the official emulator, localbase enforces ``exp`` when it checks a token for rules, because a
patient app that keeps using an expired token against production would fail there too.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Protocol

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

ISSUER_PREFIX = "https://securetoken.google.com/"
LIFETIME_S = 3600
CUSTOM_TOKEN_AUDIENCE = "https://identitytoolkit.googleapis.com/google.identity.identitytoolkit.v1.IdentityToolkit"
# Where Google publishes the Secure Token service's public keys (x509 PEMs by kid, and a JWKS);
# localbase serves the same documents on its Auth port under these paths.
X509_PATH = "/robot/v1/metadata/x509/securetoken@system.gserviceaccount.com"
JWKS_PATH = "/service_accounts/v1/jwk/securetoken@system.gserviceaccount.com"
KEY_FILE = "signing-key.pem"
LOCALBASE_ISSUER = "localbase@localbase.invalid"  # iss/sub of custom tokens localbase's key signs


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
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidToken(f"unreadable JWT payload: {str(exc)[:100]}") from None
    if not isinstance(payload, dict):
        raise InvalidToken("JWT payload is not an object")
    return payload


def check_id_claims(claims: dict[str, Any], project_id: str, now: float | None = None) -> dict[str, Any]:
    """The checks production makes on an ID token's claims (audience, issuer, subject, expiry)."""
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


def decode_id_token(token: str, project_id: str, now: float | None = None) -> dict[str, Any]:
    """Check an emulator-format ID token the way production would, except for a signature."""
    return check_id_claims(decode_unverified(token), project_id, now)


def id_token_payload(
    project_id: str, uid: str, claims: dict[str, Any] | None = None, now: float | None = None, **standard: Any
) -> dict[str, Any]:
    """An ID token's claims; custom claims first so standard fields win on clashes."""
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
    return payload


class TokenCodec(Protocol):
    """How one localbase mode writes and checks tokens (see the module docstring)."""

    signed: bool

    def encode(self, payload: dict[str, Any]) -> str: ...

    def decode_id_token(self, token: str, project_id: str, now: float | None = None) -> dict[str, Any]: ...

    def decode_custom_token(self, token: str) -> dict[str, Any]: ...


class _Unsigned:
    """Emulator mode: ``alg: none`` tokens, claims checked but nothing verified."""

    signed = False

    @staticmethod
    def encode(payload: dict[str, Any]) -> str:
        return encode_unsigned(payload)

    @staticmethod
    def decode_id_token(token: str, project_id: str, now: float | None = None) -> dict[str, Any]:
        return decode_id_token(token, project_id, now)

    @staticmethod
    def decode_custom_token(token: str) -> dict[str, Any]:
        return decode_unverified(token)


UNSIGNED: TokenCodec = _Unsigned()


def mint_id_token(
    project_id: str, uid: str, claims: dict[str, Any] | None = None, now: float | None = None,
    signer: TokenCodec | None = None, **standard: Any,
) -> str:
    """An ID token for ``uid``: unsigned (emulator format) unless a ``signer`` (a
    :class:`SigningKey`) is given. Tests and tools use this to make tokens of any age."""
    return (signer or UNSIGNED).encode(id_token_payload(project_id, uid, claims, now, **standard))


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret file readable by its owner only (0600 from the start, never world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class SigningKey:
    """Secure mode's RSA key: signs ID and custom tokens (RS256, ``kid``) and verifies them.

    The private key lives in ``<data dir>/signing-key.pem`` (mode 0600), made on first start, so
    tokens stay valid across restarts; deleting the file rotates the key (every session must then
    sign in again). Verified signatures are cached per token string: a token's signature cannot
    change, while expiry and revocation are still checked on every use.
    """

    signed = True
    CACHE_SIZE = 4096

    def __init__(self, private_key: rsa.RSAPrivateKey):
        self.private_key = private_key
        self.public_key = private_key.public_key()
        spki = self.public_key.public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        self.kid = hashlib.sha1(spki).hexdigest()  # 40 hex digits, as Google's key ids look
        self._cache: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self.cert_pem = self._self_signed_cert()

    @classmethod
    def load_or_create(cls, data_dir: Path) -> SigningKey:
        """The key in ``data_dir`` (created there on first use, mode 0600)."""
        path = Path(data_dir) / KEY_FILE
        if path.exists():
            os.chmod(path, 0o600)
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(key, rsa.RSAPrivateKey):
                raise ValueError(f"{path} does not hold an RSA private key")
            return cls(key)
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        _write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return cls(key)

    def _self_signed_cert(self) -> str:
        """An x509 certificate for the public key, the form Google's x509 endpoint publishes."""
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "securetoken.system.gserviceaccount.com")])
        now = dt.datetime.now(dt.UTC)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(self.public_key)
                .serial_number(int(self.kid[:30], 16)).not_valid_before(now - dt.timedelta(days=1))
                .not_valid_after(now + dt.timedelta(days=365))
                .sign(self.private_key, hashes.SHA256()))
        return cert.public_bytes(serialization.Encoding.PEM).decode()

    # ---- signing -----------------------------------------------------------------------------------
    def encode(self, payload: dict[str, Any]) -> str:
        return jwt.encode(payload, self.private_key, algorithm="RS256", headers={"kid": self.kid})

    def mint_custom_token(self, uid: str, claims: dict[str, Any] | None = None, now: float | None = None) -> str:
        """A custom token for ``signInWithCustomToken`` in secure mode (what a service account's key
        signs in production); only holders of this key (the data directory) can make one."""
        issued = int(time.time() if now is None else now)
        payload: dict[str, Any] = {"iss": LOCALBASE_ISSUER, "sub": LOCALBASE_ISSUER, "aud": CUSTOM_TOKEN_AUDIENCE,
                                   "uid": uid, "iat": issued, "exp": issued + LIFETIME_S}
        if claims:
            payload["claims"] = claims
        return self.encode(payload)

    # ---- verification ------------------------------------------------------------------------------
    def _verified(self, token: str, audience: str, issuer: str | None) -> dict[str, Any]:
        """Signature, algorithm, key id, audience and issuer checked (expiry is the caller's)."""
        cache_key = f"{audience}\n{token}"
        with self._lock:
            hit = self._cache.get(cache_key)
            if hit is not None:
                self._cache.move_to_end(cache_key)
                return dict(hit)
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidToken("not a JWT") from None
        if header.get("alg") != "RS256":
            raise InvalidToken("token is not signed (RS256 required)")
        if header.get("kid") != self.kid:
            raise InvalidToken("token is signed by an unknown key")
        try:
            claims = jwt.decode(token, self.public_key, algorithms=["RS256"], audience=audience, issuer=issuer,
                                options={"require": ["exp", "iat"], "verify_exp": False}, leeway=5)
        except jwt.InvalidAudienceError:
            raise InvalidToken("token audience is not this project") from None
        except jwt.InvalidIssuerError:
            raise InvalidToken("token issuer is not this project") from None
        except (jwt.PyJWTError, ValueError, RecursionError) as exc:
            raise InvalidToken(f"invalid token: {str(exc)[:100]}") from None
        with self._lock:
            self._cache[cache_key] = claims
            if len(self._cache) > self.CACHE_SIZE:
                self._cache.popitem(last=False)
        return dict(claims)

    def decode_id_token(self, token: str, project_id: str, now: float | None = None) -> dict[str, Any]:
        claims = self._verified(token, project_id, ISSUER_PREFIX + project_id)
        return check_id_claims(claims, project_id, now)

    def decode_custom_token(self, token: str) -> dict[str, Any]:
        payload = self._verified(token, CUSTOM_TOKEN_AUDIENCE, None)
        exp, iat = payload.get("exp"), payload.get("iat")
        if not isinstance(exp, int | float) or exp <= time.time():
            raise InvalidToken("custom token expired")
        if not isinstance(iat, int | float) or exp - iat > LIFETIME_S:
            raise InvalidToken("custom token lives longer than one hour")
        return payload

    # ---- public key documents ----------------------------------------------------------------------
    def x509_document(self) -> dict[str, str]:
        """``{kid: PEM certificate}``, as Google's x509 metadata endpoint answers."""
        return {self.kid: self.cert_pem}

    def jwks_document(self) -> dict[str, Any]:
        jwk = jwt.algorithms.RSAAlgorithm.to_jwk(self.public_key, as_dict=True)
        jwk.update({"kid": self.kid, "alg": "RS256", "use": "sig"})
        return {"keys": [jwk]}
