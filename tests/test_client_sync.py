"""The patient app's sync engine (``client.sync``) against a real localbase: cases made offline go
up when the backend returns, an upload cut by a killed backend or a restarted app finishes from
where it stopped, repeats never make a second case or job, the server's changes and the chat reach
the phone. Outage tests run a localbase of their own (stopped, killed, restarted); the others share
the session's localbase in a namespace of their own (no worker there takes the jobs)."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
import uuid

import pytest

from client.store import DB_FILE, LocalStore
from client.sync import CASE_REFUSED, IDLE, MESSAGE_REFUSED, OFFLINE, SIGNED_OUT, SyncEngine
from dermaloop import auth as dl_auth
from dermaloop import cases
from dermaloop.admin_app import delete_app
from dermaloop.auth import AuthClient, UserSession
from dermaloop.cases import Status
from dermaloop.database import UserDatabase, admin_reference, new_push_id
from dermaloop.errors import PermissionDenied
from dermaloop.http import RetryPolicy
from dermaloop.storage import UserStorage, admin_bucket
from localbase.tokens import mint_id_token
from tests.localbase_process import LocalbaseProcess
from tests.worker_support import lesion_jpeg, wait_until

FAST = RetryPolicy(attempts=2, base_delay=0.05, max_delay=0.5)
CHUNK = 256 * 1024
PASSWORD = "patient-pass-1"
APP_NAME = "test_client_sync"
DEVICE = cases.device_record({"top": [{"label": "nv", "name": "naevus", "p": 0.7}], "risk": "low",
                              "quality": {"ok": True, "issues": ["dim"]}}, model_version="device-1", at=1_700_000_000_000)


@pytest.fixture(scope="module")
def settings(localbase):
    yield localbase.settings(database_url="https://client-sync-default-rtdb.firebaseio.com")
    delete_app(APP_NAME)


def sign_up(settings) -> UserSession:
    return AuthClient(settings, retry=FAST).sign_up(f"sync-{uuid.uuid4().hex[:8]}@example.com", PASSWORD)


def admin(settings, path: str, app_name: str = APP_NAME):
    return admin_reference(path, settings, app_name=app_name)


def big_photo(size: int) -> bytes:
    return b"\xff\xd8\xff\xe0" + os.urandom(size - 4)


def server_cases(settings, uid: str, app_name: str = APP_NAME) -> dict:
    return admin(settings, cases.patient_cases_path(uid), app_name).get() or {}


def stored_sha(settings, uid: str, case_id: str) -> str:
    data = admin_bucket(settings).blob(cases.image_object(uid, case_id)).download_as_bytes()
    return hashlib.sha256(data).hexdigest()


def generation(settings, uid: str, case_id: str) -> int:
    return admin_bucket(settings).get_blob(cases.image_object(uid, case_id)).generation


def status_of(store: LocalStore, uid: str, case_id: str) -> Status:
    return store.get(uid, case_id).status


@pytest.fixture
def own_localbase(tmp_path):
    """A localbase this test may stop, kill and restart (same ports, same data)."""
    server = LocalbaseProcess(data_dir=tmp_path / "localbase").start()
    app_name = f"sync-own-{uuid.uuid4().hex[:6]}"
    yield server, app_name
    server.stop()
    delete_app(app_name)


@pytest.fixture
def engines():
    """Engines and stores a test made, stopped and closed whatever happens."""
    made: list = []
    yield made
    for thing in reversed(made):
        (thing.stop if isinstance(thing, SyncEngine) else thing.close)()


def test_cases_made_offline_are_sent_when_the_backend_comes_back(own_localbase, tmp_path, engines):
    server, app_name = own_localbase
    settings = server.settings()
    session = sign_up(settings)
    uid = session.uid
    server.stop()  # the phone is offline from here on

    store = LocalStore(tmp_path / "app")
    engines.append(store)
    made = [store.add_case(uid, lesion_jpeg(i), device=DEVICE, research_consent=i == 0) for i in range(3)]
    engine = SyncEngine(store, session, settings, retry=FAST, request_retry=FAST).start()
    engines.append(engine)
    wait_until(lambda: engine.state == OFFLINE and not engine.online, "the engine to find the backend gone")
    assert "cannot reach" in engine.error
    assert [c.case_id for c in store.pending(uid)] == [c.case_id for c in made]
    assert all(c.remote is None and c.status in cases.LOCAL_STATUSES for c in store.cases(uid))

    server.restart()
    wait_until(lambda: all(status_of(store, uid, c.case_id) == Status.QUEUED for c in made),
               "the offline cases to be queued")
    on_server = server_cases(settings, uid, app_name)
    assert sorted(on_server) == sorted(c.case_id for c in made)
    for case in made:
        remote = on_server[case.case_id]
        assert remote["status"] == "queued" and remote["image"]["sha256"] == case.sha256
        assert remote["device"] == DEVICE and remote["consent"]["research"] is (case is made[0])
        job = admin(settings, cases.job_path(case.case_id), app_name).get()
        assert job == {"uid": uid, "caseId": case.case_id, "createdAt": remote["createdAt"]}
        assert stored_sha(settings, uid, case.case_id) == case.sha256
    wait_until(lambda: engine.online and engine.state == IDLE, "the engine to be idle")
    wait_until(lambda: all(store.get(uid, c.case_id).remote for c in made), "the server copies")


def test_a_backend_killed_mid_upload_is_resumed_with_the_right_photo(own_localbase, tmp_path, engines):
    server, app_name = own_localbase
    settings = server.settings()
    session = sign_up(settings)
    uid = session.uid
    store = LocalStore(tmp_path / "app")
    engines.append(store)
    photo = big_photo(3 * 1024 * 1024 + 999)  # 13 chunks
    case = store.add_case(uid, photo, content_type="image/jpeg", width=2000, height=1500)

    seen: list[tuple[int, int]] = []
    killed_after: list[int] = []
    holder: dict[str, SyncEngine] = {}

    def on_change(case_id: str | None) -> None:
        progress = holder["engine"].progress(case.case_id) if case_id == case.case_id else None
        if progress is None:
            return
        seen.append(progress)
        if progress[0] >= 2 * CHUNK and not killed_after:
            killed_after.append(len(seen))
            server.kill9()  # mid-upload, from the upload's own thread: the next chunk finds it gone

    engine = holder["engine"] = SyncEngine(store, session, settings, on_change=on_change, retry=FAST,
                                           request_retry=FAST, chunk_bytes=CHUNK)
    engines.append(engine)
    engine.start()
    wait_until(lambda: killed_after and engine.state == OFFLINE, "the upload to be cut")
    cut = store.get(uid, case.case_id)
    assert cut.status == Status.UPLOADING and cut.upload_url and "upload_id=" in cut.upload_url

    server.restart()
    wait_until(lambda: status_of(store, uid, case.case_id) == Status.QUEUED, "the case to be queued")
    resumed_at = seen[killed_after[0]][0]
    assert 2 * CHUNK <= resumed_at < len(photo)  # went on from what the server had, not from 0
    assert stored_sha(settings, uid, case.case_id) == case.sha256
    assert list(server_cases(settings, uid, app_name)) == [case.case_id]
    assert admin(settings, cases.job_path(case.case_id), app_name).get()["uid"] == uid
    assert store.get(uid, case.case_id).upload_url is None


def test_an_app_restarted_mid_queue_resumes_from_the_store(settings, tmp_path, engines):
    session = sign_up(settings)
    uid = session.uid
    root = tmp_path / "app"
    store = LocalStore(root)
    made = [store.add_case(uid, big_photo(700 * 1024 + i), content_type="image/jpeg", width=900, height=900)
            for i in range(3)]
    first, second, third = made
    holder: dict[str, SyncEngine] = {}

    def stop_mid_second(case_id: str | None) -> None:
        progress = holder["engine"].progress(second.case_id) if case_id == second.case_id else None
        if progress and progress[0] >= CHUNK:
            holder["engine"].stop()  # the app goes away in the middle of the second photo

    engine = holder["engine"] = SyncEngine(store, session, settings, on_change=stop_mid_second, retry=FAST,
                                           request_retry=FAST, chunk_bytes=CHUNK).start()
    wait_until(lambda: not engine._thread.is_alive(), "the first engine to stop")
    engine.stop()
    assert status_of(store, uid, first.case_id) == Status.QUEUED
    cut = store.get(uid, second.case_id)
    assert cut.status == Status.UPLOADING and cut.upload_url
    assert status_of(store, uid, third.case_id) == Status.CAPTURED
    store.close()

    # a new app process: new store object on the same folder, new session from the saved one
    store = LocalStore(root)
    engines.append(store)
    restored = AuthClient(settings, retry=FAST).restore(session.to_dict())
    seen: dict[str, list[tuple[int, int]]] = {}
    holder2: dict[str, SyncEngine] = {}

    def record(case_id: str | None) -> None:
        progress = holder2["engine"].progress(case_id) if case_id else None
        if progress:
            seen.setdefault(case_id, []).append(progress)

    engine2 = holder2["engine"] = SyncEngine(store, restored, settings, on_change=record, retry=FAST,
                                             request_retry=FAST, chunk_bytes=CHUNK)
    engines.append(engine2)
    engine2.start()
    wait_until(lambda: all(status_of(store, uid, c.case_id) == Status.QUEUED for c in made), "all cases queued")
    assert seen[second.case_id][0][0] >= CHUNK  # the second photo went on from the saved session
    assert first.case_id not in seen or seen[first.case_id][0][0] == first.bytes  # never sent again
    assert sorted(server_cases(settings, uid)) == sorted(c.case_id for c in made)
    for case in made:
        assert stored_sha(settings, uid, case.case_id) == case.sha256
        assert admin(settings, cases.job_path(case.case_id)).get()["caseId"] == case.case_id


class KeepsUrl:
    """An upload session store that "crashes" before forgetting the URL of a finished upload."""

    def __init__(self, inner):
        self.inner = inner

    def load(self):
        return self.inner.load()

    def save(self, url):
        self.inner.save(url)

    def clear(self):
        pass


def test_repeats_never_make_a_second_case_or_job(settings, tmp_path, engines):
    session = sign_up(settings)
    uid = session.uid
    store = LocalStore(tmp_path / "app")
    engines.append(store)
    sent = store.add_case(uid, lesion_jpeg(20), device=DEVICE)
    engine = SyncEngine(store, session, settings, retry=FAST, request_retry=FAST).start()
    wait_until(lambda: status_of(store, uid, sent.case_id) == Status.QUEUED, "the case to be queued")
    engine.stop()
    first_generation = generation(settings, uid, sent.case_id)

    # The answer to the case write was lost (the phone still thinks "uploading"), and meanwhile the
    # worker took the job, so the rules would refuse the write now.
    store.set_status(uid, sent.case_id, Status.UPLOADING)
    admin(settings, "/").update({f"{cases.job_path(sent.case_id)}/state": "running",
                                 f"{cases.case_path(uid, sent.case_id)}/status": "processing"})

    # A photo whose upload finished, but the app died before it forgot the session URL and before
    # the case write.
    unsent = store.add_case(uid, lesion_jpeg(21))
    store.set_status(uid, unsent.case_id, Status.UPLOADING)
    UserStorage(session, settings, retry=FAST).upload(
        cases.image_object(uid, unsent.case_id), lesion_jpeg(21), "image/jpeg", metadata={"sha256": unsent.sha256},
        session_store=KeepsUrl(store.upload_session(uid, unsent.case_id)))
    assert store.get(uid, unsent.case_id).upload_url
    unsent_generation = generation(settings, uid, unsent.case_id)

    # A photo whose upload finished and was forgotten (no session URL), the app dying before the
    # case write: the object with the same sha256 is not sent again.
    uploaded = store.add_case(uid, lesion_jpeg(22))
    store.set_status(uid, uploaded.case_id, Status.UPLOADING)
    UserStorage(session, settings, retry=FAST).upload(
        cases.image_object(uid, uploaded.case_id), lesion_jpeg(22), "image/jpeg",
        metadata={"sha256": uploaded.sha256}, session_store=store.upload_session(uid, uploaded.case_id))
    assert store.get(uid, uploaded.case_id).upload_url is None
    uploaded_generation = generation(settings, uid, uploaded.case_id)

    engine = SyncEngine(store, session, settings, retry=FAST, request_retry=FAST).start()
    engines.append(engine)
    wait_until(lambda: status_of(store, uid, unsent.case_id) == Status.QUEUED, "the unsent case to be queued")
    wait_until(lambda: status_of(store, uid, uploaded.case_id) == Status.QUEUED, "the uploaded case to be queued")
    wait_until(lambda: status_of(store, uid, sent.case_id) == Status.PROCESSING, "the server's status")
    assert store.get(uid, sent.case_id).last_error is None  # not failed: it was there already
    assert generation(settings, uid, sent.case_id) == first_generation  # the photo was not sent again
    assert generation(settings, uid, unsent.case_id) == unsent_generation  # the finished session was reused
    assert generation(settings, uid, uploaded.case_id) == uploaded_generation  # the object was already there
    assert admin(settings, f"{cases.job_path(sent.case_id)}/state").get() == "running"

    # the very same creation sent again (allowed while the worker has not touched it) is one case
    engine.db.update("/", cases.new_case_writes(store.get(uid, unsent.case_id).server_case()))
    mine = {sent.case_id, unsent.case_id, uploaded.case_id}
    assert set(server_cases(settings, uid)) == mine
    jobs = {key for key, job in (admin(settings, "jobs").get() or {}).items() if job.get("uid") == uid}
    assert jobs == mine


def test_the_servers_changes_reach_the_store_and_on_change(settings, tmp_path, engines):
    session = sign_up(settings)
    uid = session.uid
    store = LocalStore(tmp_path / "app")
    engines.append(store)
    changes: list[str | None] = []
    engine = SyncEngine(store, session, settings, on_change=changes.append, retry=FAST, request_retry=FAST).start()
    engines.append(engine)
    case = store.add_case(uid, lesion_jpeg(30), device=DEVICE)
    engine.kick()
    wait_until(lambda: status_of(store, uid, case.case_id) == Status.QUEUED, "the case to be queued")
    wait_until(lambda: (store.get(uid, case.case_id).remote or {}).get("status") == "queued", "the server copy")

    before = len(changes)
    now = int(time.time() * 1000)
    top = [{"label": "nv", "name": "naevus", "p": 0.9}]
    cloud = cases.cloud_record(model_version="cloud-1", quality={"ok": True, "issues": []}, lesion=None, box=None,
                               heatmap_path=None, timings_ms={"total": 1.0}, message=None, at=now,
                               probs={"nv": 0.9, "mel": 0.1}, top=top, risk="low", malignant_p=0.1)
    entry = cases.queue_entry(uid, "diagnosed", "low", 0.1, now, now)
    admin(settings, "/").update(cases.diagnosed_writes(uid, case.case_id, cloud, entry, now))
    wait_until(lambda: status_of(store, uid, case.case_id) == Status.DIAGNOSED, "the diagnosis to arrive")
    got = store.get(uid, case.case_id)
    assert got.remote["cloud"]["modelVersion"] == "cloud-1" and got.remote["cloud"]["top"] == top
    assert got.image_path == case.image_path  # the phone's photo stays
    wait_until(lambda: case.case_id in changes[before:], "on_change for the case")

    # a case the patient made on another phone appears here too
    elsewhere = new_push_id()
    image = cases.image_record(uid, elsewhere, "ab" * 32, "image/png", 10, 2, 3)
    UserDatabase(session, settings).update("/", cases.new_case_writes(cases.new_case(uid, elsewhere, image, True)))
    wait_until(lambda: store.get(uid, elsewhere) is not None, "the other phone's case")
    other = store.get(uid, elsewhere)
    assert other.image_path is None and other.status == Status.QUEUED and other.content_type == "image/png"
    assert [c.case_id for c in engine.cases()][:2] == [elsewhere, case.case_id]
    wait_until(lambda: elsewhere in changes, "on_change for the other phone's case")


def test_the_chat_with_a_dermatologist(settings, tmp_path, engines):
    session = sign_up(settings)
    uid = session.uid
    store = LocalStore(tmp_path / "app")
    engines.append(store)
    changes: list[str | None] = []
    engine = SyncEngine(store, session, settings, on_change=changes.append, retry=FAST, request_retry=FAST).start()
    engines.append(engine)
    case = store.add_case(uid, lesion_jpeg(40))
    engine.kick()
    wait_until(lambda: status_of(store, uid, case.case_id) == Status.QUEUED, "the case to be queued")

    derm_uid = f"derm-{uuid.uuid4().hex[:8]}"
    derm = UserDatabase(mint_id_token(settings.project_id, derm_uid, {"role": "dermatologist"}), settings)
    asked = new_push_id()
    derm.set(f"{cases.messages_path(uid, case.case_id)}/{asked}",
             cases.message_record(derm_uid, "dermatologist", "Does it itch?"))
    wait_until(lambda: engine.messages(case.case_id), "the dermatologist's message")
    (message,) = engine.messages(case.case_id)
    assert message["id"] == asked and message["text"] == "Does it itch?" and message["senderUid"] == derm_uid
    assert engine.unread(case.case_id) == 1
    assert case.case_id in changes

    answer = engine.send_message(case.case_id, "  A little, at night.  ")
    there = admin(settings, f"{cases.messages_path(uid, case.case_id)}/{answer}").get()
    assert there["senderUid"] == uid and there["senderRole"] == "patient" and there["text"] == "A little, at night."
    assert isinstance(there["at"], int)
    wait_until(lambda: len(engine.messages(case.case_id)) == 2, "the patient's own message to come back")
    assert [m["id"] for m in engine.messages(case.case_id)] == [asked, answer]  # sorted by at
    assert engine.unread(case.case_id) == 1  # the patient's own messages are never unread
    engine.mark_read(case.case_id)
    assert engine.unread(case.case_id) == 0
    with pytest.raises(ValueError):
        engine.send_message(case.case_id, "   ")

    # the chat is kept on the phone: a new engine shows it before (or without) any network
    engine.stop()
    assert [m["id"] for m in SyncEngine(store, session, settings).messages(case.case_id)] == [asked, answer]


def test_an_expired_token_is_renewed_by_the_session(settings, tmp_path, engines):
    session = sign_up(settings)
    uid = session.uid
    stale = mint_id_token(settings.project_id, uid, now=time.time() - 7200)
    session._id_token = stale  # the session's clock says fine, the server says expired
    store = LocalStore(tmp_path / "app")
    engines.append(store)
    case = store.add_case(uid, lesion_jpeg(50))
    engine = SyncEngine(store, session, settings, retry=FAST, request_retry=FAST).start()
    engines.append(engine)
    wait_until(lambda: status_of(store, uid, case.case_id) == Status.QUEUED, "the case to be queued")
    wait_until(lambda: store.get(uid, case.case_id).remote, "the listener to deliver the server copy")
    assert session.id_token() != stale


def test_a_case_the_server_refuses_fails_in_plain_words_and_the_queue_moves_on(settings, tmp_path, engines):
    session = sign_up(settings)
    uid = session.uid
    store = LocalStore(tmp_path / "app")
    engines.append(store)
    refused = store.add_case(uid, lesion_jpeg(60))
    good = store.add_case(uid, lesion_jpeg(61))
    # rows written by an older app: the rules want width > 0; the case domain wants a known type
    with sqlite3.connect(tmp_path / "app" / DB_FILE) as db:
        db.execute("UPDATE cases SET width = 0 WHERE case_id = ?", (refused.case_id,))
    later = store.add_case(uid, lesion_jpeg(62))
    with sqlite3.connect(tmp_path / "app" / DB_FILE) as db:
        db.execute("UPDATE cases SET content_type = 'image/gif' WHERE case_id = ?", (later.case_id,))

    engine = SyncEngine(store, session, settings, retry=FAST, request_retry=FAST).start()
    engines.append(engine)
    wait_until(lambda: status_of(store, uid, good.case_id) == Status.QUEUED, "the good case to be queued")
    wait_until(lambda: engine.state == IDLE, "the engine to settle")
    for bad in (refused, later):
        failed = store.get(uid, bad.case_id)
        assert failed.status == Status.FAILED and failed.last_error == CASE_REFUSED and not failed.pending
        assert failed.problem == CASE_REFUSED
    assert sorted(server_cases(settings, uid)) == [good.case_id]
    assert store.pending(uid) == []


def test_a_revoked_session_stops_the_engine_without_losing_cases(settings, tmp_path, engines):
    session = sign_up(settings)
    uid = session.uid
    store = LocalStore(tmp_path / "app")
    engines.append(store)
    case = store.add_case(uid, lesion_jpeg(70))
    time.sleep(1.1)  # revocation has one-second resolution: the session's tokens must be older
    dl_auth.revoke(uid, settings)
    session.expires_at = 0  # the next request asks for a new ID token, which is refused
    engine = SyncEngine(store, session, settings, retry=FAST, request_retry=FAST).start()
    engines.append(engine)
    wait_until(lambda: engine.state == SIGNED_OUT, "the engine to see the session ended")
    assert "TOKEN_EXPIRED" in engine.error
    assert [c.case_id for c in store.pending(uid)] == [case.case_id]  # kept for after the next sign-in


def test_a_message_written_offline_waits_and_is_sent_once_when_the_backend_is_back(own_localbase, tmp_path, engines):
    server, app_name = own_localbase
    settings = server.settings()
    session = sign_up(settings)
    uid = session.uid
    store = LocalStore(tmp_path / "app")
    engines.append(store)
    changes: list[str | None] = []
    engine = SyncEngine(store, session, settings, on_change=changes.append, retry=FAST, request_retry=FAST).start()
    engines.append(engine)
    case = store.add_case(uid, lesion_jpeg(80))
    engine.kick()
    wait_until(lambda: status_of(store, uid, case.case_id) == Status.QUEUED, "the case to be queued")

    server.stop()  # the patient writes with no backend
    msg_id = engine.send_message(case.case_id, "It bled a little this morning.")
    (waiting,) = engine.messages(case.case_id)
    assert waiting["id"] == msg_id and waiting["waiting"] is True and waiting["error"] is None
    assert waiting["text"] == "It bled a little this morning." and waiting["senderRole"] == "patient"
    assert [m["id"] for m in store.outbox(uid)] == [msg_id]
    assert case.case_id in changes
    wait_until(lambda: engine.state == OFFLINE, "the engine to retry with backoff")

    # a restarted app still has it: it is in the store, not in the engine
    engine.stop()
    engine = SyncEngine(store, session, settings, retry=FAST, request_retry=FAST)
    engines.append(engine)
    assert [m["id"] for m in engine.messages(case.case_id)] == [msg_id]
    engine.start()

    server.restart()
    wait_until(lambda: store.outbox(uid) == [], "the waiting message to be sent")
    on_server = admin(settings, cases.messages_path(uid, case.case_id), app_name).get()
    assert list(on_server) == [msg_id]  # exactly once, at the id it was given offline
    assert on_server[msg_id]["text"] == "It bled a little this morning." and isinstance(on_server[msg_id]["at"], int)
    wait_until(lambda: [m.get("waiting") for m in engine.messages(case.case_id)] == [None],
               "the server's copy to replace the waiting one")


def test_a_message_whose_answer_was_lost_is_not_posted_twice(settings, tmp_path, engines):
    session = sign_up(settings)
    uid = session.uid
    store = LocalStore(tmp_path / "app")
    engines.append(store)
    engine = SyncEngine(store, session, settings, retry=FAST, request_retry=FAST).start()
    engines.append(engine)
    case = store.add_case(uid, lesion_jpeg(81))
    engine.kick()
    wait_until(lambda: status_of(store, uid, case.case_id) == Status.QUEUED, "the case to be queued")
    engine.stop()  # nothing follows the server now: the outbox is all the phone knows

    # The write got through, the answer never came back: the message is still in the outbox.
    sent = cases.message_record(uid, "patient", "Sent once")
    msg_id = new_push_id()
    UserDatabase(session, settings, retry=FAST).set(f"{cases.messages_path(uid, case.case_id)}/{msg_id}", sent)
    store.queue_message(uid, case.case_id, msg_id, sent)
    # And one the rules refuse (its case is not on the server): it stays, marked, and is not retried.
    refused = new_push_id()
    store.queue_message(uid, case.case_id + "x", refused, cases.message_record(uid, "patient", "Nowhere"))

    engine = SyncEngine(store, session, settings, retry=FAST, request_retry=FAST).start()
    engines.append(engine)
    wait_until(lambda: store.outbox(uid, failed=False) == [], "the outbox to be worked through")
    assert list(admin(settings, cases.messages_path(uid, case.case_id)).get()) == [msg_id]
    (kept,) = store.outbox(uid)
    assert kept["id"] == refused and kept["error"] == MESSAGE_REFUSED
    (shown,) = engine.messages(case.case_id + "x")
    assert shown["waiting"] is True and shown["error"] == MESSAGE_REFUSED
    assert admin(settings, cases.messages_path(uid, case.case_id + "x")).get() is None

    # Refused at once while online: the patient is told, nothing is kept.
    with pytest.raises(PermissionDenied):
        engine.send_message(case.case_id + "y", "Also nowhere")
    assert [m["id"] for m in store.outbox(uid)] == [refused]
