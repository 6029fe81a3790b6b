"""Auth through the unmodified clients: firebase_admin.auth and the REST API (dermaloop.auth).

The compatibility tests run twice: against localbase and against the official Firebase Auth
emulator (firebase-tools, pure Node), which must agree. The official run skips, saying why, where
firebase-tools is not installed (set FIREBASE_TOOLS_BIN or put ``firebase`` on PATH).
Tests of what only localbase does (expiry and revocation enforced for rules, scrypt hashes) follow.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import firebase_admin
import pytest
import requests
from firebase_admin import auth as admin_auth

from dermaloop import admin_app
from dermaloop import auth as dl_auth
from dermaloop.settings import Settings
from localbase import tokens


@dataclass
class AuthBackend:
    name: str
    host: str  # host:port
    project_id: str
    app: firebase_admin.App

    @property
    def client(self) -> dl_auth.AuthClient:
        return dl_auth.AuthClient(Settings(project_id=self.project_id, auth_emulator_host=self.host))

    def rest(self, action: str, body: dict, key: str | None = "k") -> requests.Response:
        params = {"key": key} if key else {}
        return requests.post(f"http://{self.host}/identitytoolkit.googleapis.com/v1/accounts:{action}",
                             params=params, json=body, timeout=30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _firebase_tools() -> str | None:
    explicit = os.environ.get("FIREBASE_TOOLS_BIN")
    if explicit:
        return explicit if Path(explicit).exists() else None
    return shutil.which("firebase")


@pytest.fixture(scope="module")
def official_emulator(tmp_path_factory):
    """The official Auth emulator on free ports, or a skip with the reason."""
    binary = _firebase_tools()
    if binary is None or shutil.which("node") is None:
        pytest.skip("official Auth emulator unavailable: needs Node and firebase-tools "
                    "(npm i -g firebase-tools, or FIREBASE_TOOLS_BIN=/path/to/firebase)")
    work = tmp_path_factory.mktemp("fbemu")
    port = _free_port()
    config = {"emulators": {"auth": {"host": "127.0.0.1", "port": port}, "hub": {"port": _free_port()},
                            "logging": {"port": _free_port()}, "ui": {"enabled": False}, "singleProjectMode": True}}
    (work / "firebase.json").write_text(json.dumps(config))
    with open(work / "emulator.log", "w") as log:
        proc = subprocess.Popen([binary, "emulators:start", "--only", "auth", "--project", "demo-compat"], cwd=work,
                                stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "XDG_CONFIG_HOME": str(work / "config")}, start_new_session=True)
        try:
            deadline = time.monotonic() + 90
            while True:
                try:
                    if requests.get(f"http://127.0.0.1:{port}/", timeout=2).ok:
                        break
                except requests.ConnectionError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.skip("official Auth emulator did not start: " + (work / "emulator.log").read_text()[-500:])
                time.sleep(0.3)
            yield f"127.0.0.1:{port}"
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(params=["localbase", "official"])
def backend(request, localbase) -> AuthBackend:
    if request.param == "localbase":
        settings = localbase.settings()
        return AuthBackend("localbase", settings.auth_emulator_host, settings.project_id, admin_app.get_app(settings))
    host = request.getfixturevalue("official_emulator")
    name = "compat-official"
    try:
        app = firebase_admin.get_app(name)
    except ValueError:
        app = firebase_admin.initialize_app(admin_app._EmulatorCredential(), {"projectId": "demo-compat"}, name=name)
        saved = os.environ.get("FIREBASE_AUTH_EMULATOR_HOST")
        os.environ["FIREBASE_AUTH_EMULATOR_HOST"] = host  # read once, when the app's auth client is built
        try:
            admin_auth._get_client(app)
        finally:
            if saved is None:
                os.environ.pop("FIREBASE_AUTH_EMULATOR_HOST", None)
            else:
                os.environ["FIREBASE_AUTH_EMULATOR_HOST"] = saved
    return AuthBackend("official", host, "demo-compat", app)


def unique_email(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:10]}@example.com"


# ---- compatibility: both backends ------------------------------------------------------------


def test_rest_account_life_cycle(backend):
    client = backend.client
    email = unique_email("life")
    session = client.sign_up(email, "secret123", display_name="Pat")
    assert session.email == email and session.uid
    claims = tokens.decode_unverified(session.id_token())
    assert claims["sub"] == session.uid and claims["aud"] == backend.project_id
    assert claims["firebase"]["sign_in_provider"] == "password"

    again = client.sign_in(email, "secret123")
    assert again.uid == session.uid
    info = client.lookup(again.id_token())
    assert info["email"] == email and info["localId"] == session.uid
    assert "secret123" not in json.dumps(info) or backend.name == "official"  # the emulator leaks it; we do not

    refreshed = client.refresh(again.refresh_token)
    assert refreshed.uid == session.uid
    assert tokens.decode_unverified(refreshed.id_token())["sub"] == session.uid

    result = client.update(again, display_name="Pat P", password="newsecret1")
    assert result["displayName"] == "Pat P"
    assert client.lookup(again.id_token())["displayName"] == "Pat P"  # session renewed by the password change
    with pytest.raises(dl_auth.AuthError) as info_old:
        client.sign_in(email, "secret123")
    assert info_old.value.code == "INVALID_PASSWORD"
    assert client.sign_in(email, "newsecret1").uid == session.uid

    client.delete(again)
    with pytest.raises(dl_auth.AuthError) as gone:
        client.sign_in(email, "newsecret1")
    assert gone.value.code == "EMAIL_NOT_FOUND"


def test_rest_error_codes(backend):
    client = backend.client
    email = unique_email("err")
    client.sign_up(email, "secret123")
    cases = [
        (lambda: client.sign_up(email, "secret123"), "EMAIL_EXISTS"),
        (lambda: client.sign_up(unique_email("weak"), "123"), "WEAK_PASSWORD"),
        (lambda: client.sign_in(email, "wrong-password"), "INVALID_PASSWORD"),
        (lambda: client.sign_in(unique_email("nobody"), "secret123"), "EMAIL_NOT_FOUND"),
        (lambda: client.refresh("garbage"), "INVALID_REFRESH_TOKEN"),
        (lambda: client.lookup("x.y.z"), "INVALID_ID_TOKEN"),
    ]
    for call, code in cases:
        with pytest.raises(dl_auth.AuthError) as info:
            call()
        assert info.value.code == code
        assert info.value.status == 400
    weak = backend.rest("signUp", {"email": unique_email("w"), "password": "123", "returnSecureToken": True})
    assert weak.json()["error"]["message"] == "WEAK_PASSWORD : Password should be at least 6 characters"
    assert weak.json()["error"]["errors"][0]["reason"] == "invalid"
    no_key = backend.rest("signUp", {"email": unique_email("nokey"), "password": "secret123"}, key=None)
    assert no_key.status_code == 403
    assert no_key.json()["error"]["status"] == "PERMISSION_DENIED"


def test_admin_users_claims_and_verify(backend):
    app = backend.app
    uid = "u-" + uuid.uuid4().hex[:12]
    email = unique_email("adm")
    user = admin_auth.create_user(uid=uid, email=email, password="secret123", display_name="Dr D", app=app)
    assert (user.uid, user.email, user.display_name) == (uid, email, "Dr D")
    with pytest.raises(admin_auth.UidAlreadyExistsError):
        admin_auth.create_user(uid=uid, app=app)
    with pytest.raises(admin_auth.EmailAlreadyExistsError):
        admin_auth.create_user(email=email, password="secret123", app=app)
    with pytest.raises(admin_auth.UserNotFoundError):
        admin_auth.get_user("no-such-" + uid, app=app)

    admin_auth.set_custom_user_claims(uid, {"role": "dermatologist"}, app=app)
    assert admin_auth.get_user(uid, app=app).custom_claims == {"role": "dermatologist"}
    assert admin_auth.get_user_by_email(email, app=app).uid == uid
    with pytest.raises(ValueError):
        admin_auth.set_custom_user_claims(uid, {"sub": "evil"}, app=app)  # reserved claim

    session = backend.client.sign_in(email, "secret123")
    claims = admin_auth.verify_id_token(session.id_token(), app=app, check_revoked=True)
    assert claims["uid"] == uid and claims["role"] == "dermatologist" and claims["email"] == email

    admin_auth.update_user(uid, display_name="Dr Derm", email_verified=True, app=app)
    updated = admin_auth.get_user(uid, app=app)
    assert updated.display_name == "Dr Derm" and updated.email_verified

    uids = {u.uid for u in admin_auth.list_users(max_results=2, app=app).iterate_all()}
    assert uid in uids

    admin_auth.delete_user(uid, app=app)
    with pytest.raises(admin_auth.UserNotFoundError):
        admin_auth.get_user(uid, app=app)


def test_revoke_and_disable(backend):
    app = backend.app
    email = unique_email("rev")
    user = admin_auth.create_user(email=email, password="secret123", app=app)
    session = backend.client.sign_in(email, "secret123")
    token = session.id_token()
    assert admin_auth.verify_id_token(token, app=app, check_revoked=True)["uid"] == user.uid
    time.sleep(1.1)  # validSince has one-second resolution: the token must be from an earlier second
    admin_auth.revoke_refresh_tokens(user.uid, app=app)
    with pytest.raises(admin_auth.RevokedIdTokenError):
        admin_auth.verify_id_token(token, app=app, check_revoked=True)
    fresh = backend.client.sign_in(email, "secret123")
    assert admin_auth.verify_id_token(fresh.id_token(), app=app, check_revoked=True)["uid"] == user.uid

    admin_auth.update_user(user.uid, disabled=True, app=app)
    with pytest.raises(dl_auth.AuthError) as info:
        backend.client.sign_in(email, "secret123")
    assert info.value.code == "USER_DISABLED"
    with pytest.raises(admin_auth.UserDisabledError):
        admin_auth.verify_id_token(fresh.id_token(), app=app, check_revoked=True)


# ---- localbase only ----------------------------------------------------------------------------


@pytest.fixture
def lb_backend(localbase) -> AuthBackend:
    settings = localbase.settings()
    return AuthBackend("localbase", settings.auth_emulator_host, settings.project_id, admin_app.get_app(settings))


def storage_status(localbase, token: str) -> int:
    """Status of a /v0 metadata read of a (missing) model file: 404 = token accepted, 401 = refused."""
    bucket = localbase.settings().storage_bucket
    url = f"{localbase.storage_url}/v0/b/{bucket}/o/{quote('models/device/none.tflite', safe='')}"
    return requests.get(url, headers={"Authorization": f"Firebase {token}"}, timeout=30).status_code


def test_localbase_refuses_expired_tokens(localbase, lb_backend):
    session = lb_backend.client.sign_up(unique_email("exp"), "secret123")
    assert storage_status(localbase, session.id_token()) == 404
    expired = tokens.mint_id_token(lb_backend.project_id, session.uid, now=time.time() - 2 * tokens.LIFETIME_S)
    assert storage_status(localbase, expired) == 401
    lookup = lb_backend.rest("lookup", {"idToken": expired})
    assert lookup.status_code == 400 and lookup.json()["error"]["message"] == "TOKEN_EXPIRED"
    # firebase-admin itself does not check exp in emulator mode (as with the official emulator)
    assert admin_auth.verify_id_token(expired, app=lb_backend.app)["uid"] == session.uid


def test_localbase_refuses_revoked_deleted_and_disabled_users_tokens(localbase, lb_backend):
    app = lb_backend.app
    sessions = {}
    for tag in ("revoked", "deleted", "disabled"):
        sessions[tag] = lb_backend.client.sign_up(unique_email(tag), "secret123")
        assert storage_status(localbase, sessions[tag].id_token()) == 404
    time.sleep(1.1)
    admin_auth.revoke_refresh_tokens(sessions["revoked"].uid, app=app)
    admin_auth.delete_user(sessions["deleted"].uid, app=app)
    admin_auth.update_user(sessions["disabled"].uid, disabled=True, app=app)
    for session in sessions.values():
        assert storage_status(localbase, session._id_token) == 401
    with pytest.raises(dl_auth.AuthError) as info:
        lb_backend.client.refresh(sessions["revoked"].refresh_token)
    assert info.value.code == "TOKEN_EXPIRED"
    # after signing in again the revoked user is back
    info = admin_auth.get_user(sessions["revoked"].uid, app=app)
    again = lb_backend.client.sign_in(info.email, "secret123")
    assert storage_status(localbase, again.id_token()) == 404


def test_tokens_for_uids_auth_never_saw_still_work(localbase, lb_backend):
    """The RTDB tests mint tokens with localbase.tokens for made-up uids; Auth must not refuse them."""
    minted = tokens.mint_id_token(lb_backend.project_id, "made-up-uid-" + uuid.uuid4().hex[:6], {"role": "patient"})
    assert storage_status(localbase, minted) == 404
    other_project = tokens.mint_id_token("another-project", "u1")
    assert storage_status(localbase, other_project) == 401


def test_passwords_are_stored_as_scrypt_hashes(localbase, lb_backend):
    email = unique_email("hash")
    password = "correct horse battery staple"
    session = lb_backend.client.sign_up(email, password)
    db = sqlite3.connect(f"file:{localbase.data_dir / 'auth.sqlite3'}?mode=ro", uri=True)
    try:
        digest, salt = db.execute("SELECT password_hash, salt FROM users WHERE uid = ?", (session.uid,)).fetchone()
    finally:
        db.close()
    assert len(digest) == 32 and len(salt) == 16
    assert password.encode() not in digest
    data = b"".join(p.read_bytes() for p in localbase.data_dir.glob("auth.sqlite3*"))
    assert password.encode() not in data
    info = lb_backend.client.lookup(session.id_token())
    assert info["passwordHash"] == "UkVEQUNURUQ="  # production's redacted marker, never the hash


def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(lb_backend):
    base = f"http://{lb_backend.host}/identitytoolkit.googleapis.com/v1"
    not_json = requests.post(f"{base}/accounts:signUp?key=k", data=b"{not json", timeout=30,
                             headers={"Content-Type": "application/json"})
    assert not_json.status_code == 400 and "INVALID_REQUEST" in not_json.json()["error"]["message"]
    array = requests.post(f"{base}/accounts:signInWithPassword?key=k", json=[1, 2], timeout=30)
    assert array.status_code == 400
    bad_email = lb_backend.rest("signUp", {"email": "not-an-email", "password": "secret123"})
    assert bad_email.json()["error"]["message"] == "INVALID_EMAIL"
    huge = requests.post(f"{base}/accounts:signUp?key=k", data=b"x" * (2 * 1024 * 1024), timeout=30,
                         headers={"Content-Type": "application/json"})
    assert huge.status_code == 413
    wrong_bearer = requests.post(f"http://{lb_backend.host}/identitytoolkit.googleapis.com/v1/projects/"
                                 f"{lb_backend.project_id}/accounts:lookup", json={"localId": ["x"]},
                                 headers={"Authorization": "Bearer not-owner"}, timeout=30)
    assert wrong_bearer.status_code == 401
    user = admin_auth.create_user(email=unique_email("claims"), app=lb_backend.app)
    claims = requests.post(f"http://{lb_backend.host}/identitytoolkit.googleapis.com/v1/projects/"
                           f"{lb_backend.project_id}/accounts:update",
                           json={"localId": user.uid, "customAttributes": "{"}, headers={"Authorization": "Bearer owner"},
                           timeout=30)
    assert claims.status_code == 400 and claims.json()["error"]["message"] == "INVALID_CLAIMS"
    assert admin_auth.get_user(user.uid, app=lb_backend.app).custom_claims is None  # nothing half-applied
    assert lb_backend.client.sign_up(unique_email("after"), "secret123").uid  # still serving
