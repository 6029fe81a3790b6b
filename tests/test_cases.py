"""The case domain (``dermaloop.cases``): its records are exactly what the deployed rules accept, its
multi-path writes move a case the way docs/ARCHITECTURE.md says, and bad records are refused before
anything is sent. Writes go to a real localbase, as a patient (REST, rules apply) or as the worker
(firebase-admin)."""

from __future__ import annotations

import hashlib
import uuid

import pytest

from dermaloop import cases
from dermaloop.admin_app import delete_app
from dermaloop.cases import CaseError, Status
from dermaloop.database import PermissionDenied, UserDatabase, admin_reference
from dermaloop.rtdb_wire import PushIds
from dermaloop.taxonomy import load_taxonomy
from localbase.tokens import mint_id_token

APP_NAME = "test_cases"
LABELS = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")


@pytest.fixture(scope="module")
def settings(localbase):
    yield localbase.settings(database_url="https://cases-tests-default-rtdb.firebaseio.com")
    delete_app(APP_NAME)


def _user(settings, role: str) -> tuple[str, UserDatabase]:
    uid = f"{role}-{uuid.uuid4().hex[:8]}"
    return uid, UserDatabase(mint_id_token(settings.project_id, uid, {"role": role}), settings)


def _device_json(top: list[dict] | None = None) -> dict:
    """What ``DeviceResult.to_json()`` gives for one photo (snake_case, as ``diagnose --json`` prints)."""
    return {"quality": {"ok": True, "issues": [], "messages": []}, "lesion": {"is_lesion": True, "score": 0.91},
            "box": [0.2, 0.25, 0.7, 0.8], "box_confidence": 0.8, "crop": [0.1, 0.1, 0.8, 0.9],
            "top": top if top is not None else [{"label": "nv", "name": "Mole", "p": 0.7},
                                                {"label": "mel", "name": "Melanoma", "p": 0.2},
                                                {"label": "bkl", "name": "Keratosis", "p": 0.05}],
            "risk": "moderate", "message": None, "corrections": {}, "model_version": "device-7",
            "timings_ms": {"total": 80.0}}


def _new_case(uid: str, case_id: str, device: dict | None = None, research: bool = True) -> dict:
    image = cases.image_record(uid, case_id, hashlib.sha256(case_id.encode()).hexdigest(), "image/jpeg", 2048, 640, 480)
    return cases.new_case(uid, case_id, image, research, note=cases.note_record("left forearm", "it itches"),
                          device=device)


def test_every_status_has_its_moves_and_labelled_is_final():
    assert set(cases.TRANSITIONS) == set(Status)
    assert cases.can_move(None, "queued") and not cases.can_move(None, "diagnosed")
    assert cases.can_move("queued", "processing") and cases.can_move("processing", "queued")
    assert cases.can_move("diagnosed", "reviewed") and cases.can_move("reviewed", "labelled")
    assert not cases.can_move("diagnosed", "queued")  # a finished case never goes back to the worker
    assert not cases.can_move("labelled", "reviewed") and not cases.TRANSITIONS[Status.LABELLED]
    assert not cases.can_move("queued", "bogus") and not cases.can_move("bogus", "queued")
    with pytest.raises(CaseError, match="from diagnosed to queued"):
        cases.check_move("diagnosed", "queued")
    assert cases.LOCAL_STATUSES.isdisjoint(cases.SETTLED)


def test_paths_match_the_storage_layout_and_refuse_bad_keys():
    assert cases.case_path("u1", "c1") == "cases/u1/c1"
    assert cases.image_object("u1", "c1") == "cases/u1/c1/image.jpg"
    assert cases.heatmap_object("u1", "c1") == "cases/u1/c1/heatmap.png"
    assert cases.job_path("c1") == "jobs/c1" and cases.queue_path("c1") == "queue/c1"
    assert cases.messages_path("u1", "c1") == "messages/u1/c1"
    for bad in ("", "a/b", "a.b", "a#b", "a$b", "a[b]"):
        with pytest.raises(CaseError, match="not a valid database key"):
            cases.case_path("u1", bad)


def test_a_patient_creates_a_case_with_its_device_answer_in_one_write(settings):
    uid, patient = _user(settings, "patient")
    case_id = PushIds().next()
    device = cases.device_record(_device_json())
    assert device["modelVersion"] == "device-7" and "model_version" not in device
    patient.update("/", cases.new_case_writes(_new_case(uid, case_id, device)))
    stored = admin_reference(cases.case_path(uid, case_id), settings, app_name=APP_NAME).get()
    assert stored["status"] == "queued" and stored["device"]["top"][0]["label"] == "nv"
    assert stored["device"]["box"] == [0.2, 0.25, 0.7, 0.8] and isinstance(stored["device"]["at"], int)
    job = admin_reference(cases.job_path(case_id), settings, app_name=APP_NAME).get()
    assert job == {"uid": uid, "caseId": case_id, "createdAt": stored["createdAt"]}
    # Re-sending the same creation (a retry after a lost answer) is allowed and changes nothing.
    patient.update("/", cases.new_case_writes(_new_case(uid, case_id, device)))


def test_a_declined_photo_is_recorded_without_a_classification(settings):
    uid, patient = _user(settings, "patient")
    case_id = PushIds().next()
    device = cases.device_record({**_device_json(top=[]), "risk": None})
    assert "top" not in device and "risk" not in device
    patient.update("/", cases.new_case_writes(_new_case(uid, case_id, device)))
    stored = patient.get(cases.case_path(uid, case_id))
    assert stored["device"]["modelVersion"] == "device-7" and "top" not in stored["device"]


def test_the_worker_outcomes_move_case_job_and_queue_together(settings):
    uid, patient = _user(settings, "patient")
    case_id = PushIds().next()
    patient.update("/", cases.new_case_writes(_new_case(uid, case_id)))
    root = admin_reference("/", settings, app_name=APP_NAME)
    now = 1_800_000_000_000

    root.update(cases.requeue_writes(uid, case_id, now, retry_at=now + 5000, error="model_error: boom"))
    job = root.child(cases.job_path(case_id)).get()
    assert job["state"] == "queued" and job["retryAt"] == now + 5000 and job["error"] == "model_error: boom"

    cloud = cases.cloud_record(model_version="cloud-3", quality={"ok": True, "issues": []}, lesion=None, box=None,
                               heatmap_path=cases.heatmap_object(uid, case_id), timings_ms={"total": 1.0},
                               message=None, at=now, probs={"nv": 0.9, "mel": 0.1},
                               top=[{"label": "nv", "name": "Mole", "p": 0.9}], risk="low", malignant_p=0.1)
    entry = cases.queue_entry(uid, Status.DIAGNOSED, "low", 1.5, None, now)
    root.update(cases.diagnosed_writes(uid, case_id, cloud, entry, now))
    case = root.child(cases.case_path(uid, case_id)).get()
    assert case["status"] == "diagnosed" and case["cloud"]["modelVersion"] == "cloud-3"
    assert root.child(cases.queue_path(case_id)).get() == {"uid": uid, "status": "diagnosed", "risk": "low",
                                                           "score": 1.5, "createdAt": now, "updatedAt": now}
    assert root.child(cases.job_path(case_id)).child("state").get() == "done"

    other = PushIds().next()
    patient.update("/", cases.new_case_writes(_new_case(uid, other)))
    root.update(cases.failed_writes(uid, other, "corrupt_image", "truncated JPEG", 2, now))
    failed = root.child(cases.case_path(uid, other)).get()
    assert failed["status"] == "failed"
    assert failed["failure"] == {"reason": "corrupt_image", "detail": "truncated JPEG", "attempts": 2, "at": now}
    assert cases.failure_message("corrupt_image").startswith("The photo arrived damaged")
    assert "dermatologist" in cases.failure_message("no_such_reason")


def test_a_patient_cannot_write_what_the_domain_says_is_the_worker_s(settings):
    uid, patient = _user(settings, "patient")
    case_id = PushIds().next()
    patient.update("/", cases.new_case_writes(_new_case(uid, case_id)))
    entry = cases.queue_entry(uid, Status.DIAGNOSED, "low", 1.0, None, 1)
    with pytest.raises(PermissionDenied):
        patient.update("/", {cases.queue_path(case_id): entry})
    with pytest.raises(PermissionDenied):
        patient.update("/", cases.failed_writes(uid, case_id, "internal_error", "x", 1, 1))


def test_review_and_message_records_are_what_the_rules_accept(settings):
    uid, patient = _user(settings, "patient")
    derm_uid, derm = _user(settings, "dermatologist")
    case_id = PushIds().next()
    patient.update("/", cases.new_case_writes(_new_case(uid, case_id)))
    labels = load_taxonomy("ham10000").ids
    review = cases.review_record(derm_uid, "mel", "Please see a dermatologist within two weeks.", "soon",
                                 taxonomy_labels=labels)
    derm.update(cases.case_path(uid, case_id), {"review": review, "status": Status.REVIEWED.value})
    assert patient.get(cases.case_path(uid, case_id))["review"]["label"] == "mel"
    derm.push(cases.messages_path(uid, case_id), cases.message_record(derm_uid, "dermatologist", "  Hello  "))
    patient.push(cases.messages_path(uid, case_id), cases.message_record(uid, "patient", "Thank you"))
    texts = sorted(m["text"] for m in patient.get(cases.messages_path(uid, case_id)).values())
    assert texts == ["Hello", "Thank you"]


def test_bad_records_are_refused_before_anything_is_sent():
    with pytest.raises(CaseError, match="2000 characters"):
        cases.note_record("arm", "x" * 100_000)
    with pytest.raises(CaseError, match="100 characters"):
        cases.note_record("x" * 101, None)
    assert cases.note_record(None, "") is None
    with pytest.raises(CaseError, match="image/jpeg"):
        cases.image_record("u", "c", "0" * 64, "image/svg+xml", 10, 1, 1)
    with pytest.raises(CaseError, match="MiB"):
        cases.image_record("u", "c", "0" * 64, "image/jpeg", 0, 1, 1)
    with pytest.raises(CaseError, match="unknown diagnosis"):
        cases.review_record("d", "cancer", "", "soon", taxonomy_labels=LABELS)
    with pytest.raises(CaseError, match="urgency"):
        cases.review_record("d", "other", "", "tomorrow", taxonomy_labels=LABELS)
    with pytest.raises(CaseError, match="4000 characters"):
        cases.review_record("d", "ungradable", "x" * 100_000, "routine", taxonomy_labels=LABELS)
    with pytest.raises(CaseError, match="1 to 4000"):
        cases.message_record("u", "patient", "   ")
    with pytest.raises(CaseError, match="patient or a dermatologist"):
        cases.message_record("u", "admin", "hi")
    with pytest.raises(CaseError, match="model version"):
        cases.device_record({"top": []})
    with pytest.raises(CaseError, match="unknown failure reason"):
        cases.failure_record("bogus", "", 1, 1)


def test_touched_cases_reads_puts_and_multi_path_patches():
    assert cases.touched_cases("/c1/status", "diagnosed") == {"c1"}
    assert cases.touched_cases("/", {"c1/status": "x", "c2/cloud": {}}) == {"c1", "c2"}
    assert cases.touched_cases("/", None) == set()
