"""The project's database.rules.json, enforced by a real localbase, as patients and dermatologists
see it through the documented REST API (dermaloop.database.UserDatabase, i.e. ``?auth=``)."""

from __future__ import annotations

import hashlib
import time
import uuid

import pytest
import requests

from dermaloop import cases
from dermaloop.admin_app import delete_app
from dermaloop.database import (
    SERVER_TIMESTAMP,
    DatabaseError,
    PermissionDenied,
    UserDatabase,
    admin_reference,
    new_push_id,
)
from localbase.tokens import mint_id_token

APP_NAME = "test_database_rules"


@pytest.fixture(scope="module")
def settings(localbase):
    # A namespace of its own: the cases and jobs made here must not reach other tests' workers.
    yield localbase.settings(database_url="https://rules-tests-default-rtdb.firebaseio.com")
    delete_app(APP_NAME)


def admin(settings, path: str):
    return admin_reference(path, settings, app_name=APP_NAME)


def user(settings, uid: str, role: str | None = None) -> UserDatabase:
    claims = {"role": role} if role else {}
    return UserDatabase(mint_id_token(settings.project_id, uid, claims), settings)


@pytest.fixture
def alice(settings):
    return user(settings, "alice-" + uuid.uuid4().hex[:8], "patient")


@pytest.fixture
def bob(settings):
    return user(settings, "bob-" + uuid.uuid4().hex[:8], "patient")


@pytest.fixture
def derm(settings):
    return user(settings, "derm-" + uuid.uuid4().hex[:8], "dermatologist")


def uid_of(db: UserDatabase) -> str:
    from localbase.tokens import decode_unverified

    return decode_unverified(db.token())["sub"]


def new_case(uid: str, case_id: str) -> dict:
    return {
        "caseId": case_id,
        "patientUid": uid,
        "createdAt": SERVER_TIMESTAMP,
        "status": "queued",
        "consent": {"research": True, "at": SERVER_TIMESTAMP},
        "image": {"path": f"cases/{uid}/{case_id}/image.jpg", "sha256": hashlib.sha256(b"img").hexdigest(),
                  "contentType": "image/jpeg", "bytes": 1234, "width": 640, "height": 480},
        "note": {"site": "back", "text": "itchy"},
        "device": {"modelVersion": "device-1", "at": SERVER_TIMESTAMP, "risk": "low",
                   "top": [{"label": "nv", "name": "naevus", "p": 0.8}, {"label": "mel", "name": "melanoma", "p": 0.1},
                           {"label": "bkl", "name": "keratosis", "p": 0.05}],
                   "quality": {"ok": True, "issues": []}, "box": [0.1, 0.1, 0.9, 0.9]},
    }


def create_case(db: UserDatabase) -> str:
    """The app's one multi-path write: the case and its job together."""
    uid, case_id = uid_of(db), new_push_id()
    db.update("/", {f"cases/{uid}/{case_id}": new_case(uid, case_id),
                    f"jobs/{case_id}": {"uid": uid, "caseId": case_id, "createdAt": SERVER_TIMESTAMP}})
    return case_id


def denied(fn, *args, **kwargs) -> bool:
    try:
        fn(*args, **kwargs)
    except PermissionDenied as exc:
        assert exc.status == 401 and exc.message == "Permission denied"
        return True
    return False


def test_patient_creates_and_reads_own_case_only(settings, alice, bob):
    a = uid_of(alice)
    case_id = create_case(alice)
    case = alice.get(f"cases/{a}/{case_id}")
    assert case["status"] == "queued" and case["patientUid"] == a
    assert isinstance(case["createdAt"], int)
    assert case["device"]["top"][0]["label"] == "nv"  # arrays come back as lists
    assert case_id in alice.get(f"cases/{a}")
    assert admin(settings, f"jobs/{case_id}").get()["uid"] == a
    # Bob sees and touches nothing of Alice's.
    assert denied(bob.get, f"cases/{a}")
    assert denied(bob.get, f"cases/{a}/{case_id}")
    assert denied(bob.get, "cases")
    assert denied(bob.set, f"cases/{a}/{case_id}/status", "queued")
    assert denied(bob.update, "/", {f"cases/{a}/{new_push_id()}": new_case(a, "x")})
    # Patients cannot list all cases, the queue, or the jobs.
    assert denied(alice.get, "cases")
    assert denied(alice.get, "queue")
    assert denied(alice.get, f"jobs/{case_id}")


def test_patient_write_shapes_are_validated(alice):
    a = uid_of(alice)

    def attempt(mutate) -> bool:
        cid = new_push_id()
        case = new_case(a, cid)
        mutate(case, cid)
        return denied(alice.set, f"cases/{a}/{cid}", case)

    assert attempt(lambda c, cid: c.pop("image"))                             # required field missing
    assert attempt(lambda c, cid: c.update(patientUid="someone-else"))
    assert attempt(lambda c, cid: c.update(caseId="other-id"))
    assert attempt(lambda c, cid: c.update(status="diagnosed"))                # must start queued
    assert attempt(lambda c, cid: c["image"].update(sha256="not-a-hash"))
    assert attempt(lambda c, cid: c["image"].update(path="cases/x/y/image.jpg"))
    assert attempt(lambda c, cid: c["image"].update(contentType="text/html"))
    assert attempt(lambda c, cid: c.update(cloud={"risk": "low"}))             # admin only
    assert attempt(lambda c, cid: c.update(review={"label": "nv"}))
    assert attempt(lambda c, cid: c.update(unexpected=1))
    assert attempt(lambda c, cid: c["device"].update(risk="none"))
    assert attempt(lambda c, cid: c["device"]["top"].__setitem__(0, {"label": "nv", "p": 3}))
    assert attempt(lambda c, cid: c.update(createdAt=int(time.time() * 1000) + 3_600_000))  # in the future
    # The valid shape itself is accepted (the matrix above is not denying everything).
    cid = new_push_id()
    alice.set(f"cases/{a}/{cid}", new_case(a, cid))


def test_the_device_records_abstain_verdict_is_typed(alice):
    """The card's abstain rule (issue 20): a patient's device record may say unsure and list the
    prediction set (class ids, at most 7), as ``cases.device_record`` writes it; nothing else."""
    a = uid_of(alice)

    def write(**fields) -> str:
        cid = new_push_id()
        case = new_case(a, cid)
        case["device"].update(fields)
        alice.set(f"cases/{a}/{cid}", case)
        return cid

    cid = write(**{k: v for k, v in cases.device_record(
        {"top": [{"label": "mel", "name": "melanoma", "p": 0.5}], "unsure": True,
         "prediction_set": ["mel", "nv", "bkl"]}, "device-1", at=1).items() if k in ("unsure", "predictionSet")})
    stored = alice.get(f"cases/{a}/{cid}/device")
    assert stored["unsure"] is True and stored["predictionSet"] == ["mel", "nv", "bkl"]
    write(unsure=False, predictionSet=["nv"])
    write(predictionSet=[f"c{i}" for i in range(cases.MAX_PREDICTION_SET)])  # the whole taxonomy
    for bad in ({"unsure": "yes"}, {"unsure": 1}, {"predictionSet": "mel"}, {"predictionSet": [3, "nv"]},
                {"predictionSet": [""]}, {"predictionSet": ["x" * 65]},
                {"predictionSet": [f"c{i}" for i in range(cases.MAX_PREDICTION_SET + 1)]},
                {"predictionSet": {"a": "mel"}}):
        assert denied(write, **bad), bad


def test_jobs_are_created_by_their_patient_only(settings, alice, bob):
    a, b = uid_of(alice), uid_of(bob)
    case_id = create_case(alice)
    # A job for someone else, or for a case that does not exist, is refused.
    assert denied(bob.set, f"jobs/{new_push_id()}", {"uid": a, "caseId": "x", "createdAt": SERVER_TIMESTAMP})
    ghost = new_push_id()
    assert denied(bob.set, f"jobs/{ghost}", {"uid": b, "caseId": ghost, "createdAt": SERVER_TIMESTAMP})
    # Once the worker holds a lease, the patient can no longer rewrite the job or the case.
    admin(settings, f"jobs/{case_id}").update({"state": "running", "lease": {"worker": "w1", "expiresAt": 1}})
    assert denied(alice.set, f"jobs/{case_id}", {"uid": a, "caseId": case_id, "createdAt": SERVER_TIMESTAMP})
    assert denied(alice.set, f"jobs/{case_id}/state", "queued")
    admin(settings, f"cases/{a}/{case_id}").update({"status": "diagnosed", "cloud": {"risk": "high"}})
    assert denied(alice.set, f"cases/{a}/{case_id}", new_case(a, case_id))
    assert denied(alice.delete, f"cases/{a}/{case_id}")
    assert alice.get(f"cases/{a}/{case_id}/cloud") == {"risk": "high"}


def test_patient_retry_of_the_same_creation_is_allowed(alice):
    a = uid_of(alice)
    case_id = new_push_id()
    body = {f"cases/{a}/{case_id}": new_case(a, case_id),
            f"jobs/{case_id}": {"uid": a, "caseId": case_id, "createdAt": SERVER_TIMESTAMP}}
    alice.update("/", body)
    alice.update("/", body)  # the answer to the first was lost: sending again must not fail
    assert alice.get(f"cases/{a}/{case_id}/status") == "queued"


def test_dermatologist_reads_everything_and_reviews(settings, alice, derm):
    a, d = uid_of(alice), uid_of(derm)
    case_id = create_case(alice)
    admin(settings, f"queue/{case_id}").set({"uid": a, "status": "diagnosed", "risk": "high", "score": 0.97,
                                              "createdAt": 1, "updatedAt": 2})
    assert case_id in derm.get(f"cases/{a}")
    assert a in derm.get("cases", shallow=True)
    top = derm.get("queue", order_by="score", limit_to_last=1)
    assert len(top) == 1 and next(iter(top.values()))["score"] >= 0.97
    review = {"reviewerUid": d, "label": "mel", "recommendation": "excise", "urgency": "urgent", "at": SERVER_TIMESTAMP}
    derm.update(f"cases/{a}/{case_id}", {"review": review, "status": "reviewed"})
    case = alice.get(f"cases/{a}/{case_id}")
    assert case["status"] == "reviewed" and case["review"]["label"] == "mel"
    # ...but only as themself, only reviews, and never admin-owned data.
    assert denied(derm.set, f"cases/{a}/{case_id}/review", {**review, "reviewerUid": "someone"})
    assert denied(derm.set, f"cases/{a}/{case_id}/review", {**review, "urgency": "whenever"})
    assert denied(derm.set, f"cases/{a}/{case_id}/status", "diagnosed")
    assert denied(derm.set, f"cases/{a}/{case_id}/cloud", {"risk": "low"})
    assert denied(derm.set, f"queue/{case_id}/score", 0)
    assert denied(derm.set, f"jobs/{case_id}/state", "done")
    assert denied(derm.set, "models/cloud/current", "v9")
    assert denied(derm.set, f"cases/{a}/{new_push_id()}/review", review)  # no such case
    # The patient cannot review their own case.
    assert denied(alice.set, f"cases/{a}/{case_id}/review", {**review, "reviewerUid": a})


def test_messages(alice, bob, derm):
    a, d = uid_of(alice), uid_of(derm)
    case_id = create_case(alice)
    thread = f"messages/{a}/{case_id}"
    alice.push(thread, {"senderUid": a, "senderRole": "patient", "text": "hello", "at": SERVER_TIMESTAMP})
    derm.push(thread, {"senderUid": d, "senderRole": "dermatologist", "text": "hi", "at": SERVER_TIMESTAMP})
    texts = [m["text"] for m in alice.get(thread, order_by="at").values()]
    assert texts == ["hello", "hi"]
    assert [m["text"] for m in derm.get(thread, order_by="at").values()] == ["hello", "hi"]
    assert denied(bob.get, thread)
    assert denied(bob.push, thread, {"senderUid": uid_of(bob), "senderRole": "patient", "text": "x", "at": SERVER_TIMESTAMP})
    assert denied(alice.push, thread, {"senderUid": a, "senderRole": "dermatologist", "text": "x", "at": SERVER_TIMESTAMP})
    assert denied(alice.push, thread, {"senderUid": d, "senderRole": "patient", "text": "x", "at": SERVER_TIMESTAMP})
    assert denied(alice.push, thread, {"senderUid": a, "senderRole": "patient", "text": "", "at": SERVER_TIMESTAMP})
    assert denied(alice.push, thread, {"senderUid": a, "senderRole": "patient", "text": "x" * 4001, "at": SERVER_TIMESTAMP})
    assert denied(alice.push, f"messages/{a}/{new_push_id()}", {"senderUid": a, "senderRole": "patient", "text": "x",
                                                                "at": SERVER_TIMESTAMP})  # no such case
    first = next(iter(alice.get(thread)))
    assert denied(alice.set, f"{thread}/{first}/text", "edited")  # messages are immutable


def test_users_models_and_anonymous(settings, alice):
    a = uid_of(alice)
    admin(settings, f"users/{a}").set({"displayName": "Alice", "role": "patient", "createdAt": 1})
    alice.set(f"users/{a}/displayName", "Alice A")
    assert alice.get(f"users/{a}") == {"displayName": "Alice A", "role": "patient", "createdAt": 1}
    assert denied(alice.set, f"users/{a}/role", "dermatologist")
    assert denied(alice.update, f"users/{a}", {"role": None})
    assert denied(alice.set, f"users/{a}", {"displayName": "A"})  # would drop the role mirror
    admin(settings, "models/device/current").set("device-1")
    assert alice.get("models/device/current") == "device-1"
    assert denied(alice.set, "models/device/current", "evil")
    assert denied(alice.get, "workers")
    url = f"http://{settings.database_emulator_host}/models.json"
    anonymous = requests.get(url, params={"ns": settings.database_namespace})
    assert anonymous.status_code == 401 and anonymous.json() == {"error": "Permission denied"}


def test_user_client_conditional_writes(settings, alice):
    a = uid_of(alice)
    name_path = f"users/{a}/displayName"
    value, etag = alice.get_with_etag(name_path)
    assert value is None and etag == "null_etag"
    ok, value, etag = alice.set_if_match(name_path, "First", "null_etag")
    assert ok and value == "First" and etag != "null_etag"
    stale, current, current_etag = alice.set_if_match(name_path, "Second", "null_etag")  # create-only
    assert not stale and current == "First" and current_etag == etag
    assert alice.get_with_etag(name_path) == ("First", etag)
    assert denied(alice.delete, name_path)  # a user never removes anything under /users (issue 16)
    assert alice.get(name_path) == "First"
    with pytest.raises(PermissionDenied):
        alice.set_if_match(f"users/{a}/role", "admin", "null_etag")


def test_bad_and_expired_tokens_are_refused(settings, alice):
    a = uid_of(alice)
    expired = UserDatabase(mint_id_token(settings.project_id, a, now=time.time() - 7200), settings)
    with pytest.raises(PermissionDenied, match="expired"):
        expired.get(f"cases/{a}")
    garbage = UserDatabase("not-a-token", settings)
    with pytest.raises(PermissionDenied, match="Could not parse auth token"):
        garbage.get(f"cases/{a}")
    other_project = UserDatabase(mint_id_token("another-project", a), settings)
    with pytest.raises(PermissionDenied):
        other_project.get(f"cases/{a}")


def test_tokens_of_disabled_users_are_refused(settings):
    """The RTDB asks localbase Auth whether a token was revoked (user disabled/deleted, revoke)."""
    from firebase_admin import auth

    from dermaloop.admin_app import get_app

    app = get_app(settings, name=APP_NAME)
    uid = "revoked-" + uuid.uuid4().hex[:8]
    auth.create_user(uid=uid, app=app)
    token = mint_id_token(settings.project_id, uid)  # issued after the user was created
    client = UserDatabase(token, settings)
    client.set(f"users/{uid}/displayName", "Before")
    auth.update_user(uid, disabled=True, app=app)
    with pytest.raises(PermissionDenied, match="revoked"):
        client.get(f"users/{uid}")
    auth.delete_user(uid, app=app)
    with pytest.raises(PermissionDenied, match="revoked"):
        client.set(f"users/{uid}/displayName", "After")
    assert admin(settings, f"users/{uid}/displayName").get() == "Before"


def test_user_listener_sees_worker_updates(settings, alice):
    a = uid_of(alice)
    case_id = create_case(alice)
    seen = []
    listener = alice.listen(f"cases/{a}/{case_id}/status", seen.append)
    try:
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            time.sleep(0.02)
        admin(settings, f"cases/{a}/{case_id}/status").set("processing")
        admin(settings, f"cases/{a}/{case_id}").update({"status": "diagnosed"})
        deadline = time.monotonic() + 10
        while len(seen) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        listener.close()
    assert [(e.event_type, e.path, e.data) for e in seen] == [
        ("put", "/", "queued"), ("put", "/", "processing"), ("put", "/", "diagnosed")]


def test_denied_listener_reports_cancel(settings, alice, bob):
    a = uid_of(alice)
    reasons = []
    listener = bob.listen(f"cases/{a}", lambda e: None, on_cancel=reasons.append)
    listener.thread.join(10)
    assert reasons == ["Permission denied"]


def test_database_error_carries_firebase_message(alice):
    with pytest.raises(DatabaseError) as info:
        alice.get("cases", order_by="nope", limit_to_first=-1)
    assert info.value.status == 400 and "limitToFirst" in info.value.message


# ---- issue 16: holes an attacker found in the rules (each of these writes was allowed before) -----


def _review(reviewer_uid: str) -> dict:
    return cases.review_record(reviewer_uid, "mel", "excise", "urgent", taxonomy_labels=["mel", "nv"])


def test_a_patient_cannot_review_their_own_case(settings, alice):
    """A review with research consent becomes a training label: only dermatologists write one."""
    a = uid_of(alice)
    case_id = create_case(alice)  # queued, untouched: the case's own .write holds for its patient
    case = cases.case_path(a, case_id)
    assert denied(alice.update, case, {"review": _review(a), "status": "reviewed"})
    assert denied(alice.set, f"{case}/review", _review(a))
    assert denied(alice.update, "/", {case: {**new_case(a, case_id), "review": _review(a), "status": "reviewed"}})
    assert admin(settings, case).get()["status"] == "queued"
    assert admin(settings, f"{case}/review").get() is None


def test_a_patient_cannot_set_their_own_case_status(settings, alice):
    """A case the patient calls diagnosed would get no cloud analysis and never reach a dermatologist."""
    a = uid_of(alice)
    case_id = create_case(alice)
    case = cases.case_path(a, case_id)
    for status in cases.Status:
        if status is not cases.Status.QUEUED:
            assert denied(alice.set, f"{case}/status", status.value), status
            assert denied(alice.update, case, {"status": status.value}), status
    alice.set(f"{case}/status", "queued")  # the creation's own value, re-sent: harmless and allowed
    assert admin(settings, case).get()["status"] == "queued"
    # Nor once the worker has the case: not back to queued (a second analysis), not on to anything.
    admin(settings, "/").update(cases.diagnosed_writes(a, case_id, {"risk": "low"}, {"uid": a}, 1))
    for status in ("queued", "reviewed", "labelled"):
        assert denied(alice.set, f"{case}/status", status), status


def test_a_patient_cannot_delete_their_user_record(settings, alice):
    """Deletes skip .validate, so a grant on the record would let the user drop the admin-only role."""
    a = uid_of(alice)
    record = {"displayName": "Alice", "role": "patient", "createdAt": 1}
    admin(settings, f"users/{a}").set(record)
    assert denied(alice.delete, f"users/{a}")
    assert denied(alice.update, "/", {f"users/{a}": None})
    assert denied(alice.delete, f"users/{a}/role")
    assert denied(alice.delete, f"users/{a}/displayName")
    assert denied(alice.update, f"users/{a}", {"displayName": None, "role": None})
    assert denied(alice.set, f"users/{a}/createdAt", 2)  # admin's, like the role
    assert admin(settings, f"users/{a}").get() == record


def test_dermatologist_moves_to_reviewed_exactly_as_the_transitions_allow(settings, alice, derm):
    """The rules' "from" statuses for a review are dermaloop.cases.TRANSITIONS', no more, no fewer."""
    a, d = uid_of(alice), uid_of(derm)
    for status in cases.Status:
        case_id = create_case(alice)
        case = cases.case_path(a, case_id)
        admin(settings, f"{case}/status").set(status.value)
        allowed = cases.Status.REVIEWED in cases.TRANSITIONS[status]
        # A review travels with the move to reviewed: alone, it goes only onto a reviewed case.
        assert denied(derm.set, f"{case}/review", _review(d)) is (status is not cases.Status.REVIEWED), status
        assert denied(derm.update, case, {"review": _review(d), "status": "reviewed"}) is not allowed, status
        if not allowed:
            assert admin(settings, f"{case}/review").get() is None
    case_id = create_case(alice)
    assert denied(derm.set, f"{cases.case_path(a, case_id)}/status", "reviewed")  # no review
    assert denied(derm.update, cases.case_path(a, case_id), {"review": _review(d), "status": "diagnosed"})


def test_a_case_photo_record_names_an_allowed_content_type(alice):
    a = uid_of(alice)
    for content_type in ("image/png, text/html", "image/svg+xml", "text/html", "image/gif", "IMAGE/JPEG"):
        case_id = new_push_id()
        case = new_case(a, case_id)
        case["image"]["contentType"] = content_type
        assert denied(alice.set, cases.case_path(a, case_id), case), content_type
    for content_type in cases.IMAGE_CONTENT_TYPES:
        case_id = new_push_id()
        case = new_case(a, case_id)
        case["image"]["contentType"] = content_type
        alice.set(cases.case_path(a, case_id), case)


def test_retraining_trusts_a_review_only_from_a_current_dermatologist(settings):
    """``cases.trusted_review`` with the look-up retraining uses: the reviewer's role claim, now.
    Reviews the old rules let a patient write, and those of someone whose role was withdrawn, are
    no labels."""
    from firebase_admin import auth

    from dermaloop import auth as dl_auth
    from dermaloop.admin_app import get_app

    app = get_app(settings, name=APP_NAME)
    asked: list[str] = []

    def role_of(uid: str) -> str | None:
        asked.append(uid)
        try:
            return (auth.get_user(uid, app=app).custom_claims or {}).get("role")
        except auth.UserNotFoundError:
            return None

    tag = uuid.uuid4().hex[:8]
    people = {role: dl_auth.create_user(f"{role}-{tag}@example.com", "secret123", role, settings=settings)[0].uid
              for role in ("dermatologist", "patient", "admin")}

    def case(reviewer: str, label: str = "mel", status: str = "reviewed") -> dict:
        return {"status": status, "review": {**_review(reviewer), "label": label, "at": 1}}

    derm = people["dermatologist"]
    assert cases.trusted_review(case(derm), role_of) == case(derm)["review"]
    assert cases.trusted_review(case(derm, status="labelled"), role_of) is not None
    assert cases.trusted_review(case(people["admin"]), role_of) is not None
    for label in ("other", "ungradable", "nv"):
        assert cases.trusted_review(case(derm, label=label), role_of) is not None, label
    assert cases.trusted_review(case(people["patient"]), role_of) is None  # what the old rules let in
    assert cases.trusted_review(case("no-such-user"), role_of) is None
    assert cases.trusted_review(case(derm, label="cancer"), role_of) is None
    assert cases.trusted_review(case(derm, label="mel"), role_of, taxonomy_labels=["nv"]) is None
    asked.clear()
    for status in set(cases.Status) - {cases.Status.REVIEWED, cases.Status.LABELLED}:
        assert cases.trusted_review(case(derm, status=status.value), role_of) is None, status
    assert cases.trusted_review({"status": "reviewed"}, role_of) is None
    assert cases.trusted_review({"status": "reviewed", "review": {"label": "mel"}}, role_of) is None
    assert asked == []  # the look-up is the last check, never made for a case that fails the others
    dl_auth.set_role(derm, "patient", settings)  # the role is withdrawn: earlier reviews stop counting
    assert cases.trusted_review(case(derm), role_of) is None


# ---- "delete my data" (issue 17): the request is the patient's, everything else the server's ---------


def test_a_patient_requests_their_own_erasure_once_and_only_reads_it_afterwards(settings, alice, bob):
    a = uid_of(alice)
    path = cases.erasure_path(a)
    assert denied(bob.set, path, cases.erasure_request())  # nobody asks for someone else
    assert denied(alice.set, path, {**cases.erasure_request(), "state": "done"})  # nothing of the server's
    assert denied(alice.set, path, {"requestedAt": int(time.time() * 1000) + 3_600_000})  # not in the future
    assert denied(alice.set, path, {"requestedAt": "now"})
    assert denied(alice.set, path, {"state": "running"})
    assert admin(settings, path).get() is None

    alice.set(path, cases.erasure_request())
    record = alice.get(path)
    assert isinstance(record["requestedAt"], int) and set(record) == {"requestedAt"}
    assert denied(bob.get, path)
    # Create-only: not again, not changed, not removed, and never the server program's fields.
    assert denied(alice.set, path, cases.erasure_request())
    for name, value in (("state", "done"), ("doneAt", 1), ("counts", {"cases": 0}), ("requestedAt", 1),
                        ("lease", {"worker": "me", "token": "t", "expiresAt": 1})):
        assert denied(alice.set, f"{path}/{name}", value), name
    assert denied(alice.update, path, {"state": "done", "doneAt": 1})
    assert denied(alice.delete, path)
    assert admin(settings, path).get() == record

    # The server program's outcome is readable by its patient, and still not writable.
    admin(settings, path).update({"state": "done", "doneAt": 2, "counts": {"cases": 3}})
    assert alice.get(path)["state"] == "done"
    assert denied(alice.set, f"{path}/state", "running")
    assert denied(alice.delete, path)

    # A fresh sign-up (no role claim yet) is a patient too.
    fresh = user(settings, "fresh-" + uuid.uuid4().hex[:8])
    fresh.set(cases.erasure_path(uid_of(fresh)), cases.erasure_request())


def test_a_dermatologist_cannot_request_an_erasure_nor_read_one(settings, alice, derm):
    a = uid_of(alice)
    assert denied(derm.set, cases.erasure_path(a), cases.erasure_request())  # not for a patient
    assert denied(derm.set, cases.erasure_path(uid_of(derm)), cases.erasure_request())  # nor for themself
    assert denied(derm.update, "/", {cases.erasure_path(a): cases.erasure_request()})
    alice.set(cases.erasure_path(a), cases.erasure_request())
    assert denied(derm.get, cases.erasure_path(a))
    assert denied(derm.set, f"{cases.erasure_path(a)}/state", "done")
    staff = user(settings, "admin-" + uuid.uuid4().hex[:8], "admin")  # accounts of staff are an admin's business
    assert denied(staff.set, cases.erasure_path(uid_of(staff)), cases.erasure_request())


def test_erasure_tombstones_are_admin_only(settings, alice, derm):
    case_id = create_case(alice)
    admin(settings, cases.erased_path(case_id)).set(cases.tombstone_record(1))
    for db in (alice, derm):
        assert denied(db.get, cases.erased_path(case_id))
        assert denied(db.get, "erased")
        assert denied(db.set, cases.erased_path(new_push_id()), {"at": 1})
        assert denied(db.delete, cases.erased_path(case_id))
    assert admin(settings, cases.erased_path(case_id)).get() == {"at": 1}
