"""localbase's secure mode (issue 16, section 3) against real processes and the real client libraries.

A clinic server that phones reach over the network: ID and custom tokens are RS256-signed by
localbase's own key (public keys served at Google's paths), unsigned or wrongly signed tokens are
refused everywhere, admin power needs this machine or the admin credential, TLS on request, CORS only
for named origins, and limits on what one client may hold. Callers "from another machine" are
simulated with ``--no-local-trust`` (connections from this machine then count as remote), or by
connecting from other loopback addresses (127.0.0.x) where a test needs many client addresses.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import socket
import stat
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import firebase_admin
import google.auth.credentials
import google.auth.exceptions
import google.auth.transport.requests
import jwt
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from firebase_admin import auth as admin_auth
from firebase_admin import credentials as fb_credentials
from firebase_admin import db
from google.api_core import exceptions as gexc
from google.cloud import storage as gcs
from google.oauth2 import id_token as google_id_token

from dermaloop import admin_app
from dermaloop import auth as dl_auth
from dermaloop.storage import admin_bucket
from localbase import tokens
from localbase.security import choose_secure, is_loopback_host
from tests.localbase_process import LocalbaseProcess
from tests.rtdb_helpers import RawStream, wait_for

PORTAL = "https://portal.clinic.example"
OWNER = {"Authorization": "Bearer owner"}
IDT = "/identitytoolkit.googleapis.com/v1"
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")


class BearerCredential(google.auth.credentials.Credentials):
    """A google-auth credential that sends localbase's admin credential as its bearer token (what a
    server program on another machine would use with google-cloud-storage and firebase-admin)."""

    def __init__(self, token: str):
        super().__init__()
        self.token = token

    def refresh(self, request) -> None:  # a fixed secret: nothing to refresh
        pass


class AdminCredential(fb_credentials.Base):
    def __init__(self, token: str):
        self._credential = BearerCredential(token)

    def get_credential(self):
        return self._credential


def _start(tmp_path_factory, name: str, **options) -> LocalbaseProcess:
    return LocalbaseProcess(data_dir=tmp_path_factory.mktemp(name), secure=True, **options).start()


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """Secure mode on loopback: the test process is a program on this machine (``owner`` works)."""
    lb = _start(tmp_path_factory, "secure-local", extra_args=["--cors-origin", PORTAL],
                env={"LOCALBASE_UPLOADS_PER_USER": "2", "LOCALBASE_RTDB_KEEPALIVE_S": "0.5"})
    yield lb
    lb.stop()


@pytest.fixture(scope="module")
def local_app(local):
    app = admin_app.get_app(local.settings(), name="secure-local")
    yield app
    admin_app.delete_app("secure-local")


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    """Secure mode where every caller counts as another machine, with small limits."""
    lb = _start(tmp_path_factory, "secure-remote", extra_args=["--no-local-trust", "--cors-origin", PORTAL], env={
        "LOCALBASE_HEADER_TIMEOUT_S": "2", "LOCALBASE_BODY_IDLE_S": "1", "LOCALBASE_MAX_CONNECTIONS": "60",
        "LOCALBASE_CONNECTIONS_PER_CLIENT": "12", "LOCALBASE_STREAMS_PER_CLIENT": "2",
        "LOCALBASE_ANON_SIGNUPS_PER_HOUR": "3", "LOCALBASE_RTDB_KEEPALIVE_S": "0.5"})
    yield lb
    lb.stop()


def _bearer(lb: LocalbaseProcess) -> dict[str, str]:
    return {"Authorization": f"Bearer {lb.admin_credential}"}


def _sign_up(lb: LocalbaseProcess) -> dl_auth.UserSession:
    return dl_auth.AuthClient(lb.settings()).sign_up(f"u-{uuid.uuid4().hex[:10]}@example.com", "secret123")


def _other_key_token(lb: LocalbaseProcess, uid: str, kid: str) -> str:
    """A token shaped exactly like localbase's, with its kid, but signed by a different RSA key."""
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    payload = tokens.id_token_payload(lb.project_id, uid)
    return jwt.encode(payload, other, algorithm="RS256", headers={"kid": kid})


def _alg_confusion_token(lb: LocalbaseProcess, uid: str, key: tokens.SigningKey) -> str:
    """HS256 'signed' with localbase's public key as the secret: the classic algorithm confusion."""
    import base64
    import hashlib
    import hmac

    public_pem = key.public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": key.kid}).encode())
    body = b64(json.dumps(tokens.id_token_payload(lb.project_id, uid)).encode())
    signature = hmac.new(public_pem, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(signature)}"


# ---- signed tokens ------------------------------------------------------------------------------


def test_tokens_are_rs256_and_verify_against_the_keys_served_like_googles(local):
    session = _sign_up(local)
    token = session.id_token()
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "RS256" and len(header["kid"]) == 40
    request = google.auth.transport.requests.Request()
    for prefix in ("", "/www.googleapis.com"):
        certs = f"{local.auth_url}{prefix}{tokens.X509_PATH}"
        claims = google_id_token.verify_token(token, request, audience=local.project_id, certs_url=certs)
        assert claims["sub"] == session.uid and claims["iss"] == f"https://securetoken.google.com/{local.project_id}"
    signing_key = jwt.PyJWKClient(f"{local.auth_url}{tokens.JWKS_PATH}").get_signing_key_from_jwt(token)
    assert jwt.decode(token, signing_key.key, algorithms=["RS256"], audience=local.project_id)["sub"] == session.uid
    refreshed = dl_auth.AuthClient(local.settings()).refresh(session.refresh_token)
    assert jwt.get_unverified_header(refreshed.id_token())["kid"] == header["kid"]


def test_unsigned_and_wrongly_signed_tokens_are_refused_everywhere(local, local_app):
    session = _sign_up(local)
    uid, key = session.uid, local.signing_key()
    settings = local.settings()
    bucket = settings.storage_bucket
    forged = {
        "unsigned (alg none)": tokens.mint_id_token(local.project_id, uid),
        "another key, same kid": _other_key_token(local, uid, key.kid),
        "HS256 with the public key": _alg_confusion_token(local, uid, key),
        "expired": tokens.mint_id_token(local.project_id, uid, signer=key, now=time.time() - 2 * tokens.LIFETIME_S),
        "another project": tokens.mint_id_token("another-project", uid, signer=key),
        "garbage": "x.y.z",
    }
    good = session.id_token()
    object_url = f"{local.storage_url}/v0/b/{bucket}/o/{quote('models/device/none.tflite', safe='')}"

    def probes(token: str, display_name: str = "Mallory") -> dict[str, int]:
        params = {"ns": settings.database_namespace, "auth": token}
        stream = RawStream(f"{local.database_url}/users/{uid}.json", params=params)
        stream.close()
        lookup = requests.post(f"{local.auth_url}{IDT}/accounts:lookup", params={"key": "k"}, json={"idToken": token},
                               timeout=30)
        update = requests.post(f"{local.auth_url}{IDT}/accounts:update", params={"key": "k"}, timeout=30,
                               json={"idToken": token, "displayName": display_name})
        return {
            "rtdb read": requests.get(f"{local.database_url}/users/{uid}.json", params=params, timeout=30).status_code,
            "rtdb write": requests.patch(f"{local.database_url}/users/{uid}.json", params=params, timeout=30,
                                         data=json.dumps({"displayName": display_name})).status_code,
            "rtdb stream": stream.status,
            "storage v0": requests.get(object_url, headers={"Authorization": f"Firebase {token}"}, timeout=30).status_code,
            "auth lookup": lookup.status_code,
            "auth update": update.status_code,
        }

    assert probes(good, "Pat") == {"rtdb read": 200, "rtdb write": 200, "rtdb stream": 200, "storage v0": 404,
                            "auth lookup": 200, "auth update": 200}
    for name, token in forged.items():
        got = probes(token)
        assert got == {"rtdb read": 401, "rtdb write": 401, "rtdb stream": 401, "storage v0": 401,
                       "auth lookup": 400, "auth update": 400}, (name, got)
    assert admin_auth.get_user(uid, app=local_app).display_name == "Pat"

    # Custom tokens: firebase-admin's emulator-mode (unsigned) ones are refused, the key's accepted.
    unsigned_custom = admin_auth.create_custom_token("custom-uid", app=local_app).decode()
    refused = requests.post(f"{local.auth_url}{IDT}/accounts:signInWithCustomToken", params={"key": "k"},
                            json={"token": unsigned_custom, "returnSecureToken": True}, timeout=30)
    assert refused.status_code == 400 and refused.json()["error"]["message"].startswith("INVALID_CUSTOM_TOKEN")
    accepted = requests.post(f"{local.auth_url}{IDT}/accounts:signInWithCustomToken", params={"key": "k"},
                             json={"token": key.mint_custom_token("custom-uid", {"role": "patient"}),
                                   "returnSecureToken": True}, timeout=30)
    assert accepted.status_code == 200, accepted.text
    claims = jwt.decode(accepted.json()["idToken"], key.public_key, algorithms=["RS256"], audience=local.project_id)
    assert claims["sub"] == "custom-uid" and claims["role"] == "patient"


# ---- admin power --------------------------------------------------------------------------------


def test_owner_from_this_machine_is_admin_but_not_from_a_browser_page(local):
    ns = {"ns": local.settings().database_namespace}
    assert requests.get(f"{local.database_url}/.json", params=ns, headers=OWNER, timeout=30).status_code == 200
    page = {**OWNER, "Origin": "http://evil.example"}
    rebound = {**OWNER, "Host": f"evil.example:{local.ports['database']}"}
    for headers in (page, rebound):
        assert requests.get(f"{local.database_url}/.json", params=ns, headers=headers, timeout=30).status_code == 401
        assert requests.get(f"{local.database_url}/.json", params={**ns, "access_token": "owner"}, timeout=30,
                            headers={k: v for k, v in headers.items() if k != "Authorization"}).status_code == 401
    lookup = requests.post(f"{local.auth_url}{IDT}/projects/{local.project_id}/accounts:lookup", json={"localId": ["x"]},
                           headers=page, timeout=30)
    assert lookup.status_code == 401
    wipe = requests.delete(f"{local.auth_url}/emulator/v1/projects/{local.project_id}/accounts",
                           headers={"Origin": "http://evil.example"}, timeout=30)
    assert wipe.status_code == 401
    listing = requests.get(f"{local.storage_url}/storage/v1/b/{local.settings().storage_bucket}/o",
                           headers={"Origin": "http://evil.example"}, timeout=30)
    assert listing.status_code == 401


def test_callers_from_elsewhere_need_the_admin_credential(remote):
    settings = remote.settings()
    ns = {"ns": settings.database_namespace}
    admin = _bearer(remote)
    # Realtime Database
    for headers, params in ((OWNER, {}), ({}, {"access_token": "owner"}), ({"Authorization": "Bearer ya29.x"}, {})):
        r = requests.get(f"{remote.database_url}/.json", params={**ns, **params}, headers=headers, timeout=30)
        assert r.status_code == 401, (headers, params)
    assert requests.put(f"{remote.database_url}/secret.json", params=ns, headers=admin, data='"s"', timeout=30).ok
    assert requests.get(f"{remote.database_url}/secret.json", params=ns, headers=admin, timeout=30).json() == "s"
    assert requests.get(f"{remote.database_url}/secret.json", params={**ns, "access_token": remote.admin_credential},
                        timeout=30).json() == "s"
    assert requests.get(f"{remote.database_url}/.settings/rules.json", headers=OWNER, timeout=30).status_code == 401
    assert requests.get(f"{remote.database_url}/.settings/rules.json", headers=admin, timeout=30).status_code == 200
    assert requests.get(f"{remote.database_url}/.inspect/databases.json", timeout=30).status_code == 401
    # Auth
    accounts = f"{remote.auth_url}{IDT}/projects/{remote.project_id}/accounts"
    created = requests.post(accounts, json={"email": f"d-{uuid.uuid4().hex[:8]}@example.com", "password": "secret123"},
                            headers=admin, timeout=30)
    assert created.status_code == 200, created.text
    uid = created.json()["localId"]
    for headers in (OWNER, {"Authorization": "Bearer ya29.anything"}):
        assert requests.post(f"{accounts}:lookup", json={"localId": [uid]}, headers=headers, timeout=30).status_code == 401
    assert requests.post(f"{accounts}:lookup", json={"localId": [uid]}, timeout=30).status_code == 403
    assert requests.post(f"{accounts}:lookup", json={"localId": [uid]}, headers=admin, timeout=30).json()["users"]
    emulator = f"{remote.auth_url}/emulator/v1/projects/{remote.project_id}"
    assert requests.delete(f"{emulator}/accounts", timeout=30).status_code == 401
    assert requests.get(f"{emulator}/config", timeout=30).status_code == 401
    assert requests.post(f"{accounts}:lookup", json={"localId": [uid]}, headers=admin, timeout=30).json()["users"]
    # Storage: the GCS JSON API answers only the credential; /v0 `owner` is not admin from here.
    anonymous = gcs.Client(project=remote.project_id, credentials=google.auth.credentials.AnonymousCredentials(),
                           client_options={"api_endpoint": remote.storage_url})
    # (a 401 makes google-auth try to refresh the anonymous credential, which raises in its turn)
    refused = (gexc.Unauthorized, google.auth.exceptions.GoogleAuthError)
    with pytest.raises(refused):
        anonymous.bucket(settings.storage_bucket).blob("models/x.bin").upload_from_string(b"x")
    with pytest.raises(refused):
        list(anonymous.list_blobs(settings.storage_bucket))
    authorised = gcs.Client(project=remote.project_id, credentials=BearerCredential(remote.admin_credential),
                            client_options={"api_endpoint": remote.storage_url})
    blob = authorised.bucket(settings.storage_bucket).blob("models/remote.bin")
    blob.upload_from_string(b"published", content_type="application/octet-stream")
    assert blob.download_as_bytes() == b"published"
    assert [b.name for b in authorised.list_blobs(settings.storage_bucket, prefix="models/")] == ["models/remote.bin"]
    v0 = f"{remote.storage_url}/v0/b/{settings.storage_bucket}/o/{quote('models/remote.bin', safe='')}"
    assert requests.get(v0, headers=OWNER, timeout=30).status_code == 401
    assert requests.post(v0, params={"create_token": "true"}, headers=admin, timeout=30).status_code == 200
    # The secrets are readable by their owner only.
    for name in ("admin-credential.json", "signing-key.pem"):
        assert stat.S_IMODE(os.stat(remote.data_dir / name).st_mode) == 0o600, name


def _tls_files(directory: Path) -> tuple[Path, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localbase test")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_server_programs_elsewhere_use_the_credential_over_tls(tmp_path_factory, monkeypatch):
    cert, key = _tls_files(tmp_path_factory.mktemp("tls"))
    lb = _start(tmp_path_factory, "secure-tls", extra_args=["--no-local-trust", "--cert", str(cert), "--key", str(key)])
    try:
        assert lb.scheme == "https" and lb.database_url.startswith("https://")
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
        # firebase-admin in its production mode (https URL, no emulator variable) with the credential:
        app = firebase_admin.initialize_app(AdminCredential(lb.admin_credential),
                                            {"databaseURL": lb.database_url, "projectId": lb.project_id},
                                            name="secure-tls")
        try:
            ref = db.reference(f"/worker/{uuid.uuid4().hex}", app=app)
            ref.set({"status": "ok"})
            assert ref.get() == {"status": "ok"}
        finally:
            firebase_admin.delete_app(app)
        client = gcs.Client(project=lb.project_id, credentials=BearerCredential(lb.admin_credential),
                            client_options={"api_endpoint": lb.storage_url})
        blob = client.bucket(f"{lb.project_id}.appspot.com").blob("models/over-tls.bin")
        blob.upload_from_string(b"tls bytes")
        assert blob.download_as_bytes() == b"tls bytes"
        accounts = f"{lb.auth_url}{IDT}/projects/{lb.project_id}/accounts"
        assert requests.post(accounts, json={}, headers=_bearer(lb), timeout=30).status_code == 200
        # Really TLS: plain HTTP is not answered, and an unknown certificate is refused by the client.
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{lb.ports['auth']}/", timeout=10)
        monkeypatch.delenv("REQUESTS_CA_BUNDLE")
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(f"{lb.auth_url}/", timeout=10)
    finally:
        lb.stop()


# ---- the mode by default ------------------------------------------------------------------------


def test_secure_mode_is_the_default_beyond_loopback():
    assert not choose_secure("127.0.0.1") and not choose_secure("localhost") and not choose_secure("::1")
    assert choose_secure("0.0.0.0") and choose_secure("") and choose_secure("192.168.1.20")
    assert choose_secure("127.0.0.1", secure=True)
    assert not choose_secure("0.0.0.0", insecure=True)
    with pytest.raises(ValueError):
        choose_secure("127.0.0.1", secure=True, insecure=True)
    assert is_loopback_host("127.0.0.5") and not is_loopback_host("")


def _lan_address() -> str | None:
    """A non-loopback IPv4 address of this machine, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent; this only picks the outgoing interface
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if ipaddress.ip_address(address).is_loopback else address


def test_listening_on_a_lan_address_is_secure_unless_insecure(tmp_path_factory):
    address = _lan_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to listen on")
    lb = LocalbaseProcess(data_dir=tmp_path_factory.mktemp("lan"), host=address).start()
    try:
        assert any("secure mode" in line for line in lb.output)
        assert any("WITHOUT TLS" in line for line in lb.output)  # the warning an operator must see
        ns = {"ns": lb.settings().database_namespace}
        unsigned = tokens.mint_id_token(lb.project_id, "someone")
        assert requests.get(f"{lb.database_url}/users/someone.json", params={**ns, "auth": unsigned},
                            timeout=30).status_code == 401
        # This machine connecting to its own LAN address is still "this machine": owner works.
        assert requests.get(f"{lb.database_url}/.json", params=ns, headers=OWNER, timeout=30).status_code == 200
    finally:
        lb.stop()
    emulator = LocalbaseProcess(data_dir=tmp_path_factory.mktemp("lan-insecure"), host=address,
                                extra_args=["--insecure"]).start()
    try:
        assert any("EMULATOR MODE" in line for line in emulator.output)
        ns = {"ns": emulator.settings().database_namespace}
        unsigned = tokens.mint_id_token(emulator.project_id, "someone")
        assert requests.get(f"{emulator.database_url}/users/someone.json", params={**ns, "auth": unsigned},
                            timeout=30).status_code == 200
    finally:
        emulator.stop()


# ---- CORS ---------------------------------------------------------------------------------------


def test_cors_answers_only_configured_origins(local):
    ns = {"ns": local.settings().database_namespace}
    urls = {"database": f"{local.database_url}/public.json", "auth": f"{local.auth_url}/",
            "storage": f"{local.storage_url}/v0/"}
    for service, url in urls.items():
        evil = requests.get(url, params=ns, headers={"Origin": "https://evil.example"}, timeout=30)
        assert "Access-Control-Allow-Origin" not in evil.headers, service
        ours = requests.get(url, params=ns, headers={"Origin": PORTAL}, timeout=30)
        assert ours.headers.get("Access-Control-Allow-Origin") == PORTAL, service
        preflight = {"Access-Control-Request-Method": "PUT", "Access-Control-Request-Headers": "authorization, content-type"}
        refused = requests.options(url, headers={"Origin": "https://evil.example", **preflight}, timeout=30)
        assert refused.status_code == 403 and "Access-Control-Allow-Origin" not in refused.headers, service
        allowed = requests.options(url, headers={"Origin": PORTAL, **preflight}, timeout=30)
        assert allowed.status_code == 204 and allowed.headers["Access-Control-Allow-Origin"] == PORTAL, service
        assert "authorization" in allowed.headers["Access-Control-Allow-Headers"], service
    stream = RawStream(f"{local.database_url}/public.json", params=ns, headers={"Origin": "https://evil.example"})
    stream.close()
    assert "Access-Control-Allow-Origin" not in stream._response.headers


def test_emulator_mode_keeps_its_cors_wildcard(localbase):
    r = requests.get(f"{localbase.database_url}/public.json", params={"ns": "cors-probe"},
                     headers={"Origin": "https://anything.example"}, timeout=30)
    assert r.headers["Access-Control-Allow-Origin"] == "*"


# ---- limits -------------------------------------------------------------------------------------


def _half_open(port: int, source: str) -> socket.socket:
    """A connection that sends half a request head and then nothing (slowloris)."""
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"GET /x.json HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: 1\r\n")
    return sock


def _closed_by_server(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1024) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True  # reset by the server
    finally:
        sock.setblocking(True)


def test_half_open_connections_do_not_stop_a_normal_request(remote):
    held: list[socket.socket] = []
    try:
        for client in range(2, 17):  # 15 client addresses x 10 connections, more than the server holds
            for _ in range(10):
                held.append(_half_open(remote.ports["database"], f"127.0.0.{client}"))
        assert requests.get(f"{remote.auth_url}/", timeout=30).status_code == 200
        ns = {"ns": remote.settings().database_namespace}
        assert requests.get(f"{remote.database_url}/x.json", params=ns, headers=_bearer(remote), timeout=30).ok
        # One client past its connection cap is refused at once; the rest time out soon enough.
        crowd = [_half_open(remote.ports["storage"], "127.0.0.30") for _ in range(14)]
        held += crowd
        assert wait_for(lambda: sum(_closed_by_server(s) for s in crowd) >= 2, timeout=30)
        assert wait_for(lambda: all(_closed_by_server(s) for s in held), timeout=60)
    finally:
        for sock in held:
            sock.close()
    assert requests.get(f"{remote.auth_url}/", timeout=30).status_code == 200


def test_a_stalled_request_body_ends_the_connection(remote):
    ns = remote.settings().database_namespace
    with socket.create_connection(("127.0.0.1", remote.ports["database"]), timeout=30) as sock:
        sock.sendall(f"PUT /stalled.json?ns={ns} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n"
                     f"Authorization: Bearer {remote.admin_credential}\r\n\r\n".encode() + b'"' + b"x" * 100)
        assert wait_for(lambda: _closed_by_server(sock), timeout=60)
    assert requests.get(f"{remote.database_url}/stalled.json", params={"ns": ns}, headers=_bearer(remote),
                        timeout=30).json() is None


def test_streams_per_client_are_capped(remote):
    url = f"{remote.database_url}/feed.json"
    params = {"ns": remote.settings().database_namespace}
    streams = [RawStream(url, params=params, headers=_bearer(remote)) for _ in range(2)]
    try:
        assert [s.status for s in streams] == [200, 200]
        third = RawStream(url, params=params, headers=_bearer(remote))
        assert third.status == 429 and "Too many streams" in json.loads(third.body)["error"]
        streams[0].close()

        def another_opens() -> bool:
            stream = RawStream(url, params=params, headers=_bearer(remote))
            stream.close()
            return stream.status == 200

        assert wait_for(another_opens, timeout=30)
    finally:
        for s in streams:
            s.close()


def test_anonymous_sign_ups_per_address_are_capped(remote):
    signup = f"{remote.auth_url}{IDT}/accounts:signUp"
    answers = [requests.post(signup, params={"key": "k"}, json={"returnSecureToken": True}, timeout=30) for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 400]
    assert answers[-1].json()["error"]["message"].startswith("TOO_MANY_ATTEMPTS_TRY_LATER")
    email = requests.post(signup, params={"key": "k"}, timeout=30,
                          json={"email": f"e-{uuid.uuid4().hex[:8]}@example.com", "password": "secret123"})
    assert email.status_code == 200  # the cap is on anonymous accounts only


def _start_upload(lb: LocalbaseProcess, session: dl_auth.UserSession, path: str) -> str:
    r = requests.post(f"{lb.storage_url}/v0/b/{lb.settings().storage_bucket}/o", params={"name": path}, json={},
                      timeout=30, headers={"Authorization": f"Firebase {session.id_token()}",
                                           "X-Goog-Upload-Protocol": "resumable", "X-Goog-Upload-Command": "start",
                                           "X-Goog-Upload-Header-Content-Length": "4",
                                           "X-Goog-Upload-Header-Content-Type": "image/jpeg"})
    assert r.status_code == 200, r.text
    return r.headers["X-Goog-Upload-URL"]


def _query(session: dl_auth.UserSession, url: str) -> requests.Response:
    return requests.post(url, headers={"Authorization": f"Firebase {session.id_token()}",
                                       "X-Goog-Upload-Command": "query"}, timeout=30)


def _patient(lb: LocalbaseProcess) -> dl_auth.UserSession:
    email = f"pat-{uuid.uuid4().hex[:8]}@example.com"
    dl_auth.create_user(email, "secret123", "patient", settings=lb.settings())
    return dl_auth.AuthClient(lb.settings()).sign_in(email, "secret123")


def test_unfinished_uploads_per_user_are_capped(local, local_app):
    patient = _patient(local)
    urls = [_start_upload(local, patient, f"cases/{patient.uid}/c{i}/image.jpg") for i in range(3)]
    assert _query(patient, urls[0]).status_code == 404  # the oldest made room (quota 2 here)
    assert [_query(patient, u).headers["X-Goog-Upload-Status"] for u in urls[1:]] == ["active", "active"]
    done = requests.post(urls[2], data=b"\xff\xd8\xff\xe0", timeout=30,
                         headers={"Authorization": f"Firebase {patient.id_token()}",
                                  "X-Goog-Upload-Command": "upload, finalize", "X-Goog-Upload-Offset": "0"})
    assert done.status_code == 200 and done.headers["X-Goog-Upload-Status"] == "final"
    other = _patient(local)  # another user's quota is their own
    assert _query(other, _start_upload(local, other, f"cases/{other.uid}/c0/image.jpg")).status_code == 200


def test_old_unfinished_uploads_are_cleaned_up(tmp_path_factory):
    lb = _start(tmp_path_factory, "secure-ttl", env={"LOCALBASE_UPLOAD_TTL_S": "2"})
    app_name = "secure-ttl"
    admin_app.get_app(lb.settings(), name=app_name)
    try:
        patient = _patient(lb)
        url = _start_upload(lb, patient, f"cases/{patient.uid}/old/image.jpg")
        assert _query(patient, url).status_code == 200
        parts = lb.data_dir / "storage" / "uploads"
        assert any(parts.iterdir())
        assert wait_for(lambda: _query(patient, url).status_code == 404, timeout=60)
        # The session stops answering as soon as it has expired; its part file goes in the same
        # sweep, a moment later: wait for it rather than race it (a loaded clean-clone run lost).
        assert wait_for(lambda: not any(parts.iterdir()), timeout=60)
    finally:
        admin_app.delete_app(app_name)
        lb.stop()


def test_admin_bucket_and_firebase_admin_work_unchanged_from_this_machine(local, local_app):
    """The run command's children (worker, apps) are on the same machine: loopback admin still works."""
    bucket = admin_bucket(local.settings())
    bucket.blob("models/local.bin").upload_from_string(b"local")
    assert bucket.blob("models/local.bin").download_as_bytes() == b"local"
    ref = db.reference(f"/t/{uuid.uuid4().hex}", app=local_app)
    ref.set({"v": 1})
    assert ref.get() == {"v": 1}
    user = admin_auth.create_user(email=f"w-{uuid.uuid4().hex[:8]}@example.com", app=local_app)
    assert admin_auth.get_user(user.uid, app=local_app).uid == user.uid
