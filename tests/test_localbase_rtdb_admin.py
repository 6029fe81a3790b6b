"""The unmodified firebase-admin ``db`` API against a real localbase (its own process and rules).

This module starts a private localbase so it can use test rules (indexes, a data-dependent read rule),
a short keep-alive, and kill -9 it without disturbing other test modules.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid

import firebase_admin
import pytest
import requests
from firebase_admin import db, exceptions

from dermaloop.admin_app import delete_app, get_app
from localbase.tokens import mint_id_token
from tests.localbase_process import LocalbaseProcess
from tests.rtdb_helpers import RawStream, wait_for

TEST_RULES = {
    "rules": {
        "idx": {"$run": {".indexOn": ["height", "dims/h", "weight", ".value"]}},
        "gated": {".read": "auth != null && root.child('gate').val() === true"},
        "open": {".read": "auth != null", ".write": "auth != null"},
    }
}
APP_NAME = "test_localbase_rtdb_admin"
ADMIN = {"Authorization": "Bearer owner"}
# firebase-admin's ListenerRegistration.close() closes the response under its reader thread, which
# then dies with AttributeError inside urllib3 (SDK behaviour, also against production). Missing or
# wrong events still fail the assertions below.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")


@pytest.fixture(scope="module")
def lb(tmp_path_factory):
    rules_dir = tmp_path_factory.mktemp("rules")
    (rules_dir / "database.rules.json").write_text(json.dumps(TEST_RULES))
    old = os.environ.get("LOCALBASE_RTDB_KEEPALIVE_S")
    os.environ["LOCALBASE_RTDB_KEEPALIVE_S"] = "0.5"
    try:
        server = LocalbaseProcess(data_dir=tmp_path_factory.mktemp("lb-admin"), rules_dir=rules_dir).start()
    finally:
        if old is None:
            os.environ.pop("LOCALBASE_RTDB_KEEPALIVE_S", None)
        else:
            os.environ["LOCALBASE_RTDB_KEEPALIVE_S"] = old
    yield server
    server.stop()


@pytest.fixture(scope="module")
def app(lb) -> firebase_admin.App:
    application = get_app(lb.settings(), name=APP_NAME)
    yield application
    delete_app(APP_NAME)


@pytest.fixture
def root(app) -> db.Reference:
    """A fresh path per test so tests never see each other's data."""
    return db.reference(f"/t/{uuid.uuid4().hex}", app=app)


def test_set_get_update_push_delete(root):
    root.set({"name": "a", "n": 1, "nested": {"x": True}, "list": [3, 2, 1]})
    assert root.get() == {"name": "a", "n": 1, "nested": {"x": True}, "list": [3, 2, 1]}
    assert root.child("nested/x").get() is True
    root.update({"n": 2, "nested/y/z": "deep", "name": None})
    assert root.get() == {"n": 2, "nested": {"x": True, "y": {"z": "deep"}}, "list": [3, 2, 1]}
    first = root.child("items").push({"v": 1})
    second = root.child("items").push()
    assert len(first.key) == 20 and first.key < second.key  # time-ordered push ids
    assert root.child("items").get() == {first.key: {"v": 1}, second.key: ""}
    stamped = root.child("stamp").push({"at": {".sv": "timestamp"}})
    at = stamped.child("at").get()
    assert isinstance(at, int) and abs(at - time.time() * 1000) < 60_000
    root.child("nested").delete()
    assert root.child("nested").get() is None
    root.child("items").set({})  # an empty object is no data
    assert root.child("items").get() is None
    root.delete()
    assert root.get() is None


def test_shallow_and_increment(root):
    root.set({"a": {"deep": 1}, "b": 2, "count": 5})
    assert root.get(shallow=True) == {"a": True, "b": True, "count": True}
    root.update({"count": {".sv": {"increment": 3}}, "fresh": {".sv": {"increment": 2}}})
    assert root.child("count").get() == 8
    assert root.child("fresh").get() == 2


DINOS = {
    "bruhathkayosaurus": {"height": 25, "dims": {"h": 3}, "weight": 2500},
    "lambeosaurus": {"height": 2.1, "dims": {"h": 1}, "weight": 2500},
    "linhenykus": {"height": 0.6, "dims": {"h": 2}},
    "pterodactyl": {"height": 0.6, "dims": {"h": 5}},
    "stegosaurus": {"height": 4, "dims": {"h": 4}},
    "triceratops": {"height": 3},
    "7": {"height": True},
    "10": {"height": "tall"},
}


@pytest.fixture
def dinos(app) -> db.Reference:
    ref = db.reference(f"/idx/{uuid.uuid4().hex}", app=app)
    ref.set(DINOS)
    return ref


def test_order_by_child_queries(dinos):
    assert list(dinos.order_by_child("height").get()) == [
        "7", "linhenykus", "pterodactyl", "lambeosaurus", "triceratops", "stegosaurus", "bruhathkayosaurus", "10",
    ]  # true < numbers < strings; ties by key
    assert list(dinos.order_by_child("height").start_at(1).end_at(4).get()) == ["lambeosaurus", "triceratops", "stegosaurus"]
    assert list(dinos.order_by_child("height").equal_to(0.6).get()) == ["linhenykus", "pterodactyl"]
    assert list(dinos.order_by_child("height").limit_to_first(2).get()) == ["7", "linhenykus"]
    assert list(dinos.order_by_child("height").limit_to_last(2).get()) == ["bruhathkayosaurus", "10"]
    # A missing child orders as null, first. (The SDK re-sorts ties by key as plain strings.)
    assert set(dinos.order_by_child("dims/h").limit_to_first(3).get()) == {"7", "10", "triceratops"}
    assert list(dinos.order_by_child("dims/h").start_at(4).get()) == ["stegosaurus", "pterodactyl"]
    assert list(dinos.order_by_child("weight").equal_to(2500).get()) == ["bruhathkayosaurus", "lambeosaurus"]


def test_order_by_key_value_and_limits(app, dinos):
    # Integer keys first, numerically (the SDK's own re-sort compares keys as strings, so look at
    # which key the server picks, not at the order the SDK hands back).
    assert list(dinos.order_by_key().limit_to_first(1).get()) == ["7"]
    assert list(dinos.order_by_key().limit_to_first(3).get()) == ["10", "7", "bruhathkayosaurus"]
    assert list(dinos.order_by_key().start_at("l").end_at("q").get()) == ["lambeosaurus", "linhenykus", "pterodactyl"]
    assert list(dinos.order_by_key().equal_to("stegosaurus").get()) == ["stegosaurus"]
    assert list(dinos.order_by_key().limit_to_last(2).start_at("l").get()) == ["stegosaurus", "triceratops"]
    scores = db.reference(f"/idx/{uuid.uuid4().hex}", app=app)
    scores.set({"a": 5, "b": "x", "c": False, "d": 1.5, "e": {"o": 1}, "f": True})
    assert list(scores.order_by_value().get()) == ["c", "f", "d", "a", "b", "e"]
    assert scores.order_by_value().limit_to_last(2).get() == {"b": "x", "e": {"o": 1}}
    assert list(scores.order_by_value().start_at(2).end_at("z").get()) == ["a", "b"]


def test_start_after_end_before_over_rest(lb, dinos):
    url = f"{lb.database_url}{dinos.path}.json"
    params = {"orderBy": '"height"', "startAfter": "0.6", "endBefore": "4", "ns": lb.settings().database_namespace}
    got = requests.get(url, params=params, headers={"Authorization": "Bearer owner"})
    assert got.status_code == 200
    assert set(got.json()) == {"lambeosaurus", "triceratops"}


def test_unindexed_query_is_refused_like_production(app, root):
    root.set({"a": {"x": 1}})
    with pytest.raises(exceptions.InvalidArgumentError, match=r'\.indexOn": "x"'):
        root.order_by_child("x").get()


def test_etags_and_conditional_writes(root):
    value, tag = root.get(etag=True)
    assert value is None and tag == "null_etag"
    root.set({"v": 1})
    value, tag = root.get(etag=True)
    assert value == {"v": 1} and tag != "null_etag"
    assert root.get_if_changed(tag) == (False, None, None)
    changed, new_value, new_tag = root.set_if_unchanged(tag, {"v": 2})
    assert changed and new_value == {"v": 2} and new_tag != tag
    changed, current, current_tag = root.set_if_unchanged(tag, {"v": 3})  # stale etag
    assert not changed and current == {"v": 2} and current_tag == new_tag
    assert root.get() == {"v": 2}
    assert root.get_if_changed(tag) == (True, {"v": 2}, new_tag)


def test_transactions_from_many_threads_count_exactly(root):
    counter = root.child("counter")
    threads_n, per_thread = 4, 15
    errors: list[BaseException] = []

    def work():
        try:
            for _ in range(per_thread):
                counter.transaction(lambda current: (current or 0) + 1)
        except BaseException as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert counter.get() == threads_n * per_thread


def test_listen_sees_every_change_in_order(root):
    seen: list[tuple[str, str, object]] = []
    root.set({"start": 0})
    registration = root.listen(lambda e: seen.append((e.event_type, e.path, e.data)))
    try:
        assert wait_for(lambda: len(seen) >= 1)
        for i in range(40):
            root.child("n").set(i)
        root.update({"a/b": 1, "c": 2})
        root.parent.child(root.key).set({"replaced": True})  # a write at the listened path itself
        root.child("replaced").delete()
        assert wait_for(lambda: len(seen) >= 44)
    finally:
        registration.close()
    assert seen[0] == ("put", "/", {"start": 0})
    assert seen[1:41] == [("put", "/n", i) for i in range(40)]
    assert seen[41] == ("patch", "/", {"a/b": 1, "c": 2})
    assert seen[42] == ("put", "/", {"replaced": True})
    assert seen[43] == ("put", "/replaced", None)


def test_listener_below_a_write_gets_its_new_value(app, root):
    root.set({"x": {"y": 1}, "other": 1})
    stream_seen: list = []
    registration = root.child("x").listen(lambda e: stream_seen.append((e.event_type, e.path, e.data)))
    try:
        assert wait_for(lambda: len(stream_seen) >= 1)
        root.update({"other": 2})  # does not touch /x: no event
        root.set({"x": {"y": 2}})
        root.update({"x/y": 3, "x/z/w": 4, "other": 3})  # keys reaching below the listener
        root.update({"x": {"q": 5}})  # a key equal to the listened path replaces it
        assert wait_for(lambda: len(stream_seen) >= 4)
    finally:
        registration.close()
    assert stream_seen == [("put", "/", {"y": 1}), ("put", "/", {"y": 2}), ("patch", "/", {"y": 3, "z/w": 4}),
                           ("put", "/", {"q": 5})]


def test_auth_variable_override_runs_rules(lb, app):
    as_user = firebase_admin.initialize_app(
        app.credential, {"databaseURL": app.options.get("databaseURL"),
                         "databaseAuthVariableOverride": {"uid": "u1"}}, name=APP_NAME + "-override")
    as_nobody = firebase_admin.initialize_app(
        app.credential, {"databaseURL": app.options.get("databaseURL"),
                         "databaseAuthVariableOverride": None}, name=APP_NAME + "-nobody")
    try:
        path = f"/open/{uuid.uuid4().hex}"
        db.reference(path, app=as_user).set({"ok": 1})
        assert db.reference(path, app=as_user).get() == {"ok": 1}
        with pytest.raises(exceptions.UnauthenticatedError, match="Permission denied"):
            db.reference(path, app=as_nobody).get()
        with pytest.raises(exceptions.UnauthenticatedError, match="Permission denied"):
            db.reference(f"/t/{uuid.uuid4().hex}", app=as_user).set(1)
    finally:
        firebase_admin.delete_app(as_user)
        firebase_admin.delete_app(as_nobody)


def _user_params(lb, uid: str, **token_fields) -> dict:
    settings = lb.settings()
    return {"auth": mint_id_token(settings.project_id, uid, **token_fields), "ns": settings.database_namespace}


def test_stream_keepalive_and_cancel_when_rules_stop_allowing(lb, app):
    gate = db.reference("/gate", app=app)
    gate.set(True)
    db.reference("/gated/item", app=app).set("v1")
    stream = RawStream(f"{lb.database_url}/gated.json", params=_user_params(lb, "reader"))
    try:
        assert stream.status == 200
        assert wait_for(lambda: stream.events() != [])
        assert stream.events()[0] == ("put", {"path": "/", "data": {"item": "v1"}})
        assert wait_for(lambda: ("keep-alive", "null") in stream.frames)  # keep-alive interval is 0.5 s here
        db.reference("/gated/item", app=app).set("v2")
        assert wait_for(lambda: len(stream.events()) >= 2)
        gate.set(False)  # the read rule now denies: the stream is cancelled and closed
        assert stream.ended.wait(15)
    finally:
        stream.close()
    assert stream.events()[1] == ("put", {"path": "/item", "data": "v2"})
    assert stream.frames[-1] == ("cancel", "null")
    assert all(event is not None and data for event, data in stream.frames)  # never a frame without data
    denied = RawStream(f"{lb.database_url}/gated.json", params=_user_params(lb, "reader"))
    assert denied.status == 401 and json.loads(denied.body) == {"error": "Permission denied"}


def test_stream_of_an_expiring_token_ends_with_auth_revoked(lb):
    # A token that expires two seconds from now (issued almost an hour ago).
    params = _user_params(lb, "short", now=time.time() - 3600 + 2)
    stream = RawStream(f"{lb.database_url}/open/x.json", params=params)
    try:
        assert stream.status == 200
        assert stream.ended.wait(20)
    finally:
        stream.close()
    assert stream.frames[0][0] == "put"
    assert stream.frames[-1] == ("auth_revoked", "credential is no longer valid")  # unquoted, as the SDK needs


def test_user_client_reconnects_with_a_fresh_token_after_auth_revoked(lb, app):
    from dermaloop.database import UserDatabase

    settings = lb.settings()
    issued: list[str] = []

    def token_source() -> str:
        # The first token expires two seconds from now; later ones are fresh.
        now = time.time() - 3600 + 2 if not issued else None
        issued.append(mint_id_token(settings.project_id, "reader", now=now))
        return issued[-1]

    path = f"/open/{uuid.uuid4().hex}"
    db.reference(path, app=app).set({"v": 0})
    seen = []
    listener = UserDatabase(token_source, settings).listen(path, lambda e: seen.append((e.event_type, e.path, e.data)))
    try:
        assert wait_for(lambda: len(issued) >= 2 and len(seen) >= 2)  # expired, reconnected, new snapshot
        db.reference(path, app=app).child("v").set(1)
        assert wait_for(lambda: ("put", "/v", 1) in seen)
    finally:
        listener.close()
    assert seen[:2] == [("put", "/", {"v": 0}), ("put", "/", {"v": 0})]
    assert seen[-1] == ("put", "/v", 1)


def test_many_listeners_all_get_each_event(lb, app, root):
    root.set({"v": 0})
    url = f"{lb.database_url}{root.path}.json"
    streams = [RawStream(url, params={"ns": lb.settings().database_namespace},
                         headers={"Authorization": "Bearer owner"}) for _ in range(20)]
    try:
        assert wait_for(lambda: all(len(s.events()) >= 1 for s in streams))
        for i in range(1, 6):
            root.child("v").set(i)
        assert wait_for(lambda: all(len(s.events()) >= 6 for s in streams))
    finally:
        for s in streams:
            s.close()
    for s in streams:
        assert [e[1]["data"] for e in s.events()[1:6]] == [1, 2, 3, 4, 5]


def test_no_event_is_lost_between_snapshot_and_first_change(lb, root):
    """Listeners connect while a writer keeps counting: each one's snapshot plus its events must be
    a gap-free sequence ending at the last value written."""
    counter = root.child("c")
    counter.set(0)
    stop = threading.Event()
    last = [0]

    def writer():
        with requests.Session() as s:
            while not stop.is_set():
                last[0] += 1
                r = s.put(f"{lb.database_url}{counter.path}.json", data=str(last[0]),
                          params={"ns": lb.settings().database_namespace, "print": "silent"}, headers=ADMIN)
                assert r.status_code == 204

    thread = threading.Thread(target=writer)
    thread.start()
    streams = []
    try:
        for _ in range(8):
            streams.append(RawStream(f"{lb.database_url}{counter.path}.json",
                                     params={"ns": lb.settings().database_namespace}, headers=ADMIN))
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join()
    final = last[0]
    try:
        assert wait_for(lambda: all(s.events() and s.events()[-1][1]["data"] == final for s in streams))
    finally:
        for s in streams:
            s.close()
    for s in streams:
        values = [payload["data"] for _, payload in s.events()]
        assert values == list(range(values[0], final + 1)), values[:5]


def test_acknowledged_writes_survive_kill_9(lb, app):
    base = f"/durable/{uuid.uuid4().hex}"
    ref = db.reference(base, app=app)
    ref.set({"a": {"b": [1, 2]}, "s": "text"})
    ref.update({"multi/x": 1, "multi/y": 2, "s": None})
    keys = [ref.child("pushed").push({"i": i}).key for i in range(50)]
    ref.child("was_leaf").set(5)
    ref.child("was_leaf/now").set("object")  # a primitive replaced by an object through a deeper write
    url = f"{lb.database_url}{base}/prio.json"
    put = requests.put(url, params={"ns": lb.settings().database_namespace}, headers={"Authorization": "Bearer owner"},
                       data=json.dumps({".value": "p", ".priority": 3}))
    assert put.status_code == 200
    lb.kill9()
    lb.start()
    after = db.reference(base, app=app).get()
    assert after["a"] == {"b": [1, 2]}
    assert after["multi"] == {"x": 1, "y": 2}
    assert "s" not in after
    assert after["was_leaf"] == {"now": "object"}
    assert list(after["pushed"]) == sorted(keys) and after["pushed"][keys[-1]] == {"i": 49}
    exported = requests.get(f"{lb.database_url}{base}/prio.json",
                            params={"ns": lb.settings().database_namespace, "format": "export"},
                            headers={"Authorization": "Bearer owner"}).json()
    assert exported == {".value": "p", ".priority": 3}
