""""Delete my data" (issue 17) end to end on a real localbase and a real ``dermaloop worker`` process:
the patient asks through the rules (``client.erasure``), the worker's ``cloud_worker/erasure.py``
removes everything of that uid from the RTDB, Storage and Auth, leaves tombstones and says done, and
the app forgets the patient on the device. Another patient's data is untouched, a job in flight does
not bring a case back, and a re-run after a partial erasure or a crash finishes the job.

The in-process tests (claims between workers, the worker's resurrection guard) use a database
namespace of their own where no worker listens. Nothing is mocked; waits poll with generous deadlines.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from typing import Any

import pytest
from firebase_admin import auth as admin_auth
from firebase_admin import db

from client.erasure import (
    ACCOUNT_DELETED,
    DONE,
    HELD_BACK,
    NOT_REQUESTED,
    OFFLINE,
    REQUESTED,
    RUNNING,
    STATUS_TEXT,
    ErasureStatus,
    erasure_state,
    request_erasure,
    wait_until_done,
)
from client.store import LocalStore
from cloud_worker.erasure import Eraser, ErasureConfig, ErasureLost, claimable_request
from cloud_worker.jobs import CaseGone, JobQueue, now_ms
from dermaloop import cases
from dermaloop.admin_app import delete_app, get_app
from dermaloop.auth import AuthClient, UserSession
from dermaloop.database import UserDatabase, new_push_id
from dermaloop.storage import UserStorage, admin_bucket
from tests.worker_support import WorkerProcess, lesion_jpeg, seed_case, tiny_model_dir, wait_until

FAST = ["--sweep-s", "0.5", "--heartbeat-s", "0.5", "--backoff-s", "0.2", "--lease-s", "3", "--no-analysis"]
HOLD_S = 1.5  # the worker holds every job this long after its download: jobs are in flight for a while
DEADLINE = 240.0  # only stops a hung test; never a speed check


# ---- a backend, a worker, patients ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def settings(localbase):
    # A namespace of its own: this module's worker sees only this module's requests and jobs.
    return localbase.settings(database_url="https://erasure-tests-default-rtdb.firebaseio.com")


@pytest.fixture(scope="module")
def app(settings):
    name = f"erasure-{uuid.uuid4().hex[:6]}"
    yield get_app(settings, name=name)
    delete_app(name)


@pytest.fixture(scope="module")
def bucket(settings):
    return admin_bucket(settings)


@pytest.fixture(scope="module")
def worker(settings, tmp_path_factory):
    model_dir = tiny_model_dir(tmp_path_factory.mktemp("model") / "tiny-1")
    w = WorkerProcess(settings, model_dir, "w-erasure", FAST,
                      env_extra={"DERMALOOP_WORKER_FAULT_HOLD_S": str(HOLD_S)}).start()
    yield w
    w.kill9()


def ref(app, path: str = "/"):
    return db.reference(path, app=app)


def sign_up(settings, name: str) -> UserSession:
    """A real Auth account, signed in as the app would (a fresh sign-up has no role claim)."""
    return AuthClient(settings).sign_up(f"{name}-{uuid.uuid4().hex[:8]}@example.com", "secret123")


def diagnosed_case(app, bucket, uid: str, seed: int) -> str:
    """A case uploaded and diagnosed by the worker: photo, heatmap, queue entry, job done."""
    case_id = new_push_id()
    seed_case(app, bucket, uid, case_id, lesion_jpeg(seed))
    wait_until(lambda: (ref(app, cases.job_path(case_id)).get() or {}).get("state") == "done",
               f"case {case_id} to be diagnosed", timeout=DEADLINE)
    assert ref(app, f"{cases.case_path(uid, case_id)}/status").get() == "diagnosed"
    assert bucket.blob(cases.heatmap_object(uid, case_id)).exists()
    return case_id


def with_chat_and_review(app, session: UserSession, settings, uid: str, case_id: str, derm: str) -> None:
    """The patient's message (through the rules), a dermatologist's answer, claim, audit and read mark."""
    UserDatabase(session, settings).set(f"{cases.messages_path(uid, case_id)}/{new_push_id()}",
                                        cases.message_record(uid, "patient", "It itches."))
    now = now_ms()
    ref(app).update({
        f"{cases.messages_path(uid, case_id)}/{new_push_id()}":
            {**cases.message_record(derm, "dermatologist", "Please send another photo."), "at": now},
        cases.claim_path(case_id): cases.claim_record(derm, uid, at=now),
        f"{cases.review_history_path(case_id)}/{new_push_id()}": cases.review_history_record(
            derm, uid, {"reviewerUid": derm, "label": "nv", "recommendation": "", "urgency": "routine", "at": now},
            at=now),
        cases.reads_path(derm, case_id): now,
    })


def patient_paths(uid: str, case_ids: list[str], derm: str) -> list[str]:
    paths = [cases.patient_cases_path(uid), f"messages/{uid}", cases.user_path(uid)]
    for case_id in case_ids:
        paths += [cases.job_path(case_id), cases.queue_path(case_id), cases.claim_path(case_id),
                  cases.review_history_path(case_id), cases.reads_path(derm, case_id), cases.erased_path(case_id)]
    return paths


def snapshot(app, bucket, uid: str, case_ids: list[str], derm: str) -> dict[str, Any]:
    """Everything of one patient in the RTDB and Storage (to compare before and after)."""
    rtdb = {path: ref(app, path).get() for path in patient_paths(uid, case_ids, derm)}
    blobs = sorted((b.name, b.md5_hash) for b in bucket.list_blobs(prefix=cases.patient_folder(uid)))
    return {"rtdb": rtdb, "storage": blobs}


def done_record(app, uid: str) -> dict[str, Any]:
    return wait_until(lambda: (lambda r: r if isinstance(r, dict) and r.get("state") == "done" else None)(
        ref(app, cases.erasure_path(uid)).get()), f"the erasure of {uid} to be done", timeout=DEADLINE)


def account_exists(app, uid: str) -> bool:
    try:
        admin_auth.get_user(uid, app=app)
    except admin_auth.UserNotFoundError:
        return False
    return True


def mentions(value: Any, word: str) -> bool:
    """Whether ``word`` appears in the JSON of ``value`` as a whole key, value or path segment."""
    return re.search(re.escape(word) + r"(?![A-Za-z0-9_-])", json.dumps(value)) is not None


def assert_gone(app, bucket, uid: str, case_ids: list[str]) -> dict[str, Any]:
    """Nothing of ``uid`` is left but its done request; returns that request."""
    record = done_record(app, uid)
    everything = ref(app).get() or {}
    rest = {k: v for k, v in everything.items() if k not in ("erasures", "erased")}
    assert not mentions(rest, uid), f"{uid} is still in the database"
    for case_id in case_ids:
        assert not mentions(rest, case_id), f"case {case_id} is still in the database"
        assert ref(app, cases.erased_path(case_id)).get().keys() == {"at"}  # the tombstone, nothing else
    assert list(bucket.list_blobs(prefix=cases.patient_folder(uid))) == []
    assert not account_exists(app, uid)
    assert set(record) == {"requestedAt", "state", "doneAt", "counts", "attempts", "startedAt"}
    assert set(record["counts"]) == set(cases.ERASURE_COUNTS)
    return record


# ---- end to end ----------------------------------------------------------------------------------------


def test_delete_my_data_removes_everything_of_the_patient_and_nothing_of_anyone_else(
        settings, app, bucket, worker, tmp_path):
    derm = f"derm-{uuid.uuid4().hex[:8]}"
    alice, carol = sign_up(settings, "alice"), sign_up(settings, "carol")
    a, c = alice.uid, carol.uid
    for session, name in ((alice, "Alice"), (carol, "Carol")):
        ref(app, cases.user_path(session.uid)).set({"role": "patient", "createdAt": now_ms()})
        UserDatabase(session, settings).set(f"{cases.user_path(session.uid)}/displayName", name)
    a_cases = [diagnosed_case(app, bucket, a, 1), diagnosed_case(app, bucket, a, 2)]
    c_case = diagnosed_case(app, bucket, c, 3)
    with_chat_and_review(app, alice, settings, a, a_cases[0], derm)
    with_chat_and_review(app, carol, settings, c, c_case, derm)
    # Alice's own folder may hold a photo under Carol's case id (the rules let her name any case id
    # in her folder): it goes with Alice's data, but Carol's job, queue entry and audit stay.
    UserStorage(alice, settings).upload(cases.image_object(a, c_case), lesion_jpeg(9), "image/jpeg")
    # A neighbour whose uid starts with Alice's: a Storage prefix without its slash would take it.
    neighbour = f"{a}0"
    bucket.blob(cases.image_object(neighbour, "n1")).upload_from_string(lesion_jpeg(4), content_type="image/jpeg")
    ref(app, cases.case_path(neighbour, "n1")).set({"caseId": "n1", "patientUid": neighbour, "status": "failed"})
    before = snapshot(app, bucket, c, [c_case], derm)
    before_neighbour = snapshot(app, bucket, neighbour, ["n1"], derm)
    assert before["rtdb"][cases.queue_path(c_case)] and before["rtdb"][cases.claim_path(c_case)]

    # On the phone: a case already sent (the server's copy) and one still waiting to be sent.
    store = LocalStore(tmp_path / "device")
    sent = store.add_case(a, lesion_jpeg(5), case_id=a_cases[0])
    store.mark_queued(a, sent.case_id)
    store.apply_remote(a, sent.case_id, ref(app, cases.case_path(a, sent.case_id)).get())
    waiting = store.add_case(a, lesion_jpeg(6))
    store.add_case(c, lesion_jpeg(7))  # another patient on the same phone

    assert erasure_state(alice, settings).state == NOT_REQUESTED
    asked = request_erasure(alice, settings, store)
    assert asked.state in (REQUESTED, RUNNING, ACCOUNT_DELETED) and asked.text
    assert store.get(a, waiting.case_id).status == "failed"  # held back: nothing more leaves the phone
    assert store.get(a, waiting.case_id).last_error == HELD_BACK
    assert request_erasure(alice, settings, store).state in (REQUESTED, RUNNING, DONE, ACCOUNT_DELETED)  # repeat

    seen: list[ErasureStatus] = []
    final = wait_until_done(alice, settings, store, poll_s=0.2, on_status=seen.append)
    assert final.finished and final.state in (DONE, ACCOUNT_DELETED)
    assert "deleted" in final.text and "training set" in final.text
    assert seen and seen[-1] == final
    assert store.cases(a) == [] and store.messages(a, a_cases[0]) == []
    assert len(store.cases(c)) == 1  # the other patient on this phone keeps theirs
    # Once the account is gone the token is refused: after a request that means "account deleted",
    # and so does Auth's answer that the user no longer exists, as to a repeated request.
    assert erasure_state(alice, settings, requested=True).state in (DONE, ACCOUNT_DELETED)
    assert erasure_state(alice, settings).state in (DONE, ACCOUNT_DELETED)
    assert request_erasure(alice, settings, store).state in (DONE, ACCOUNT_DELETED)

    record = assert_gone(app, bucket, a, a_cases)
    counts = record["counts"]
    assert counts["cases"] == 2 and counts["jobs"] == 2 and counts["queue"] == 2 and counts["tombstones"] == 2
    assert counts["images"] == 3 and counts["heatmaps"] == 2 and counts["files"] == 0
    assert counts["messages"] == 2 and counts["claims"] == 1 and counts["reviewHistory"] == 1
    assert counts["reads"] == 1 and counts["user"] == 1 and counts["account"] == 1
    assert record["attempts"] == 1 and record["doneAt"] >= record["requestedAt"]

    # Carol, her case (whose id was in Alice's folder) and the uid-prefix neighbour are untouched.
    assert snapshot(app, bucket, c, [c_case], derm) == before
    assert ref(app, cases.erased_path(c_case)).get() is None
    assert snapshot(app, bucket, neighbour, ["n1"], derm) == before_neighbour
    assert account_exists(app, c)
    assert erasure_state(carol, settings).state == NOT_REQUESTED


def test_a_job_in_flight_does_not_bring_an_erased_case_back(settings, app, bucket, worker):
    bob = sign_up(settings, "bob")
    b = bob.uid
    first = diagnosed_case(app, bucket, b, 11)
    in_flight = new_push_id()
    seed_case(app, bucket, b, in_flight, lesion_jpeg(12))
    # The worker has claimed it and holds it mid-way (after the download) for HOLD_S seconds.
    wait_until(lambda: (ref(app, cases.job_path(in_flight)).get() or {}).get("state") == "running",
               "the job to be claimed", timeout=DEADLINE, interval=0.02)
    request_erasure(bob, settings, None)
    assert_gone(app, bucket, b, [first, in_flight])
    # Longer than the hold and a lease: whatever the worker still had in hand has landed or gone.
    time.sleep(HOLD_S + 3 * 2)
    assert_gone(app, bucket, b, [first, in_flight])
    assert worker.proc.poll() is None


def test_a_request_after_part_of_the_data_was_deleted_by_hand_finishes_the_job(settings, app, bucket, worker):
    erin = sign_up(settings, "erin")
    e = erin.uid
    case_id = diagnosed_case(app, bucket, e, 21)
    UserDatabase(erin, settings).set(f"{cases.messages_path(e, case_id)}/{new_push_id()}",
                                     cases.message_record(e, "patient", "Hello"))
    # By hand: the case record, the chat and the photo. Left: the job, the queue entry, the heatmap,
    # the account. Only their uid fields and the Storage folder still lead to the case.
    ref(app).update({cases.patient_cases_path(e): None, f"messages/{e}": None})
    bucket.blob(cases.image_object(e, case_id)).delete()
    assert ref(app, cases.queue_path(case_id)).get()["uid"] == e

    request_erasure(erin, settings, None)
    record = assert_gone(app, bucket, e, [case_id])
    assert record["counts"]["cases"] == 0 and record["counts"]["jobs"] == 1 and record["counts"]["queue"] == 1
    assert record["counts"]["heatmaps"] == 1 and record["counts"]["images"] == 0


def test_an_erasure_a_crashed_worker_left_running_is_finished_by_the_next_one(settings, app, bucket, worker):
    dave = sign_up(settings, "dave")
    d = dave.uid
    case_id = diagnosed_case(app, bucket, d, 31)
    # What a worker that died mid-way leaves: the case record gone (its chat too), the rest still there,
    # and the request running under a lease that has expired.
    now = now_ms()
    ref(app).update({
        cases.patient_cases_path(d): None,
        cases.erasure_path(d): {"requestedAt": now - 5000, "state": "running", "attempts": 1, "startedAt": now - 4000,
                                "lease": {"worker": "crashed", "token": "gone", "expiresAt": now - 1000},
                                "caseIds": {case_id: True}, "counts": {**dict.fromkeys(cases.ERASURE_COUNTS, 0),
                                                                      "cases": 1, "tombstones": 1}},
        cases.erased_path(case_id): cases.tombstone_record(now - 3000),
    })
    record = assert_gone(app, bucket, d, [case_id])
    assert record["attempts"] == 2
    counts = record["counts"]
    assert counts["cases"] == 1  # counted by the first attempt, not twice
    assert counts["jobs"] == 1 and counts["queue"] == 1 and counts["images"] == 1 and counts["heatmaps"] == 1
    assert counts["account"] == 1 and counts["tombstones"] == 1
    assert ref(app, cases.erased_path(case_id)).get() == {"at": now - 3000}  # the first tombstone stays


# ---- in process: claims between workers, the resurrection guard ------------------------------------------


@pytest.fixture(scope="module")
def quiet(localbase):
    """A namespace where no worker listens (the same Storage and Auth: uids are unique)."""
    s = localbase.settings(database_url="https://erasure-quiet-default-rtdb.firebaseio.com")
    name = f"erasure-quiet-{uuid.uuid4().hex[:6]}"
    yield get_app(s, name=name), admin_bucket(s)
    delete_app(name)


def _request(app, uid: str) -> None:
    ref(app, cases.erasure_path(uid)).set(cases.erasure_request(now_ms()))


def test_only_one_of_several_workers_claims_a_request_and_a_stale_one_is_fenced_out(quiet):
    app, bucket = quiet
    uid = f"u-{uuid.uuid4().hex[:8]}"
    _request(app, uid)
    erasers = [Eraser(app, bucket, f"w{i}", ErasureConfig(lease_ms=400)) for i in range(5)]
    won, barrier = [], threading.Barrier(len(erasers))

    def go(eraser: Eraser) -> None:
        barrier.wait()
        won.append(eraser.claim(uid))

    threads = [threading.Thread(target=go, args=(e,)) for e in erasers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    claims = [c for c in won if c is not None]
    assert len(claims) == 1 and claims[0].attempt == 1
    record = ref(app, cases.erasure_path(uid)).get()
    assert record["state"] == "running" and record["lease"]["token"] == claims[0].token
    assert not claimable_request(record, now_ms())
    time.sleep(0.5)  # the lease lapses (a stalled or dead worker)
    again = erasers[1].claim(uid)
    assert again is not None and again.attempt == 2
    with pytest.raises(ErasureLost):  # the first holder, back from its stall, can record nothing
        erasers[0]._fence(claims[0], counts={"cases": 9})
    assert "counts" not in ref(app, cases.erasure_path(uid)).get()


def test_erase_in_process_is_idempotent_and_leaves_other_patients_alone(quiet):
    app, bucket = quiet
    uid, other = f"p-{uuid.uuid4().hex[:8]}", f"q-{uuid.uuid4().hex[:8]}"
    mine, theirs = new_push_id(), new_push_id()
    seed_case(app, bucket, uid, mine, lesion_jpeg(41))
    seed_case(app, bucket, other, theirs, lesion_jpeg(42))
    # A job that names no one (left half-written by an outcome that raced an erasure) under my id.
    ref(app, f"{cases.job_path(mine)}").update({"state": "queued", "uid": None})
    eraser = Eraser(app, bucket, "w-in-process", ErasureConfig(job_wait_s=5))
    assert eraser.erase(uid) is None  # nothing requested
    _request(app, uid)
    assert uid in eraser.due()
    counts = eraser.erase(uid)
    assert counts is not None and counts["cases"] == 1 and counts["jobs"] == 1 and counts["images"] == 1
    assert counts["account"] == 0  # no Auth account: fine
    assert eraser.erase(uid) is None and uid not in eraser.due()  # done stays done
    assert ref(app, cases.patient_cases_path(uid)).get() is None
    assert ref(app, cases.job_path(mine)).get() is None
    assert list(bucket.list_blobs(prefix=cases.patient_folder(uid))) == []
    assert ref(app, cases.case_path(other, theirs)).get()["patientUid"] == other
    assert ref(app, cases.job_path(theirs)).get()["uid"] == other
    assert bucket.blob(cases.image_object(other, theirs)).exists()


def test_a_live_job_is_waited_for_then_removed(quiet):
    """The erasure does not delete a job a worker holds a live lease on until it settles."""
    app, bucket = quiet
    uid, case_id = f"r-{uuid.uuid4().hex[:8]}", new_push_id()
    seed_case(app, bucket, uid, case_id, lesion_jpeg(43))
    jobs = JobQueue(app, "busy", lease_ms=30_000)
    claim = jobs.claim(case_id)
    _request(app, uid)
    eraser = Eraser(app, bucket, "w-wait", ErasureConfig(job_wait_s=60, poll_s=0.05))
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(eraser.erase(uid)))
    thread.start()
    time.sleep(0.5)
    assert thread.is_alive() and ref(app, cases.case_path(uid, case_id)).get() is not None  # waiting
    jobs.fail(claim, "model_error", "the worker settles the job")
    thread.join(DEADLINE)
    assert result and result[0]["jobs"] == 1 and result[0]["cases"] == 1
    assert ref(app, cases.job_path(case_id)).get() is None
    assert ref(app, cases.patient_cases_path(uid)).get() is None


def test_the_workers_outcomes_never_recreate_an_erased_case(quiet):
    app, bucket = quiet
    jobs = JobQueue(app, "guarded")
    entry = cases.queue_entry("x", "diagnosed", "low", 1.0, 1, 1)
    cloud = {"modelVersion": "m", "risk": "low"}

    def claimed() -> tuple[str, str, Any]:
        uid, case_id = f"g-{uuid.uuid4().hex[:8]}", new_push_id()
        seed_case(app, bucket, uid, case_id, b"x", upload=False)
        return uid, case_id, jobs.claim(case_id)

    outcomes = {
        "complete": lambda c: jobs.complete(c, cloud, entry),
        "fail": lambda c: jobs.fail(c, "model_error", "x"),
        "retry_later": lambda c: jobs.retry_later(c, 100, "model_error: x"),
        "release": lambda c: jobs.release(c),
        "set_processing": lambda c: jobs.set_processing(c),
    }
    for name, outcome in outcomes.items():
        # The case erased while the job is still there (the erasure's jobs step raced the fence) ...
        uid, case_id, claim = claimed()
        ref(app, cases.patient_cases_path(uid)).delete()
        with pytest.raises(CaseGone):
            outcome(claim)
        assert ref(app, cases.patient_cases_path(uid)).get() is None, name
        assert ref(app, cases.queue_path(case_id)).get() is None, name
        # ... and the job erased first, as the erasure does: nothing is written anywhere.
        uid, case_id, claim = claimed()
        ref(app).update({cases.job_path(case_id): None, cases.patient_cases_path(uid): None})
        with pytest.raises(CaseGone):
            outcome(claim)
        assert ref(app, cases.patient_cases_path(uid)).get() is None, name
        assert ref(app, cases.job_path(case_id)).get() is None, name
        assert ref(app, cases.queue_path(case_id)).get() is None, name
    # A case that is there is still diagnosed as before.
    uid, case_id, claim = claimed()
    jobs.complete(claim, cloud, entry)
    assert ref(app, f"{cases.case_path(uid, case_id)}/status").get() == "diagnosed"


# ---- the words the UI shows ------------------------------------------------------------------------------


def test_every_status_has_plain_words():
    for state in (NOT_REQUESTED, REQUESTED, RUNNING, DONE, ACCOUNT_DELETED, OFFLINE):
        status = ErasureStatus(state)
        assert status.text == STATUS_TEXT[state] or status.text.startswith(STATUS_TEXT[state])
        assert status.finished == (state in (DONE, ACCOUNT_DELETED))
    assert ErasureStatus.from_record(None).state == NOT_REQUESTED
    assert ErasureStatus.from_record({"requestedAt": 5}).state == REQUESTED
    done = ErasureStatus.from_record({"requestedAt": 5, "state": "done", "doneAt": 9, "counts": {"cases": 2}})
    assert done.state == DONE and done.done_at == 9 and done.counts == {"cases": 2}


def test_the_case_domain_builds_the_erasure_records_and_its_one_write():
    assert cases.erasure_path("u1") == "erasures/u1" and cases.erased_path("c1") == "erased/c1"
    assert cases.patient_folder("u1") == "cases/u1/"
    assert cases.erasure_request() == {"requestedAt": cases.SERVER_TIMESTAMP}
    assert cases.erasure_state({"requestedAt": 1}) == cases.ErasureState.REQUESTED
    assert cases.erasure_state({"requestedAt": 1, "state": "done"}) == cases.ErasureState.DONE
    assert cases.erasure_state({"state": "done"}) is None and cases.erasure_state(None) is None
    writes = cases.erasure_writes("u1", tombstones=["c1"], jobs=["c1"], queue=["c1"], claims=["c1"],
                                  history=["c1"], reads=[("d1", "c1")], now=7)
    assert writes == {"cases/u1": None, "messages/u1": None, "users/u1": None, "jobs/c1": None, "queue/c1": None,
                      "claims/c1": None, "reviewHistory/c1": None, "reads/d1/c1": None, "erased/c1": {"at": 7}}
    with pytest.raises(cases.CaseError):
        cases.erasure_path("a/b")
