"""localbase's security bugs of issue 16 (section 2), each probed with the real clients in both modes.

Every test runs against an emulator-mode localbase (unsigned tokens, as firebase-admin expects
against an emulator) and a secure-mode one (``--secure``: RS256 tokens); both listen on loopback, so
``owner`` is admin for the test process in both. Probes: only ``owner`` (not any ``access_token``) is
database admin; a stream of a deleted, disabled or signed-out user ends with ``auth_revoked`` before
the next event; a password or email change revokes refresh tokens; reads do not create namespaces;
deep or oversized bodies are a clear 400; served objects cannot run in a browser.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from dataclasses import dataclass
from urllib.parse import quote

import firebase_admin
import pytest
import requests
from firebase_admin import auth as admin_auth
from firebase_admin import db

from dermaloop import admin_app
from dermaloop import auth as dl_auth
from dermaloop.database import UserDatabase
from dermaloop.settings import Settings
from dermaloop.storage import admin_bucket
from localbase import tokens
from tests.localbase_process import LocalbaseProcess
from tests.rtdb_helpers import RawStream, wait_for

ADMIN = {"Authorization": "Bearer owner"}
# firebase-admin's ListenerRegistration.close() may kill its reader thread (SDK behaviour).
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")


@dataclass
class Backend:
    mode: str
    lb: LocalbaseProcess
    settings: Settings
    app: firebase_admin.App

    @property
    def ns(self) -> str:
        return self.settings.database_namespace

    @property
    def client(self) -> dl_auth.AuthClient:
        return dl_auth.AuthClient(self.settings)

    def mint(self, uid: str, **fields) -> str:
        """An ID token in this mode's format (signed with the data directory's key in secure mode)."""
        signer = self.lb.signing_key() if self.mode == "secure" else None
        return tokens.mint_id_token(self.settings.project_id, uid, signer=signer, **fields)

    def user(self, role: str = "dermatologist") -> tuple[str, str, dl_auth.UserSession]:
        """A new account with ``role`` (firebase-admin, as ``dermaloop users add``), signed in over REST."""
        email = f"{role[:4]}-{uuid.uuid4().hex[:10]}@example.com"
        user, _ = dl_auth.create_user(email, "secret123", role, settings=self.settings)
        return user.uid, email, self.client.sign_in(email, "secret123")

    def rtdb(self, method: str, path: str, **kwargs) -> requests.Response:
        params = {"ns": self.ns, **kwargs.pop("params", {})}
        return requests.request(method, f"{self.lb.database_url}{path or '/'}.json", params=params, timeout=60, **kwargs)

    def namespaces(self) -> set[str]:
        listing = requests.get(f"{self.lb.database_url}/.inspect/databases.json", headers=ADMIN, timeout=30)
        assert listing.status_code == 200, listing.text
        return {entry["name"] for entry in listing.json()}

    def auth_rest(self, action: str, body: dict | bytes, headers: dict | None = None) -> requests.Response:
        url = f"{self.lb.auth_url}/identitytoolkit.googleapis.com/v1/accounts:{action}"
        if isinstance(body, bytes):
            return requests.post(url, params={"key": "k"}, data=body, timeout=60,
                                 headers={"Content-Type": "application/json", **(headers or {})})
        return requests.post(url, params={"key": "k"}, json=body, headers=headers, timeout=60)


@pytest.fixture(scope="module", params=["emulator", "secure"])
def backend(request, tmp_path_factory) -> Backend:
    # Keep-alives and periodic token re-checks far apart: a stream that ends here was ended by the
    # revocation itself (pushed by Auth, or checked before an event), not by a timer.
    quiet = {"LOCALBASE_RTDB_KEEPALIVE_S": "3600", "LOCALBASE_RTDB_RECHECK_S": "3600"}
    lb = LocalbaseProcess(data_dir=tmp_path_factory.mktemp(f"lb-{request.param}"),
                          secure=request.param == "secure", env=quiet).start()
    settings = lb.settings()
    name = f"security-{request.param}"
    app = admin_app.get_app(settings, name=name)
    yield Backend(request.param, lb, settings, app)
    admin_app.delete_app(name)
    lb.stop()


# ---- only `owner` is database admin -------------------------------------------------------------


def test_only_owner_is_database_admin_not_any_access_token(backend):
    secret_path = f"/users/victim-{uuid.uuid4().hex[:8]}"
    db.reference(secret_path, app=backend.app).set({"displayName": "Private Patient"})
    rules_before = backend.rtdb("GET", "/.settings/rules", headers=ADMIN)
    assert rules_before.status_code == 200

    for credential in ({"params": {"access_token": "x"}}, {"params": {"access_token": "ya29.fake"}},
                       {"headers": {"Authorization": "Bearer not-owner"}}):
        read = backend.rtdb("GET", secret_path, **credential)
        assert read.status_code == 401, (credential, read.text)
        assert "Private Patient" not in read.text
        everything = backend.rtdb("GET", "", **credential)
        assert everything.status_code == 401 and "Private Patient" not in everything.text
        replaced = backend.rtdb("PUT", "/.settings/rules", data='{"rules": {".read": true, ".write": true}}',
                                **credential)
        assert replaced.status_code == 401, replaced.text

    # The rules were not replaced: a signed-out reader is still refused, the file is unchanged.
    assert backend.rtdb("GET", secret_path).status_code == 401
    assert backend.rtdb("GET", "/.settings/rules", headers=ADMIN).text == rules_before.text
    # `owner`, in the header (firebase-admin) or as access_token, is admin.
    assert backend.rtdb("GET", secret_path, params={"access_token": "owner"}).json() == {"displayName": "Private Patient"}
    assert backend.rtdb("GET", secret_path, headers=ADMIN).json() == {"displayName": "Private Patient"}


# ---- streams end when the user's tokens stop being valid ----------------------------------------


def _case(uid: str, case_id: str) -> dict:
    return {"caseId": case_id, "patientUid": uid, "createdAt": 1, "status": "queued"}


@pytest.mark.parametrize("revocation", ["deleted", "disabled", "password reset"])
def test_stream_of_a_revoked_user_ends_before_the_next_event(backend, revocation):
    uid, email, session = backend.user("dermatologist")
    stream = RawStream(f"{backend.lb.database_url}/cases.json", params={"ns": backend.ns, "auth": session.id_token()})
    try:
        assert stream.status == 200, stream.body
        assert wait_for(lambda: stream.events() != [])
        if revocation == "password reset":
            time.sleep(1.1)  # validSince has one-second resolution: the token must be from an earlier second
            dl_auth.create_user(email, "another-secret", "dermatologist", settings=backend.settings)  # `users add`
        elif revocation == "deleted":
            admin_auth.delete_user(uid, app=backend.app)
        else:
            admin_auth.update_user(uid, disabled=True, app=backend.app)
        case_id = f"after-{uuid.uuid4().hex[:8]}"
        db.reference(f"/cases/patient-x/{case_id}", app=backend.app).set(_case("patient-x", case_id))
        assert stream.ended.wait(60)
    finally:
        stream.close()
    assert stream.frames[-1] == ("auth_revoked", "credential is no longer valid")
    assert not any(case_id in data for _, data in stream.frames), "a revoked user received a new case"


def test_user_database_listener_of_a_deleted_dermatologist_gets_no_more_cases(backend):
    uid, _, session = backend.user("dermatologist")
    seen: list = []
    cancelled: list[str] = []
    listener = UserDatabase(session, backend.settings).listen("/cases", seen.append, on_cancel=cancelled.append)
    try:
        assert listener.wait_connected(30)
        first = f"before-{uuid.uuid4().hex[:8]}"
        db.reference(f"/cases/patient-y/{first}", app=backend.app).set(_case("patient-y", first))
        assert wait_for(lambda: any(first in json.dumps(e.data) for e in seen))
        admin_auth.delete_user(uid, app=backend.app)
        later = f"after-{uuid.uuid4().hex[:8]}"
        db.reference(f"/cases/patient-y/{later}", app=backend.app).set(_case("patient-y", later))
        assert wait_for(lambda: bool(cancelled), timeout=60)
    finally:
        listener.close()
    assert not any(later in json.dumps(e.data) for e in seen), "the deleted user's app received a new case"


def test_stream_ends_without_any_event_when_the_user_is_deleted(backend):
    uid, _, session = backend.user("patient")
    stream = RawStream(f"{backend.lb.database_url}/users/{uid}.json", params={"ns": backend.ns, "auth": session.id_token()})
    try:
        assert stream.status == 200, stream.body
        assert wait_for(lambda: stream.events() != [])
        admin_auth.delete_user(uid, app=backend.app)
        assert stream.ended.wait(60)  # pushed by Auth: no write, and the timers are an hour here
    finally:
        stream.close()
    assert stream.frames[-1] == ("auth_revoked", "credential is no longer valid")


# ---- password and email changes revoke refresh tokens -------------------------------------------


def _refresh_refused(backend: Backend, refresh_token: str) -> str:
    with pytest.raises(dl_auth.AuthError) as info:
        backend.client.refresh(refresh_token)
    return info.value.code


def test_password_reset_by_admin_revokes_refresh_and_id_tokens(backend):
    uid, email, session = backend.user("patient")
    old_refresh, old_id = session.refresh_token, session.id_token()
    assert backend.rtdb("GET", f"/users/{uid}", params={"auth": old_id}).status_code == 200
    time.sleep(1.1)  # so the old ID token is from an earlier second than validSince
    dl_auth.create_user(email, "reset-secret1", "patient", settings=backend.settings)  # `dermaloop users add` again
    assert _refresh_refused(backend, old_refresh) == "TOKEN_EXPIRED"
    assert backend.rtdb("GET", f"/users/{uid}", params={"auth": old_id}).status_code == 401
    record = admin_auth.get_user(uid, app=backend.app)
    assert record.tokens_valid_after_timestamp >= int(time.time() - 5) * 1000  # validSince set, like Firebase
    fresh = backend.client.sign_in(email, "reset-secret1")
    assert backend.client.refresh(fresh.refresh_token).uid == uid
    assert backend.rtdb("GET", f"/users/{uid}", params={"auth": fresh.id_token()}).status_code == 200


def test_email_change_by_admin_revokes_refresh_tokens(backend):
    uid, _, session = backend.user("patient")
    admin_auth.update_user(uid, email=f"moved-{uuid.uuid4().hex[:8]}@example.com", app=backend.app)
    assert _refresh_refused(backend, session.refresh_token) == "TOKEN_EXPIRED"


def test_password_and_email_changes_by_the_user_revoke_other_sessions(backend):
    uid, email, phone = backend.user("patient")
    laptop = backend.client.sign_in(email, "secret123")
    backend.client.update(phone, password="changed-secret1")  # the phone gets new tokens in the answer
    assert _refresh_refused(backend, laptop.refresh_token) == "TOKEN_EXPIRED"
    assert backend.client.refresh(phone.refresh_token).uid == uid
    assert backend.client.lookup(phone.id_token())["localId"] == uid

    tablet = backend.client.sign_in(email, "changed-secret1")
    changed = backend.auth_rest("update", {"idToken": phone.id_token(), "returnSecureToken": True,
                                           "email": f"new-{uuid.uuid4().hex[:8]}@example.com"})
    assert changed.status_code == 200, changed.text
    assert changed.json()["refreshToken"] and changed.json()["idToken"]
    assert _refresh_refused(backend, tablet.refresh_token) == "TOKEN_EXPIRED"
    assert _refresh_refused(backend, phone.refresh_token) == "TOKEN_EXPIRED"
    assert backend.client.refresh(changed.json()["refreshToken"]).uid == uid


# ---- namespaces ---------------------------------------------------------------------------------


def test_reads_of_unknown_namespaces_create_nothing(backend):
    before = backend.namespaces()
    with requests.Session() as http:
        for i in range(300):
            ns = f"probe-{i}-{secrets.token_hex(4)}"
            r = http.get(f"{backend.lb.database_url}/anything.json", params={"ns": ns}, headers=ADMIN, timeout=30)
            assert r.status_code == 200 and r.json() is None
    with requests.get(f"{backend.lb.database_url}/x.json", params={"ns": "probe-stream-ns"}, stream=True,
                      headers={**ADMIN, "Accept": "text/event-stream"}, timeout=30) as stream:
        assert stream.status_code == 200
        first = b""
        for chunk in stream.iter_content(chunk_size=None):
            first += chunk
            if b"\n\n" in first:
                break
    assert first.startswith(b'event: put\ndata: {"path":"/","data":null}')
    assert backend.namespaces() == before

    # A write creates its namespace; deleting its last data removes it again.
    name = f"made-{secrets.token_hex(4)}"
    put = requests.put(f"{backend.lb.database_url}/a/b.json", params={"ns": name}, headers=ADMIN, data="1", timeout=30)
    assert put.status_code == 200
    assert backend.namespaces() == before | {name}
    assert requests.get(f"{backend.lb.database_url}/a/b.json", params={"ns": name}, headers=ADMIN, timeout=30).json() == 1
    requests.delete(f"{backend.lb.database_url}/a.json", params={"ns": name}, headers=ADMIN, timeout=30)
    assert backend.namespaces() == before


def test_end_user_writes_cannot_mint_namespaces_in_secure_mode(backend):
    token = backend.mint(f"ns-writer-{uuid.uuid4().hex[:6]}")
    uid = tokens.decode_unverified(token)["sub"]
    name = f"user-made-{secrets.token_hex(4)}"
    r = requests.patch(f"{backend.lb.database_url}/users/{uid}.json", params={"ns": name, "auth": token},
                       data=json.dumps({"displayName": "Me"}), timeout=30)
    if backend.mode == "secure":
        assert r.status_code == 404 and name not in backend.namespaces()
    else:  # emulator mode: as the Emulator Suite does, a write creates the namespace
        assert r.status_code == 200 and name in backend.namespaces()


# ---- bad bodies ---------------------------------------------------------------------------------

DEEP_ARRAY = b"[" * 50_000 + b"]" * 50_000
DEEP_OBJECT = b'{"a":' * 50_000 + b"1" + b"}" * 50_000


def test_deep_json_is_a_clear_400_everywhere_and_nothing_is_lost(backend):
    bucket = admin_bucket(backend.settings)
    keep = f"models/keep-{uuid.uuid4().hex[:8]}.bin"
    bucket.blob(keep).upload_from_string(b"model bytes", content_type="application/octet-stream")
    _, email, session = backend.user("patient")
    storage = backend.lb.storage_url
    b = backend.settings.storage_bucket
    object_url = f"{storage}/v0/b/{b}/o/{quote(keep, safe='')}"
    json_headers = {"Content-Type": "application/json"}
    probes = {
        "auth signUp": lambda body: backend.auth_rest("signUp", body),
        "auth signInWithPassword": lambda body: backend.auth_rest("signInWithPassword", body),
        "auth admin update": lambda body: requests.post(
            f"{backend.lb.auth_url}/identitytoolkit.googleapis.com/v1/projects/{backend.settings.project_id}"
            "/accounts:update", data=body, headers={**ADMIN, **json_headers}, timeout=60),
        "securetoken": lambda body: requests.post(f"{backend.lb.auth_url}/securetoken.googleapis.com/v1/token",
                                                  params={"key": "k"}, data=body, headers=json_headers, timeout=60),
        "v0 metadata PATCH": lambda body: requests.patch(object_url, data=body, headers={**ADMIN, **json_headers},
                                                         timeout=60),
        "v0 resumable start": lambda body: requests.post(
            f"{storage}/v0/b/{b}/o", params={"name": keep}, data=body, timeout=60,
            headers={**ADMIN, **json_headers, "X-Goog-Upload-Protocol": "resumable", "X-Goog-Upload-Command": "start",
                     "X-Goog-Upload-Header-Content-Length": "5"}),
        "v0 multipart": lambda body: requests.post(
            f"{storage}/v0/b/{b}/o", params={"name": keep}, timeout=60,
            data=b"--b\r\nContent-Type: application/json\r\n\r\n" + body + b"\r\n--b\r\nContent-Type: image/jpeg\r\n\r\n"
                 b"\xff\xd8xx\r\n--b--\r\n",
            headers={**ADMIN, "X-Goog-Upload-Protocol": "multipart", "Content-Type": "multipart/related; boundary=b"}),
        "gcs PATCH": lambda body: requests.patch(f"{storage}/storage/v1/b/{b}/o/{quote(keep, safe='')}", data=body,
                                                 headers=json_headers, timeout=60),
        "gcs resumable start": lambda body: requests.post(
            f"{storage}/upload/storage/v1/b/{b}/o", params={"uploadType": "resumable", "name": keep}, data=body,
            headers=json_headers, timeout=60),
        "rtdb PUT": lambda body: backend.rtdb("PUT", "/deep", data=body, headers=ADMIN),
    }
    for name, probe in probes.items():
        for body in (DEEP_ARRAY, DEEP_OBJECT):
            response = probe(body)
            assert response.status_code == 400, (name, response.status_code, response.text[:200])
    # Nothing stored was lost or changed, and every service still serves.
    assert bucket.blob(keep).download_as_bytes() == b"model bytes"
    assert bucket.get_blob(keep).content_type == "application/octet-stream"
    assert backend.client.sign_in(email, "secret123").uid == session.uid
    assert backend.rtdb("GET", "/deep", headers=ADMIN).json() is None


def test_oversized_email_and_password_are_refused_and_nothing_is_stored(backend):
    long_email = "a" * 4990 + "@x.com"
    assert len(long_email) > 256
    r = backend.auth_rest("signUp", {"email": long_email, "password": "secret123", "returnSecureToken": True})
    assert r.status_code == 400 and r.json()["error"]["message"] == "INVALID_EMAIL"
    created = requests.post(
        f"{backend.lb.auth_url}/identitytoolkit.googleapis.com/v1/projects/{backend.settings.project_id}/accounts",
        json={"email": long_email, "password": "secret123"}, headers=ADMIN, timeout=30)
    assert created.status_code == 400 and created.json()["error"]["message"] == "INVALID_EMAIL"
    lookup = requests.post(
        f"{backend.lb.auth_url}/identitytoolkit.googleapis.com/v1/projects/{backend.settings.project_id}/accounts:lookup",
        json={"email": [long_email]}, headers=ADMIN, timeout=30)
    assert "users" not in lookup.json()
    huge_password = backend.auth_rest("signUp", {"email": f"p-{uuid.uuid4().hex[:6]}@example.com",
                                                 "password": "x" * 5000})
    assert huge_password.status_code == 400
    assert huge_password.json()["error"]["message"].startswith("PASSWORD_DOES_NOT_MEET_REQUIREMENTS")
    ok = backend.auth_rest("signUp", {"email": "b" * 240 + "@x.com", "password": "secret123"})  # 246 chars: allowed
    assert ok.status_code == 200, ok.text


# ---- served objects cannot run in a browser -----------------------------------------------------

SERVED = {
    "photo.jpg": ("image/jpeg", True),
    "photo.png": ("image/png", True),
    "photo.webp": ("image/webp", True),
    "page.html": ("text/html", False),
    "disguised.png": ("image/png, text/html", False),
    "vector.svg": ("image/svg+xml", False),
    "script.js": ("application/javascript", False),
    "model.bin": ("application/octet-stream", False),
}


def test_downloads_are_not_sniffed_and_only_photos_are_inline(backend):
    bucket = admin_bucket(backend.settings)
    prefix = f"served-{uuid.uuid4().hex[:8]}/"
    body = b"<html><script>alert(document.domain)</script></html>"
    for name, (content_type, _) in SERVED.items():
        bucket.blob(prefix + name).upload_from_string(body, content_type=content_type)
    b = backend.settings.storage_bucket
    for name, (content_type, inline) in SERVED.items():
        path = quote(prefix + name, safe="")
        meta = requests.get(f"{backend.lb.storage_url}/v0/b/{b}/o/{path}", headers=ADMIN, timeout=30).json()
        assert meta["contentType"] == content_type  # metadata keeps what was stored
        downloads = {
            "v0 with a download token": requests.get(f"{backend.lb.storage_url}/v0/b/{b}/o/{path}", timeout=30,
                                                     params={"alt": "media", "token": meta["downloadTokens"]}),
            "v0 as owner": requests.get(f"{backend.lb.storage_url}/v0/b/{b}/o/{path}", params={"alt": "media"},
                                        headers=ADMIN, timeout=30),
            "GCS JSON API": requests.get(f"{backend.lb.storage_url}/download/storage/v1/b/{b}/o/{path}",
                                         params={"alt": "media"}, timeout=30),
            "GCS object URL": requests.get(f"{backend.lb.storage_url}/storage/v1/b/{b}/o/{path}",
                                           params={"alt": "media"}, timeout=30),
        }
        for how, r in downloads.items():
            label = (name, how)
            assert r.status_code == 200 and r.content == body, label
            assert r.headers["X-Content-Type-Options"] == "nosniff", label
            served = r.headers["Content-Type"]
            disposition = r.headers.get("Content-Disposition", "")
            if inline:
                assert served == content_type and not disposition.startswith("attachment"), label
            else:
                assert disposition.startswith("attachment"), label
                assert "html" not in served and "svg" not in served and "script" not in served, label
                assert "," not in served, label
    # google-cloud-storage still reads them byte for byte
    assert bucket.blob(prefix + "disguised.png").download_as_bytes() == body
