"""The patient app's local store (``client.store``): a case is kept whole or not at all, bad input is
refused before anything is written, and everything the sync engine needs to resume survives
reopening the folder. No backend is involved: the store is what works offline."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading

import pytest

from client import store as store_module
from client.store import DB_FILE, IMAGES_DIR, LocalStore, StoreError
from dermaloop import cases
from dermaloop.cases import Status
from tests.worker_support import lesion_jpeg

UID = "patient-1"
DEVICE = cases.device_record({"top": [{"label": "nv", "name": "naevus", "p": 0.8}], "risk": "low",
                              "quality": {"ok": True, "issues": []}}, model_version="device-1", at=1_700_000_000_000)


@pytest.fixture
def store(tmp_path):
    with LocalStore(tmp_path / "app") as s:
        yield s


def files_under(root) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in (root / IMAGES_DIR).rglob("*") if p.is_file())


def rows(root) -> int:
    with sqlite3.connect(root / DB_FILE) as db:
        return db.execute("SELECT COUNT(*) FROM cases").fetchone()[0]


def test_a_case_is_kept_with_its_photo_and_read_back(store):
    photo = lesion_jpeg(1)
    case = store.add_case(UID, photo, device=DEVICE, note={"site": "left arm", "text": "itches"},
                          research_consent=True)
    assert case.status == Status.DIAGNOSED_ON_DEVICE and case.pending
    assert (case.content_type, case.width, case.height) == ("image/jpeg", 320, 240)  # read from the photo
    assert case.sha256 == hashlib.sha256(photo).hexdigest() and case.bytes == len(photo)
    assert case.image_path.read_bytes() == photo and store.image_bytes(case) == photo
    assert case.device == DEVICE and case.note == {"site": "left arm", "text": "itches"}
    assert case.research_consent and not case.sent_anyway and case.remote is None and case.upload_url is None
    assert store.get(UID, case.case_id) == case
    assert store.get("someone-else", case.case_id) is None
    # what the server will get is the case domain's record
    server = case.server_case()
    assert server["image"] == cases.image_record(UID, case.case_id, case.sha256, "image/jpeg", len(photo), 320, 240)
    assert server["status"] == "queued" and server["device"] == DEVICE


def test_lists_newest_first_pending_oldest_first(store):
    made = [store.add_case(UID, lesion_jpeg(i), created_at=1000 + i) for i in range(3)]
    store.add_case("other-patient", lesion_jpeg(9))
    assert [c.case_id for c in store.cases(UID)] == [c.case_id for c in reversed(made)]
    assert [c.case_id for c in store.pending(UID)] == [c.case_id for c in made]
    assert all(c.status == Status.CAPTURED for c in made)  # no device result: captured
    store.mark_queued(UID, made[0].case_id)
    assert [c.case_id for c in store.pending(UID)] == [c.case_id for c in made[1:]]


def test_a_failure_while_writing_the_photo_leaves_nothing(store, monkeypatch):
    root = store.root

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_module.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space"):
        store.add_case(UID, lesion_jpeg(2))
    monkeypatch.undo()
    assert files_under(root) == [] and rows(root) == 0 and store.cases(UID) == []


def test_a_failure_while_writing_the_row_leaves_nothing(store, monkeypatch):
    root = store.root
    kept = store.add_case(UID, lesion_jpeg(3))

    # the photo file is in place when the row fails: it must go again, and the first case stays whole
    with pytest.raises(StoreError, match="already exists"):
        store.add_case(UID, lesion_jpeg(4), case_id=kept.case_id)
    assert files_under(root) == [kept.image_path.relative_to(root).as_posix()]
    assert store.get(UID, kept.case_id).image_path.read_bytes() == lesion_jpeg(3)

    real = store._transaction

    def failing_transaction():
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(store, "_transaction", failing_transaction)
    with pytest.raises(sqlite3.OperationalError):
        store.add_case(UID, lesion_jpeg(5))
    monkeypatch.setattr(store, "_transaction", real)
    assert files_under(root) == [kept.image_path.relative_to(root).as_posix()] and rows(root) == 1


def test_what_a_crash_left_between_file_and_row_is_removed_on_the_next_start(tmp_path):
    root = tmp_path / "app"
    with LocalStore(root) as s:
        kept = s.add_case(UID, lesion_jpeg(6))
    folder = kept.image_path.parent
    (folder / "orphan.abcd.jpg").write_bytes(b"renamed, never committed")
    (folder / ".half.abcd.tmp").write_bytes(b"half written")
    with LocalStore(root) as s:
        assert files_under(root) == [kept.image_path.relative_to(root).as_posix()]
        assert s.get(UID, kept.case_id).image_path.read_bytes() == lesion_jpeg(6)


@pytest.mark.parametrize("bad, message", [
    ({"note": {"text": "x" * 100_000}}, "note is limited to 2000"),
    ({"note": {"site": "s" * 101}}, "body site is limited"),
    ({"note": {"mood": "sad"}}, "site"),
    ({"image": b""}, "empty"),
    ({"status": "shipped"}, "unknown case status"),
    ({"status": "diagnosed"}, "starts as captured"),
    ({"content_type": "image/gif"}, "photos must be one of"),
    ({"image": b"x" * (cases.MAX_IMAGE_BYTES + 1)}, "20 MiB"),
    ({"width": 0}, "width"),
    ({"image": b"%PDF-1.4 not a photo", "content_type": None}, "not a usable photo"),
    ({"device": {"modelVersion": "d", "at": 1, "risk": "extreme"}}, "risk"),
    ({"device": {"top": [], "at": 1}}, "model version"),
    ({"device": {**DEVICE, "secret": 1}}, "fields the server does not take"),
    ({"device": {**DEVICE, "unsure": "yes"}}, "unsure flag is a bool"),
    ({"device": {**DEVICE, "predictionSet": "mel"}}, "prediction set lists at most 7"),
    ({"device": {**DEVICE, "predictionSet": ["mel"] * 8}}, "prediction set lists at most 7"),
    ({"device": {**DEVICE, "predictionSet": ["mel", 3]}}, "prediction set lists at most 7"),
    ({"device": {**DEVICE, "demonstration": False}}, "demonstration mark is true or absent"),
    ({"same_lesion_as": "-Nope"}, "no earlier case"),
    ({"case_id": "a/b"}, "not a valid database key"),
])
def test_bad_input_is_refused_and_nothing_is_stored(store, bad, message):
    args = {"image": lesion_jpeg(7), "content_type": "image/jpeg", "width": 320, "height": 240, **bad}
    image = args.pop("image")
    with pytest.raises(StoreError, match=message):
        store.add_case(UID, image, **args)
    assert isinstance(StoreError(""), ValueError)
    assert store.cases(UID) == [] and files_under(store.root) == [] and rows(store.root) == 0


def test_the_abstain_verdict_and_the_demonstration_mark_are_kept_as_the_server_takes_them(store):
    """What ``device_record`` makes of an unsure answer (or a demonstration model's) is stored whole."""
    unsure = cases.device_record({"top": [{"label": "mel", "name": "melanoma", "p": 0.5}], "risk": "moderate",
                                  "unsure": True, "prediction_set": ["mel", "nv"]}, "device-1", at=1)
    demo = cases.device_record({"top": [{"label": "nv", "name": "naevus", "p": 0.5}], "demonstration": True},
                               "starter", at=1)
    for device in (unsure, demo):
        case = store.add_case(UID, lesion_jpeg(9), device=device)
        assert store.get(UID, case.case_id).device == device
    assert unsure["unsure"] is True and unsure["predictionSet"] == ["mel", "nv"] and demo["demonstration"] is True


def test_status_updates_refuse_unknown_statuses(store):
    case = store.add_case(UID, lesion_jpeg(8))
    with pytest.raises(StoreError, match="unknown case status"):
        store.set_status(UID, case.case_id, "lost")
    assert store.set_status(UID, case.case_id, Status.UPLOADING)
    assert store.mark_failed(UID, case.case_id, "The server did not accept this photo.")
    failed = store.get(UID, case.case_id)
    assert failed.status == Status.FAILED and failed.problem == "The server did not accept this photo."
    assert not failed.pending and store.pending(UID) == []
    assert store.retry(UID, case.case_id) and store.get(UID, case.case_id).status == Status.CAPTURED


def test_the_server_copy_wins_and_cases_from_elsewhere_appear(store):
    mine = store.add_case(UID, lesion_jpeg(10), device=DEVICE)
    remote = {**mine.server_case(), "createdAt": 5, "consent": {"research": False, "at": 5}, "status": "diagnosed"}
    assert store.apply_remote(UID, mine.case_id, remote)
    assert not store.apply_remote(UID, mine.case_id, remote)  # nothing new
    got = store.get(UID, mine.case_id)
    assert got.status == Status.DIAGNOSED and got.remote == remote and got.image_path == mine.image_path
    assert store.mark_queued(UID, mine.case_id) is False  # a later server status is never taken back
    # a failure the worker reported is told in the case domain's words
    store.apply_remote(UID, mine.case_id, {**remote, "status": "failed", "failure": {"reason": "corrupt_image"}})
    assert store.get(UID, mine.case_id).problem == cases.failure_message("corrupt_image")

    other = {"caseId": "-Other", "patientUid": UID, "createdAt": 7, "status": "queued",
             "consent": {"research": True, "at": 7}, "image": {"sha256": "ab" * 32, "contentType": "image/png",
                                                                "bytes": 10, "width": 2, "height": 3}}
    changed = store.apply_remote_all(UID, {mine.case_id: remote, "-Other": other})
    assert changed == {mine.case_id, "-Other"}
    elsewhere = store.get(UID, "-Other")
    assert elsewhere.image_path is None and elsewhere.status == Status.QUEUED and elsewhere.research_consent
    assert elsewhere.content_type == "image/png" and not elsewhere.pending
    # gone from the server: the row stays, without a server copy
    assert store.apply_remote_all(UID, {mine.case_id: remote}) == {"-Other"}
    assert store.get(UID, "-Other").remote is None


def test_the_upload_session_url_lives_in_the_row_and_survives_a_restart(tmp_path):
    root = tmp_path / "app"
    with LocalStore(root) as s:
        case = s.add_case(UID, lesion_jpeg(11))
        sessions = s.upload_session(UID, case.case_id)
        assert sessions.load() is None
        sessions.save("http://127.0.0.1:1/v0/b/x/o?name=a&upload_id=1")
    with LocalStore(root) as s:
        sessions = s.upload_session(UID, case.case_id)
        assert sessions.load() == "http://127.0.0.1:1/v0/b/x/o?name=a&upload_id=1"
        sessions.clear()
        assert s.get(UID, case.case_id).upload_url is None


def test_chat_and_read_marks(store):
    case = store.add_case(UID, lesion_jpeg(12))
    store.replace_messages(UID, case.case_id, {
        "-m2": {"senderUid": "d", "senderRole": "dermatologist", "text": "Any change?", "at": 20},
        "-m1": {"senderUid": UID, "senderRole": "patient", "text": "Hello", "at": 10},
    })
    assert [m["text"] for m in store.messages(UID, case.case_id)] == ["Hello", "Any change?"]
    assert store.messages(UID, case.case_id)[0]["id"] == "-m1"
    assert store.unread(UID, case.case_id) == 1
    assert store.mark_read(UID, case.case_id) == 20 and store.unread(UID, case.case_id) == 0
    assert store.mark_read(UID, case.case_id, at=5) == 20  # never moves back
    store.replace_all_messages(UID, {case.case_id: {
        "-m3": {"senderUid": "d", "senderRole": "dermatologist", "text": "Please call us", "at": 30}}})
    assert store.unread(UID, case.case_id) == 1 and len(store.messages(UID, case.case_id)) == 1


def test_sessions_are_kept_per_browser_key_and_remove_user_forgets_everything(tmp_path):
    root = tmp_path / "app"
    saved = {"version": 1, "uid": UID, "email": "p@example.com", "refresh_token": "r", "id_token": "", "expires_at": 0}
    other = {**saved, "uid": "other-patient", "refresh_token": "r2"}
    mine_key, second_key, their_key = "k" * 43, "m" * 43, "t" * 43
    with LocalStore(root) as s:
        s.save_session(mine_key, saved)
        s.save_session(second_key, saved)  # the same patient in a second browser
        s.save_session(their_key, other)
        mine = s.add_case(UID, lesion_jpeg(13))
        s.mark_read(UID, mine.case_id, at=3)
        s.queue_message(UID, mine.case_id, "-msg1", cases.message_record(UID, "patient", "Hi"))
        theirs = s.add_case("other-patient", lesion_jpeg(14))
    if os.name == "posix":
        assert (root / DB_FILE).stat().st_mode & 0o077 == 0  # it holds the refresh token
    with sqlite3.connect(root / DB_FILE) as db:  # the browser's key itself is never stored
        dump = "\n".join(db.iterdump())
    assert mine_key not in dump and their_key not in dump
    with LocalStore(root) as s:
        assert s.load_session(mine_key) == saved and s.load_session(their_key) == other
        assert s.load_session("x" * 43) is None and s.load_session("short") is None
        s.forget_session(second_key)
        assert s.load_session(second_key) is None and s.load_session(mine_key) == saved
        s.remove_user(UID)
        assert s.cases(UID) == [] and s.last_read(UID, mine.case_id) == 0 and s.load_session(mine_key) is None
        assert s.outbox(UID) == [] and s.load_session(their_key) == other
        assert not mine.image_path.exists() and s.get("other-patient", theirs.case_id).image_path.exists()
        with pytest.raises(StoreError):
            s.save_session(mine_key, {"no": "uid"})
        with pytest.raises(StoreError):
            s.save_session("short", saved)


def test_the_outbox_keeps_unsent_messages_until_the_server_has_them(store):
    case = store.add_case(UID, lesion_jpeg(15))
    first = cases.message_record(UID, "patient", "First")
    store.queue_message(UID, case.case_id, "-a1", first)
    store.queue_message(UID, case.case_id, "-a2", cases.message_record(UID, "patient", "Second"))
    store.queue_message(UID, case.case_id, "-a1", cases.message_record(UID, "patient", "Changed"))  # same id: kept once
    assert [(m["id"], m["record"]["text"], m["error"]) for m in store.outbox(UID)] == [
        ("-a1", "First", None), ("-a2", "Second", None)]
    store.message_refused(UID, case.case_id, "-a2", "Not sent")
    assert [m["id"] for m in store.outbox(UID, failed=False)] == ["-a1"]
    assert [m["error"] for m in store.outbox(UID, case.case_id, failed=True)] == ["Not sent"]
    # the server's copy arrives (an answer lost on the way): the message leaves the outbox
    store.replace_messages(UID, case.case_id, {"-a1": {**first, "at": 10}})
    assert [m["id"] for m in store.outbox(UID)] == ["-a2"]
    store.message_sent(UID, case.case_id, "-a2")
    assert store.outbox(UID) == []
    with pytest.raises(StoreError):
        store.queue_message(UID, case.case_id, "bad/id", first)
    with pytest.raises(StoreError):
        store.queue_message(UID, case.case_id, "-a3", {"no": "text"})
    assert store.outbox(UID) == []


def test_the_ui_and_the_sync_thread_can_use_it_at_once(store):
    errors: list[BaseException] = []

    def add(seed: int) -> None:
        try:
            for i in range(5):
                case = store.add_case(UID, lesion_jpeg(seed * 10 + i))
                store.set_status(UID, case.case_id, Status.UPLOADING)
                store.upload_session(UID, case.case_id).save(f"http://x/?upload_id={seed}-{i}")
                store.cases(UID)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(store.cases(UID)) == 30 and len(files_under(store.root)) == 30
    assert {c.status for c in store.cases(UID)} == {Status.UPLOADING}
