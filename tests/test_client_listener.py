"""RTDB listeners an app can rely on: failing callbacks, clean close, reconnects, token renewal and a
local copy (``UserDatabase.mirror``) that matches the server after a burst of writes. Real localbase
throughout; destructive tests (restarts) use a localbase of their own."""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid

import pytest

from dermaloop import auth as dl_auth
from dermaloop.admin_app import delete_app
from dermaloop.database import Event, LocalCopy, UserDatabase, admin_reference
from dermaloop.errors import Unauthenticated
from dermaloop.http import RetryPolicy
from localbase.tokens import LIFETIME_S, mint_id_token
from tests.localbase_process import LocalbaseProcess

FAST = RetryPolicy(attempts=3, base_delay=0.05, max_delay=0.3)
APP_NAME = "test_client_listener"


@pytest.fixture(scope="module")
def settings(localbase):
    yield localbase.settings(database_url="https://client-listener-default-rtdb.firebaseio.com")
    delete_app(APP_NAME)


@pytest.fixture
def user(settings) -> tuple[str, UserDatabase]:
    uid = "listener-" + uuid.uuid4().hex[:8]
    return uid, UserDatabase(mint_id_token(settings.project_id, uid), settings, retry=FAST)


def wait_for(predicate, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_a_failing_callback_is_logged_and_the_listener_carries_on(user, caplog):
    uid, db = user
    seen: list[Event] = []

    def callback(event: Event) -> None:
        seen.append(event)
        if len(seen) == 1:
            raise RuntimeError("the app's bug")

    with caplog.at_level(logging.ERROR, logger="dermaloop.database"):
        listener = db.listen(f"users/{uid}", callback)
        try:
            assert listener.wait_connected(15)
            for name in ("One", "Two", "Three"):
                db.set(f"users/{uid}/displayName", name)
            assert wait_for(lambda: len(seen) == 4)
            assert listener.state == "connected" and listener.thread.is_alive()
        finally:
            listener.close()
    assert [e.data for e in seen[1:]] == ["One", "Two", "Three"]
    failures = [r for r in caplog.records if "callback raised" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info and failures[0].exc_info[0] is RuntimeError


def test_closing_open_listeners_is_silent(settings, user, capfd, caplog, monkeypatch):
    uid, db = user
    thread_errors = []
    monkeypatch.setattr(threading, "excepthook", thread_errors.append)
    writing = threading.Event()

    def writer() -> None:  # events keep flowing while the listeners are closed
        n = 0
        while not writing.is_set():
            n += 1
            db.set(f"users/{uid}/displayName", f"name {n}")

    background = threading.Thread(target=writer)
    background.start()
    listeners = []
    try:
        with caplog.at_level(logging.DEBUG, logger="dermaloop"):
            for i in range(20):
                listener = db.listen(f"users/{uid}", lambda e: None)
                assert listener.wait_connected(15), i
                listener.close()
                assert not listener.thread.is_alive() and listener.state == "closed"
                listeners.append(listener)
            rng = random.Random(20)
            for _ in range(20):  # closed at any moment: while connecting, reading the first event, ...
                listener = db.listen(f"users/{uid}", lambda e: None)
                time.sleep(rng.random() * 0.01)
                listener.close()
                assert not listener.thread.is_alive()
                listeners.append(listener)
    finally:
        writing.set()
        background.join()
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""
    assert thread_errors == []
    assert [r.getMessage() for r in caplog.records if r.name.startswith("dermaloop") and r.levelno >= logging.INFO] == []
    assert not [t for t in threading.enumerate() if t.name.startswith("rtdb-listen")]


# ---- the local copy -----------------------------------------------------------------------------

KEYS = ["a", "b", "c", "d", "0", "1", "2"]


def random_value(rng: random.Random, depth: int = 0):
    r = rng.random()
    if depth >= 3 or r < 0.4:
        return rng.choice([rng.randint(-5, 100), f"s{rng.randint(0, 9)}", True, 2.5])
    if r < 0.5:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(1, 3))]
    return {k: random_value(rng, depth + 1) for k in rng.sample(KEYS, rng.randint(1, 3))}


def random_path(rng: random.Random, most: int = 3) -> str:
    return "/".join(rng.choice(KEYS) for _ in range(rng.randint(1, most)))


def random_write(rng: random.Random, ref) -> None:
    kind = rng.random()
    if kind < 0.35:
        ref.child(random_path(rng)).set(random_value(rng, 1))  # nested put
    elif kind < 0.65:  # multi-path update; first segments differ, so no key is another's ancestor
        base = ref.child(random_path(rng, 1)) if rng.random() < 0.5 else ref
        heads = rng.sample(KEYS, rng.randint(1, 3))
        changes = {}
        for head in heads:
            key = head if rng.random() < 0.5 else f"{head}/{random_path(rng, 2)}"
            changes[key] = None if rng.random() < 0.25 else random_value(rng, 2)
        base.update(changes)
    elif kind < 0.85:
        ref.child(random_path(rng)).delete()
    elif kind < 0.95:
        ref.child(random_path(rng, 1)).push(random_value(rng, 2))
    else:
        ref.set(random_value(rng, 1) if rng.random() < 0.8 else {"a": {"b": 1}})


def test_the_local_copy_equals_a_fresh_read_after_a_burst_of_writes(settings, user):
    uid, db = user
    path = f"users/{uid}/scratch"
    ref = admin_reference(path, settings, app_name=APP_NAME)  # the worker's kind of writes: admin
    ref.set({"start": {"x": 1}})
    changes = []
    mirror = db.mirror(path, on_change=changes.append)
    try:
        assert mirror.wait_synced(15) and mirror.value == {"start": {"x": 1}}
        rng = random.Random(15)
        for _ in range(200):
            random_write(rng, ref)
        ref.child("nested/deep/leaf").set("last")
        fresh = None

        def same() -> bool:
            nonlocal fresh
            fresh = db.get(path)
            return mirror.value == fresh

        assert wait_for(same, 20), (mirror.value, fresh)
        assert fresh == ref.get() and mirror.get("nested/deep") == {"leaf": "last"}
        assert mirror.get("no/such/thing") is None and len(changes) > 50
    finally:
        mirror.close()


def test_the_local_copy_applies_events_as_firebase_defines_them():
    """The event semantics on their own (events as the server sends them, no server needed)."""
    m = LocalCopy()
    m.apply(Event("put", "/", {"a": {"b": 1, "c": 2}, "l": [1, 2]}))
    assert m.value == {"a": {"b": 1, "c": 2}, "l": [1, 2]}
    m.apply(Event("put", "/a/b", None))  # delete
    m.apply(Event("put", "/a/c", None))  # the parent is now empty: it vanishes
    assert m.value == {"l": [1, 2]}
    m.apply(Event("patch", "/x", {"y/z": 5, "w": {"v": None, "u": 1}}))  # multi-path keys, nulls dropped
    assert m.value == {"l": [1, 2], "x": {"y": {"z": 5}, "w": {"u": 1}}}
    m.apply(Event("put", "/l/3", 3))  # keys mostly 0..n: still an array, with a hole
    assert m.get("l") == [1, 2, None, 3]
    m.apply(Event("put", "/l/9", 9))  # too sparse: an object
    assert m.get("l") == {"0": 1, "1": 2, "3": 3, "9": 9}
    m.apply(Event("put", "/x/y/z/q", "deeper"))  # under a primitive: it becomes an object
    assert m.get("x/y") == {"z": {"q": "deeper"}}
    m.apply(Event("put", "/", None))
    assert m.value is None


# ---- reconnects ---------------------------------------------------------------------------------


@pytest.fixture
def own_localbase(tmp_path):
    server = LocalbaseProcess(data_dir=tmp_path / "localbase").start()
    yield server
    server.stop()


def test_a_listener_reconnects_after_a_restart(own_localbase):
    settings = own_localbase.settings()
    uid = "restart-" + uuid.uuid4().hex[:6]
    db = UserDatabase(mint_id_token(settings.project_id, uid), settings, retry=FAST)
    db.set(f"users/{uid}/displayName", "Before")
    seen, states, errors = [], [], []
    listener = db.listen(f"users/{uid}/displayName", lambda e: seen.append(e.data),
                         on_state=states.append, on_error=errors.append)
    mirror = db.mirror(f"users/{uid}")
    try:
        assert listener.wait_connected(15) and mirror.wait_synced(15)
        own_localbase.restart()
        assert wait_for(lambda: listener.state == "connected" and mirror.state == "connected", 30), states
        db.set(f"users/{uid}/displayName", "After")
        assert wait_for(lambda: seen[-1:] == ["After"])
        assert wait_for(lambda: mirror.value == {"displayName": "After"})
    finally:
        listener.close()
        mirror.close()
    assert seen[0] == "Before" and seen[-1] == "After"
    assert states[:2] == ["connected", "reconnecting"] and "connected" in states[2:] and states[-1] == "closed"
    assert listener.reconnects >= 1


def expiring_token(project_id: str, uid: str, seconds: float) -> str:
    return mint_id_token(project_id, uid, now=time.time() - LIFETIME_S + seconds)


def test_auth_revoked_reconnects_with_a_fresh_token_from_the_source(settings, user):
    uid, _ = user
    handed_out = []

    def token_source() -> str:  # called once per connection
        token = (expiring_token(settings.project_id, uid, 1.5) if not handed_out
                 else mint_id_token(settings.project_id, uid))
        handed_out.append(token)
        return token

    db = UserDatabase(token_source, settings, retry=FAST)
    seen = []
    listener = db.listen(f"users/{uid}", lambda e: seen.append(e))
    try:
        assert listener.wait_connected(15)
        assert wait_for(lambda: len(handed_out) >= 2 and listener.state == "connected", 20)
        db.set(f"users/{uid}/displayName", "After renewal")
        assert wait_for(lambda: any(e.data == "After renewal" for e in seen))
    finally:
        listener.close()


def test_a_session_renews_its_token_when_the_stream_is_revoked(settings):
    email = f"stream-{uuid.uuid4().hex[:8]}@example.com"
    user, _ = dl_auth.create_user(email, "secret123", "patient", settings=settings)
    session = dl_auth.AuthClient(settings).sign_in(email, "secret123")
    session._id_token = expiring_token(settings.project_id, user.uid, 1.5)  # the session does not know
    short = session._id_token
    db = UserDatabase(session, settings, retry=FAST)
    seen = []
    listener = db.listen(f"users/{user.uid}", seen.append)
    try:
        assert listener.wait_connected(15)
        assert wait_for(lambda: session._id_token != short and listener.state == "connected", 20)
        db.set(f"users/{user.uid}/displayName", "Renewed")
        assert wait_for(lambda: any(e.data == "Renewed" for e in seen))
    finally:
        listener.close()

    # a revoked refresh token cannot renew: the listener is cancelled and says why
    time.sleep(1.1)  # validSince has one-second resolution: the refresh token must be older
    dl_auth.revoke(user.uid, settings)
    session._id_token = expiring_token(settings.project_id, user.uid, 1.5)
    reasons, errors = [], []
    listener = db.listen(f"users/{user.uid}", lambda e: None, on_cancel=reasons.append, on_error=errors.append)
    listener.thread.join(20)
    assert not listener.thread.is_alive() and listener.state == "closed"
    assert reasons and isinstance(errors[-1], Unauthenticated) and errors[-1].service == "Auth"
