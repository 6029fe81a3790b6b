"""The end-user clients' one exception family, offline errors and retries.

Offline: every client pointed at ports nobody listens on raises ``Unavailable`` (never a
``requests`` error) naming the service and its address. Retries: the HTTP helper against a
throwaway local HTTP server that answers 503/429 before 200 (a test of the helper, not a Firebase
mock), and a real localbase killed with SIGKILL and restarted under a GET that is being retried.
"""

from __future__ import annotations

import http.server
import socket
import threading
import time
import uuid

import pytest
import requests

from dermaloop import auth, database, errors, storage
from dermaloop.auth import AuthClient, AuthError
from dermaloop.database import DatabaseError, UserDatabase
from dermaloop.errors import (
    Conflict,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ServiceError,
    Unauthenticated,
    Unavailable,
)
from dermaloop.http import Endpoint, RetryPolicy, parse_retry_after
from dermaloop.settings import load_settings
from dermaloop.storage import StorageError, UserStorage
from localbase.tokens import mint_id_token
from tests.localbase_process import LocalbaseProcess

FAST = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the family ---------------------------------------------------------------------------------


def test_the_old_names_are_in_one_family():
    assert database.PermissionDenied is storage.PermissionDenied is errors.PermissionDenied
    assert storage.NotFound is errors.NotFound
    assert auth.AuthError is AuthError and database.DatabaseError is DatabaseError and storage.StorageError is StorageError
    for service_class in (AuthError, DatabaseError, StorageError):
        assert issubclass(service_class, ServiceError)
    assert issubclass(Unauthenticated, PermissionDenied)
    denied = errors.error_class(DatabaseError, PermissionDenied)
    assert issubclass(denied, DatabaseError) and issubclass(denied, PermissionDenied)
    assert errors.error_class(DatabaseError, PermissionDenied) is denied  # made once
    assert denied.__name__ == "DatabasePermissionDenied" and errors.DatabasePermissionDenied is denied
    offline = errors.error_class(AuthError, Unavailable)(service="Auth", address="http://x:1", reason="r")
    assert isinstance(offline, AuthError) and isinstance(offline, Unavailable) and offline.service == "Auth"


def test_refusals_have_their_kind(localbase):
    settings = localbase.settings(database_url="https://client-errors-default-rtdb.firebaseio.com")
    client = AuthClient(settings, retry=FAST)
    email = f"kinds-{uuid.uuid4().hex[:8]}@example.com"
    client.sign_up(email, "secret123")
    with pytest.raises(Conflict) as exists:
        client.sign_up(email, "secret123")
    assert isinstance(exists.value, AuthError) and exists.value.code == "EMAIL_EXISTS"
    with pytest.raises(Unauthenticated) as wrong:
        client.sign_in(email, "wrong-password")
    assert wrong.value.code == "INVALID_PASSWORD" and wrong.value.status == 400
    with pytest.raises(InvalidArgument):
        client.sign_up(f"weak-{uuid.uuid4().hex[:8]}@example.com", "123")

    stranger = UserDatabase(mint_id_token(settings.project_id, "stranger"), settings, retry=FAST)
    with pytest.raises(PermissionDenied) as denied:
        stranger.get("users/someone-else")
    assert not isinstance(denied.value, Unauthenticated) and isinstance(denied.value, DatabaseError)
    expired = UserDatabase(mint_id_token(settings.project_id, "u1", now=time.time() - 7200), settings, retry=FAST)
    with pytest.raises(Unauthenticated, match="expired"):
        expired.get("users/u1")
    with pytest.raises(InvalidArgument):
        stranger.get("users", order_by="nope", limit_to_first=-1)

    files = UserStorage(mint_id_token(settings.project_id, "u1"), settings, retry=FAST)
    with pytest.raises(NotFound) as missing:
        files.metadata("cases/u1/none/image.jpg")
    assert isinstance(missing.value, StorageError) and missing.value.status == 404
    with pytest.raises(PermissionDenied):
        files.metadata("cases/u2/none/image.jpg")
    with pytest.raises(Unauthenticated):
        UserStorage("garbage", settings, retry=FAST).metadata("cases/u1/none/image.jpg")


# ---- offline ------------------------------------------------------------------------------------


def assert_unavailable(call, service: str, address: str, service_class: type) -> Unavailable:
    try:
        call()
    except BaseException as exc:  # noqa: BLE001 - the point is what escapes
        assert not isinstance(exc, requests.RequestException), f"a requests error escaped: {exc!r}"
        assert isinstance(exc, Unavailable) and isinstance(exc, ServiceError) and isinstance(exc, service_class), repr(exc)
        text = str(exc)
        assert "\n" not in text
        assert exc.service == service and exc.address == address
        assert service in text and address in text and "connection refused" in text, text
        assert "dermaloop run" in text and "README" in text, text
        return exc
    raise AssertionError("no error raised")


def test_every_client_raises_unavailable_when_offline(tmp_path):
    host = "127.0.0.1"
    ports = {"database": free_port(), "storage": free_port(), "auth": free_port()}
    settings = load_settings(environ={}).with_local_backend(host, ports)
    db_address, storage_address, auth_address = (f"http://{host}:{ports[k]}" for k in ("database", "storage", "auth"))

    client = AuthClient(settings, retry=FAST)
    assert_unavailable(lambda: client.sign_in("a@example.com", "secret123"), "Auth", auth_address, AuthError)
    assert_unavailable(lambda: client.sign_up("a@example.com", "secret123"), "Auth", auth_address, AuthError)
    assert_unavailable(lambda: client.refresh("some-refresh-token"), "Auth", auth_address, AuthError)
    # A restored session whose ID token is due refreshes on first use: offline, that is Unavailable
    # too, whether it is asked directly or by a client using it as its token source.
    session = client.restore({"uid": "u1", "refresh_token": "r", "expires_at": 0})
    error = assert_unavailable(session.id_token, "Auth", auth_address, AuthError)
    assert "cannot reach Firebase Auth at" in str(error)
    assert_unavailable(lambda: UserDatabase(session, settings, retry=FAST).get("users/u1"), "Auth", auth_address, AuthError)

    token = mint_id_token(settings.project_id, "u1")
    db = UserDatabase(token, settings, retry=FAST)
    error = assert_unavailable(lambda: db.get("users/u1"), "Realtime Database", db_address, DatabaseError)
    assert str(error).startswith(f"cannot reach the Realtime Database at {db_address} (connection refused")
    assert "after 3 attempts" in str(error)  # a GET is retried
    assert_unavailable(lambda: db.set("users/u1/displayName", "A"), "Realtime Database", db_address, DatabaseError)
    assert_unavailable(lambda: db.update("users/u1", {"displayName": "A"}), "Realtime Database", db_address, DatabaseError)
    assert_unavailable(lambda: db.push("users/u1/x", 1), "Realtime Database", db_address, DatabaseError)
    assert_unavailable(lambda: db.delete("users/u1"), "Realtime Database", db_address, DatabaseError)

    files = UserStorage(token, settings, retry=FAST)
    path = "cases/u1/c1/image.jpg"
    assert_unavailable(lambda: files.upload(path, b"\xff\xd8" * 100, "image/jpeg"), "Storage", storage_address, StorageError)
    store = storage.FileSessionStore(tmp_path / "upload.json")
    assert_unavailable(lambda: files.upload(path, b"\xff\xd8" * 100, "image/jpeg", session_store=store),
                       "Storage", storage_address, StorageError)
    assert store.load() is None  # no session was made
    assert_unavailable(lambda: files.download(path), "Storage", storage_address, StorageError)
    assert_unavailable(lambda: files.metadata(path), "Storage", storage_address, StorageError)
    assert_unavailable(lambda: list(files.list_all("cases/u1/")), "Storage", storage_address, StorageError)


def test_an_offline_listener_says_so_and_keeps_trying():
    host = "127.0.0.1"
    ports = {"database": free_port(), "storage": free_port(), "auth": free_port()}
    settings = load_settings(environ={}).with_local_backend(host, ports)
    db = UserDatabase(mint_id_token(settings.project_id, "u1"), settings, retry=FAST)
    states, failures = [], []
    listener = db.listen("users/u1", lambda e: None, on_error=failures.append, on_state=states.append)
    try:
        deadline = time.monotonic() + 10
        while len(failures) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert listener.state == "reconnecting" and listener.thread.is_alive()
    finally:
        listener.close()
    assert len(failures) >= 3 and all(isinstance(f, Unavailable) for f in failures)
    assert "the Realtime Database" in str(failures[0])
    assert states[0] == "reconnecting" and states[-1] == "closed" and "connected" not in states
    assert not listener.thread.is_alive()


def test_a_production_address_gets_network_advice():
    endpoint = Endpoint(StorageError, "https://firebasestorage.googleapis.com", requests.Session(), 5)
    text = str(endpoint.unavailable("host name not resolved"))
    assert text == ("cannot reach Firebase Storage at https://firebasestorage.googleapis.com (host name not "
                    "resolved): check the network connection, or set the Firebase settings (see README)")


# ---- retries: the helper against a throwaway HTTP server ----------------------------------------


class Script(http.server.BaseHTTPRequestHandler):
    """Answers each request with the next (status, headers) of the server's script, then 200."""

    def _answer(self) -> None:
        server = self.server
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        with server.lock:  # type: ignore[attr-defined]
            server.seen.append(self.command)  # type: ignore[attr-defined]
            status, headers = server.script.pop(0) if server.script else (200, {})  # type: ignore[attr-defined]
        body = b'{"ok": true}' if status == 200 else b'{"error": "busy"}'
        if "X-Body" in headers:
            body = headers.pop("X-Body").encode()
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def scripted():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Script)
    server.lock, server.seen, server.script = threading.Lock(), [], []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def endpoint_for(server, sleeps: list[float], policy: RetryPolicy = FAST) -> tuple[Endpoint, str]:
    address = f"http://127.0.0.1:{server.server_address[1]}"
    return Endpoint(DatabaseError, address, requests.Session(), 5, policy, sleep=sleeps.append), address + "/x.json"


def test_retries_503_and_429_then_succeeds(scripted):
    scripted.script = [(503, {}), (429, {"Retry-After": "0.2"}), (200, {})]
    sleeps: list[float] = []
    endpoint, url = endpoint_for(scripted, sleeps)
    response = endpoint.request("GET", url, idempotent=True)
    assert response.status_code == 200 and response.json() == {"ok": True}
    assert scripted.seen == ["GET", "GET", "GET"]
    assert sleeps[1] == 0.2  # Retry-After honoured
    assert 0.005 <= sleeps[0] <= 0.01  # backoff with jitter: in [base/2, base]


def test_gives_up_after_the_attempts(scripted):
    scripted.script = [(503, {})] * 5
    endpoint, url = endpoint_for(scripted, [])
    with pytest.raises(Unavailable) as info:
        endpoint.request("GET", url, idempotent=True)
    assert scripted.seen == ["GET"] * 3 and info.value.status == 503 and isinstance(info.value, DatabaseError)
    assert "HTTP 503 Service Unavailable after 3 attempts" in str(info.value) and "try again later" in str(info.value)


def test_non_idempotent_requests_are_not_repeated_once_sent(scripted):
    scripted.script = [(503, {}), (200, {})]
    endpoint, url = endpoint_for(scripted, [])
    with pytest.raises(Unavailable):
        endpoint.request("POST", url, idempotent=False, data=b"{}")
    assert scripted.seen == ["POST"]  # the server may have acted on it: not sent again
    scripted.seen.clear()
    scripted.script = [(429, {"Retry-After": "0"}), (200, {})]
    assert endpoint.request("POST", url, idempotent=False, data=b"{}").status_code == 200
    assert scripted.seen == ["POST", "POST"]  # 429: the server did nothing, so repeating is safe


def test_a_long_retry_after_gives_up_at_once(scripted):
    scripted.script = [(503, {"Retry-After": "3600"}), (200, {})]
    sleeps: list[float] = []
    endpoint, url = endpoint_for(scripted, sleeps)
    with pytest.raises(Unavailable) as info:
        endpoint.request("GET", url, idempotent=True)
    assert scripted.seen == ["GET"] and sleeps == [] and info.value.retry_after == 3600


def test_connection_refused_is_retried_even_for_a_post():
    sleeps: list[float] = []
    endpoint = Endpoint(DatabaseError, f"http://127.0.0.1:{free_port()}", requests.Session(), 5, FAST,
                        sleep=sleeps.append)
    with pytest.raises(Unavailable) as info:
        endpoint.request("POST", endpoint.address + "/x.json", idempotent=False, data=b"{}")
    assert len(sleeps) == 2 and "connection refused after 3 attempts" in str(info.value)


def test_a_success_that_is_not_json_is_unavailable(scripted):
    """A captive portal answers 200 with its own page: that is not the service."""
    scripted.script = [(200, {"X-Body": "<html>Please log in to the hotel Wi-Fi</html>"})]
    endpoint, url = endpoint_for(scripted, [])
    with pytest.raises(Unavailable) as info:
        endpoint.json(endpoint.request("GET", url, idempotent=True))
    assert "not JSON" in str(info.value) and "captive portal" in str(info.value) and info.value.status == 200
    assert "hotel" in info.value.message


def test_retry_after_forms():
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    later = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= parse_retry_after(later) <= 31
    policy = RetryPolicy(base_delay=1, max_delay=4)
    for failures, cap in ((1, 1), (2, 2), (3, 4), (6, 4)):
        assert all(cap / 2 <= policy.delay(failures) <= cap for _ in range(50))


# ---- retries across a real outage ---------------------------------------------------------------


def test_a_get_is_retried_across_a_localbase_restart(tmp_path):
    server = LocalbaseProcess(data_dir=tmp_path).start()
    try:
        settings = server.settings()
        uid = "restart-" + uuid.uuid4().hex[:6]
        patient = UserDatabase(mint_id_token(settings.project_id, uid),
                               settings, retry=RetryPolicy(attempts=60, base_delay=0.1, max_delay=0.3))
        patient.set(f"users/{uid}/displayName", "Before the outage")
        server.kill9()
        restarted = threading.Timer(1.0, server.restart)
        restarted.start()
        t0 = time.monotonic()
        assert patient.get(f"users/{uid}/displayName") == "Before the outage"
        assert time.monotonic() - t0 >= 0.9  # it waited for the server to come back
        restarted.join()
    finally:
        server.stop()
