"""The reviewer portal's logic against a real localbase: queue order and filters, claims (and the
rules behind them), review validation and the one atomic review write, unread counts, monitoring,
the role gate and missing pictures. No browser: tests/test_portal_browser.py drives the screens."""

from __future__ import annotations

import hashlib
import threading
import time
import uuid

import pytest

from dermaloop import cases
from dermaloop.admin_app import delete_app
from dermaloop.auth import AuthClient, create_user, revoke
from dermaloop.database import UserDatabase, admin_reference, new_push_id
from dermaloop.errors import PermissionDenied, Unauthenticated
from dermaloop.storage import UserStorage, admin_bucket
from localbase.tokens import mint_id_token
from reviewer_portal import claims, images, monitoring, people, review, templates
from reviewer_portal import queue as triage
from reviewer_portal.session import NOT_FOR_PATIENTS, SESSION_ENDED, NotAllowed, PortalSession, sign_in

APP_NAME = "test_portal_core"
LABELS = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
HOUR = triage.HOUR_MS


@pytest.fixture(scope="module")
def settings(localbase):
    # A namespace of its own: nothing written here reaches another module's worker.
    yield localbase.settings(database_url="https://portal-core-default-rtdb.firebaseio.com")
    delete_app(APP_NAME)


def admin(settings, path: str = "/"):
    return admin_reference(path, settings, app_name=APP_NAME)


def user(settings, role: str | None, prefix: str) -> tuple[str, UserDatabase]:
    uid = f"{prefix}-{uuid.uuid4().hex[:8]}"
    claims_ = {"role": role} if role else {}
    return uid, UserDatabase(mint_id_token(settings.project_id, uid, claims_), settings)


def refused(call) -> bool:
    try:
        call()
    except PermissionDenied as exc:
        assert not isinstance(exc, Unauthenticated), exc
        return True
    return False


def seed_case(settings, uid: str, *, risk: str = "low", score: float = 1.0, created: int | None = None,
              research: bool = True, site: str = "back", sent_anyway: bool = False, device_top: str = "nv",
              cloud_top: str = "nv", status: str = "diagnosed") -> str:
    """A diagnosed case with its queue entry, written as the worker (admin) would."""
    case_id = new_push_id()
    created = created if created is not None else int(time.time() * 1000) - HOUR
    image = cases.image_record(uid, case_id, hashlib.sha256(case_id.encode()).hexdigest(), "image/jpeg", 100, 64, 64)
    device = cases.device_record({"modelVersion": "device-1", "risk": risk, "quality": {"ok": True},
                                  "top": [{"label": device_top, "name": device_top.upper(), "p": 0.6}]}, at=created)
    case = cases.new_case(uid, case_id, image, research, note=cases.note_record(site, "it itches"), device=device,
                          created_at=created, sent_anyway=sent_anyway)
    cloud = cases.cloud_record(model_version="cloud-1", quality={"ok": True, "issues": []}, lesion=None,
                               box=[0.2, 0.2, 0.8, 0.8], heatmap_path=cases.heatmap_object(uid, case_id),
                               timings_ms={}, message=None, at=created, probs={cloud_top: 0.7, "mel": 0.3},
                               top=[{"label": cloud_top, "name": cloud_top.upper(), "p": 0.7}], risk=risk,
                               malignant_p=0.3)
    admin(settings).update(cases.new_case_writes(case))
    admin(settings).update(cases.diagnosed_writes(uid, case_id, cloud,
                                                  cases.queue_entry(uid, status, risk, score, created, created),
                                                  created))
    return case_id


# ---- ordering, filters, badges, unread ------------------------------------------------------------


def test_rows_follow_the_score_then_the_wait_and_filters_narrow_them():
    now = 100 * 24 * HOUR
    queue = {
        "a": {"uid": "p1", "status": "diagnosed", "risk": "low", "score": 1.0, "createdAt": now - 2 * HOUR},
        "b": {"uid": "p1", "status": "diagnosed", "risk": "high", "score": 9.0, "createdAt": now - 30 * HOUR},
        "c": {"uid": "p2", "status": "diagnosed", "risk": "moderate", "score": 5.0, "createdAt": now - 1 * HOUR},
        "d": {"uid": "p2", "status": "reviewed", "risk": "high", "score": 20.0, "createdAt": now - 1 * HOUR},
        "e": {"uid": "p2", "status": "diagnosed", "risk": "moderate", "score": 5.0, "createdAt": now - 5 * HOUR},
    }
    all_cases = {
        "p1": {"a": {"status": "diagnosed", "note": {"site": "arm"}, "flags": {"sentAnyway": True}},
               "b": {"status": "diagnosed", "note": {"site": "back"},
                     "device": {"top": [{"label": "nv", "name": "Mole", "p": 0.6}]},
                     "cloud": {"top": [{"label": "mel", "name": "Melanoma", "p": 0.7}]}}},
        "p2": {"c": {"status": "diagnosed"}, "d": {"status": "reviewed"}, "e": {"status": "diagnosed"}},
    }
    messages = {"p1": {"b": {"m1": {"senderRole": "patient", "at": now - 10}, "m2": {"senderRole": "dermatologist",
                                                                                      "at": now - 5},
                             "m3": {"senderRole": "patient", "at": now - 1}}}}
    reads = {"b": now - 7}
    claims_ = {"c": {"uid": "derm-x", "patientUid": "p2", "at": now - 60_000},
               "e": {"uid": "derm-y", "patientUid": "p2", "at": now - cases.CLAIM_TTL_MS - 1}}
    rows = triage.build_rows(queue, all_cases, messages, reads, claims_, now)
    assert [r.case_id for r in rows] == ["d", "b", "e", "c", "a"]  # score, then the longer wait
    unreviewed = triage.apply(rows, triage.Filters())
    assert [r.case_id for r in unreviewed] == ["b", "e", "c", "a"]
    b = unreviewed[0]
    assert b.overdue and b.disagree and b.unread == 1 and b.site == "back"
    assert b.cloud.name == "Melanoma" and b.device.name == "Mole"
    assert rows[-1].sent_anyway and not rows[-1].overdue
    by_id = {r.case_id: r for r in rows}
    assert by_id["c"].claimed_by == "derm-x" and by_id["e"].claimed_by is None  # lapsed
    assert [r.case_id for r in triage.apply(rows, triage.Filters(risk="moderate"))] == ["e", "c"]
    assert [r.case_id for r in triage.apply(rows, triage.Filters(site="arm"))] == ["a"]
    assert [r.case_id for r in triage.apply(rows, triage.Filters(age="1 to 3 days"))] == ["b"]
    assert [r.case_id for r in triage.apply(rows, triage.Filters(status="reviewed"))] == ["d"]
    assert len(triage.apply(rows, triage.Filters(status="all"))) == 5
    assert triage.sites(rows) == ["arm", "back", "not given"]


def test_the_queue_read_live_orders_worker_entries(settings):
    """What the portal's mirror receives from a real database, ordered as the worker scored it."""
    patient = f"pat-{uuid.uuid4().hex[:6]}"
    low = seed_case(settings, patient, risk="low", score=-500.0)
    high = seed_case(settings, patient, risk="high", score=-490.0, sent_anyway=True, cloud_top="mel")
    _, derm = user(settings, "dermatologist", "derm")
    with derm.mirror("queue") as q, derm.mirror("cases") as c:
        assert q.wait_synced(30) and c.wait_synced(30)
        rows = [r for r in triage.build_rows(q.value, c.value, {}, {}, {}, claims.now_ms()) if r.uid == patient]
    assert [r.case_id for r in rows] == [high, low]
    assert rows[0].sent_anyway and rows[0].risk == "high" and rows[0].cloud.label == "mel"


# ---- claims ---------------------------------------------------------------------------------------------


def test_one_claim_per_case_renewed_released_and_lapsing(settings):
    patient = f"pat-{uuid.uuid4().hex[:6]}"
    case_id = seed_case(settings, patient)
    a_uid, a = user(settings, "dermatologist", "derm-a")
    b_uid, b = user(settings, "dermatologist", "derm-b")
    claim = claims.take(a, a_uid, patient, case_id)
    assert claim["uid"] == a_uid and claims.holder(b, case_id) == a_uid
    with pytest.raises(claims.ClaimHeld) as held:
        claims.take(b, b_uid, patient, case_id)
    assert held.value.holder == a_uid
    # The rules, not just the portal: b can neither overwrite nor delete a's live claim.
    assert refused(lambda: b.set(cases.claim_path(case_id), cases.claim_record(b_uid, patient)))
    assert refused(lambda: b.delete(cases.claim_path(case_id)))
    assert claims.take(a, a_uid, patient, case_id)["uid"] == a_uid  # renewal
    assert not claims.release(b, b_uid, case_id)
    assert claims.release(a, a_uid, case_id)
    assert claims.take(b, b_uid, patient, case_id)["uid"] == b_uid
    # A claim whose server-stamped time is older than the TTL lapses: anyone may take it.
    admin(settings, cases.claim_path(case_id)).set(
        cases.claim_record(b_uid, patient, at=claims.now_ms() - cases.CLAIM_TTL_MS - 1000))
    assert claims.holder(a, case_id) is None
    assert claims.take(a, a_uid, patient, case_id)["uid"] == a_uid


def test_simultaneous_takers_one_wins(settings):
    patient = f"pat-{uuid.uuid4().hex[:6]}"
    case_id = seed_case(settings, patient)
    a_uid, a = user(settings, "dermatologist", "derm-a")
    b_uid, b = user(settings, "dermatologist", "derm-b")
    _, etag = a.get_with_etag(cases.claim_path(case_id))  # both saw it free
    ok_a, _, _ = a.set_if_match(cases.claim_path(case_id), cases.claim_record(a_uid, patient), etag)
    ok_b = True
    try:
        ok_b, _, _ = b.set_if_match(cases.claim_path(case_id), cases.claim_record(b_uid, patient), etag)
    except PermissionDenied:
        ok_b = False
    assert ok_a and not ok_b
    assert admin(settings, cases.claim_path(case_id)).get()["uid"] == a_uid


def test_claim_rules_refuse_patients_strangers_and_bad_shapes(settings):
    patient_uid, patient = user(settings, "patient", "pat")
    case_id = seed_case(settings, patient_uid)
    d_uid, derm = user(settings, "dermatologist", "derm")
    path = cases.claim_path(case_id)
    assert refused(lambda: patient.set(path, cases.claim_record(patient_uid, patient_uid)))
    assert refused(lambda: patient.get(path))
    assert refused(lambda: derm.set(path, cases.claim_record("someone-else", patient_uid)))  # only as oneself
    assert refused(lambda: derm.set(path, cases.claim_record(d_uid, patient_uid, at=1)))  # not server time
    assert refused(lambda: derm.set(path, {**cases.claim_record(d_uid, patient_uid), "until": 9}))
    assert refused(lambda: derm.set(cases.claim_path(new_push_id()), cases.claim_record(d_uid, patient_uid)))  # no case
    with pytest.raises(claims.CaseGone):
        claims.take(derm, d_uid, patient_uid, new_push_id())
    derm.set(path, cases.claim_record(d_uid, patient_uid))
    assert admin(settings, path).get()["uid"] == d_uid


# ---- reviews --------------------------------------------------------------------------------------------


def _form(**kw) -> review.ReviewForm:
    base = {"label": "mel", "recommendation": "Please see a dermatologist within days.", "urgency": "urgent",
            "confidence": "high"}
    return review.ReviewForm(**{**base, **kw})


def test_review_validation_says_what_to_fix_and_writes_nothing(settings):
    patient = f"pat-{uuid.uuid4().hex[:6]}"
    case_id = seed_case(settings, patient, research=False)
    d_uid, derm = user(settings, "dermatologist", "derm")
    before = admin(settings, cases.case_path(patient, case_id)).get()
    cases_ = [
        (_form(label=None), "Choose a diagnosis"),
        (_form(label="psoriasis"), "Unknown diagnosis 'psoriasis'"),
        (_form(recommendation="x" * 100_000), r"limited to 4000 characters \(100000 given\)"),
        (_form(urgency=None), "Choose an urgency"),
        (_form(label="other", other_text="  "), "Say what the 'Other' diagnosis is"),
        (_form(training_use=True), "did not agree to research use"),
        (_form(confidence="certain"), "Confidence must be one of"),
    ]
    for form, message in cases_:
        with pytest.raises(review.ReviewRefused, match=message):
            review.save(derm, d_uid, patient, case_id, form, LABELS)
    assert admin(settings, cases.case_path(patient, case_id)).get() == before
    assert admin(settings, cases.review_history_path(case_id)).get() is None


def test_a_review_lands_atomically_and_a_change_keeps_the_earlier_one(settings):
    patient = f"pat-{uuid.uuid4().hex[:6]}"
    case_id = seed_case(settings, patient, research=True)
    d_uid, derm = user(settings, "dermatologist", "derm")
    claims.take(derm, d_uid, patient, case_id)
    first = review.save(derm, d_uid, patient, case_id, _form(training_use=True), LABELS)
    assert first["label"] == "mel" and first["confidence"] == "high" and first["trainingUse"] is True
    case = admin(settings, cases.case_path(patient, case_id)).get()
    assert case["status"] == "reviewed" and case["review"] == first
    assert admin(settings, f"{cases.queue_path(case_id)}/status").get() == "reviewed"
    second = review.save(derm, d_uid, patient, case_id,
                         _form(label="other", other_text="Seborrhoeic wart, irritated", urgency="soon"), LABELS)
    assert second["otherText"] == "Seborrhoeic wart, irritated"
    history = list((admin(settings, cases.review_history_path(case_id)).get() or {}).values())
    assert len(history) == 2
    changed = next(h for h in history if "previous" in h)
    assert changed["editorUid"] == d_uid and changed["previous"]["label"] == "mel"
    assert changed["review"]["label"] == "other" and isinstance(changed["at"], int)
    # The audit is append-only: no editing or removing an entry, and never as someone else.
    entry = next(iter(admin(settings, cases.review_history_path(case_id)).get()))
    assert refused(lambda: derm.set(f"{cases.review_history_path(case_id)}/{entry}/editorUid", d_uid))
    assert refused(lambda: derm.delete(f"{cases.review_history_path(case_id)}/{entry}"))
    # The patient sees the review (REST as the patient).
    patient_db = UserDatabase(mint_id_token(settings.project_id, patient, {"role": "patient"}), settings)
    assert patient_db.get(f"{cases.case_path(patient, case_id)}/review/label") == "other"


def test_a_save_after_the_claim_was_taken_or_the_case_deleted_is_refused(settings):
    patient = f"pat-{uuid.uuid4().hex[:6]}"
    case_id = seed_case(settings, patient)
    a_uid, a = user(settings, "dermatologist", "derm-a")
    b_uid, b = user(settings, "dermatologist", "derm-b")
    claims.take(a, a_uid, patient, case_id)
    # a's claim lapses while the case is open, and b takes the case.
    admin(settings, cases.claim_path(case_id)).set(
        cases.claim_record(a_uid, patient, at=claims.now_ms() - cases.CLAIM_TTL_MS - 1000))
    claims.take(b, b_uid, patient, case_id)
    with pytest.raises(review.ReviewRefused, match=f"{b_uid} is reviewing it now"):
        review.save(a, a_uid, patient, case_id, _form(), LABELS)
    # The rules refuse it too, however the portal is bypassed.
    review_record = cases.review_record(a_uid, "mel", "x", "urgent", taxonomy_labels=LABELS)
    assert refused(lambda: a.update("/", cases.reviewed_writes(patient, case_id, review_record, new_push_id())))
    assert admin(settings, f"{cases.case_path(patient, case_id)}/status").get() == "diagnosed"
    # b's save works; then the patient's account (and case) goes away while b has it open.
    review.save(b, b_uid, patient, case_id, _form(), LABELS)
    admin(settings, cases.case_path(patient, case_id)).delete()
    with pytest.raises(review.ReviewRefused, match="deleted it"):
        review.save(b, b_uid, patient, case_id, _form(), LABELS)


def test_review_rules_for_the_new_fields_and_the_queue_status(settings):
    patient_uid, patient = user(settings, "patient", "pat")
    case_id = seed_case(settings, patient_uid, research=False)
    d_uid, derm = user(settings, "dermatologist", "derm")
    case = cases.case_path(patient_uid, case_id)
    good = cases.review_record(d_uid, "nv", "fine", "routine", taxonomy_labels=LABELS, confidence="low")
    # trainingUse true needs research consent; otherText goes with "other" only.
    assert refused(lambda: derm.update(case, {"review": {**good, "trainingUse": True}, "status": "reviewed"}))
    assert refused(lambda: derm.update(case, {"review": {**good, "otherText": "x"}, "status": "reviewed"}))
    assert refused(lambda: derm.update(case, {"review": {**good, "confidence": "total"}, "status": "reviewed"}))
    # The queue status moves only with the case, only to reviewed, and only for dermatologists.
    assert refused(lambda: derm.set(f"{cases.queue_path(case_id)}/status", "reviewed"))
    assert refused(lambda: derm.update("/", {f"{case}/review": good, f"{case}/status": "reviewed",
                                             f"{cases.queue_path(case_id)}/status": "labelled"}))
    assert refused(lambda: patient.get("queue"))
    assert refused(lambda: patient.update("/", cases.reviewed_writes(
        patient_uid, case_id, {**good, "reviewerUid": patient_uid}, new_push_id())))
    derm.update("/", cases.reviewed_writes(patient_uid, case_id, {**good, "trainingUse": False}, new_push_id()))
    assert admin(settings, f"{cases.queue_path(case_id)}/status").get() == "reviewed"
    # A dermatologist still never writes the worker's result.
    assert refused(lambda: derm.set(f"{case}/cloud/risk", "low"))


def test_reads_are_per_dermatologist_and_sent_anyway_is_the_patients(settings):
    patient_uid, patient = user(settings, "patient", "pat")
    case_id = seed_case(settings, patient_uid)
    d_uid, derm = user(settings, "dermatologist", "derm")
    e_uid, other = user(settings, "dermatologist", "derm2")
    derm.set(cases.reads_path(d_uid, case_id), cases.SERVER_TIMESTAMP)
    assert isinstance(derm.get(cases.reads_path(d_uid, case_id)), int)
    assert refused(lambda: other.get(cases.reads_path(d_uid)))
    assert refused(lambda: other.set(cases.reads_path(d_uid, case_id), 1))
    assert refused(lambda: patient.set(cases.reads_path(patient_uid, case_id), 1))
    assert refused(lambda: derm.set(cases.reads_path(d_uid, case_id), claims.now_ms() + 10 * HOUR))  # future
    # flags and the same-lesion link come with the patient's creation, nothing else.
    new_id, earlier = new_push_id(), case_id
    image = cases.image_record(patient_uid, new_id, "a" * 64, "image/jpeg", 10, 1, 1)
    body = cases.new_case(patient_uid, new_id, image, False, sent_anyway=True, same_lesion_as=earlier)
    assert body["flags"] == {"sentAnyway": True} and body["sameLesionAs"] == earlier
    patient.update("/", cases.new_case_writes(body))
    assert patient.get(f"{cases.case_path(patient_uid, new_id)}/flags/sentAnyway") is True
    bad_id = new_push_id()
    bad = cases.new_case(patient_uid, bad_id, cases.image_record(patient_uid, bad_id, "a" * 64, "image/jpeg", 10, 1, 1),
                         False, same_lesion_as=new_push_id())  # no such earlier case
    assert refused(lambda: patient.update("/", cases.new_case_writes(bad)))
    assert refused(lambda: patient.update("/", cases.new_case_writes(
        {**bad, "sameLesionAs": earlier, "flags": {"sentAnyway": True, "x": 1}})))
    with pytest.raises(cases.CaseError):
        cases.new_case(patient_uid, bad_id, {}, False, same_lesion_as=bad_id)
    # Dermatologists read every chat from the root (unread counts); patients do not.
    derm.get("messages", shallow=True)
    assert refused(lambda: patient.get("messages"))


# ---- monitoring, the role gate, pictures ---------------------------------------------------------------


def test_monitoring_figures_and_png():
    now = 10 * 24 * HOUR
    all_cases = {"p": {
        "a": {"status": "reviewed", "createdAt": now - 10 * HOUR, "review": {"label": "mel", "at": now - 8 * HOUR},
              "device": {"top": [{"label": "nv", "p": 0.5}]}, "cloud": {"top": [{"label": "mel", "p": 0.6}]}},
        "b": {"status": "labelled", "createdAt": now - 10 * HOUR, "review": {"label": "nv", "at": now - 6 * HOUR},
              "device": {"top": [{"label": "nv", "p": 0.5}]}, "cloud": {"top": [{"label": "nv", "p": 0.6}]}},
        "c": {"status": "reviewed", "createdAt": now - 3 * HOUR, "review": {"label": "ungradable", "at": now},
              "cloud": {"top": [{"label": "nv", "p": 0.6}]}},
        "d": {"status": "diagnosed", "createdAt": now - 30 * HOUR},
    }}
    queue = {"d": {"status": "diagnosed", "risk": "high", "createdAt": now - 30 * HOUR},
             "a": {"status": "reviewed", "risk": "high", "createdAt": now - 10 * HOUR}}
    figures = monitoring.compute(all_cases, queue, now)
    assert figures.reviewed == 3
    assert figures.review_hours_p50 == pytest.approx(3.0)
    assert figures.queue_age == {"high": {"count": 1, "p50_h": 30.0, "max_h": 30.0, "overdue": 1}}
    assert figures.agreement == {"device": 0.5, "cloud": 1.0}  # "ungradable" is not a class to agree with
    png = monitoring.confusion_png(figures, LABELS)
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_only_dermatologists_and_admins_get_in(settings):
    tag = uuid.uuid4().hex[:6]
    for role in ("patient", "dermatologist", "admin"):
        create_user(f"{role}-{tag}@dermaloop.test", "portal-pass-1", role, settings=settings)
    auth = AuthClient(settings)
    with pytest.raises(NotAllowed, match="This portal is for dermatologists") as refused_:
        sign_in(auth, f"patient-{tag}@dermaloop.test", "portal-pass-1")
    assert str(refused_.value) == NOT_FOR_PATIENTS
    assert sign_in(auth, f"dermatologist-{tag}@dermaloop.test", "portal-pass-1").role == "dermatologist"
    assert sign_in(auth, f"admin-{tag}@dermaloop.test", "portal-pass-1").role == "admin"
    with pytest.raises(Unauthenticated):
        sign_in(auth, f"dermatologist-{tag}@dermaloop.test", "wrong")


def test_missing_pictures_are_sentences_not_crashes(settings):
    patient = f"pat-{uuid.uuid4().hex[:6]}"
    case_id = seed_case(settings, patient)
    d_uid = f"derm-{uuid.uuid4().hex[:6]}"
    storage = UserStorage(mint_id_token(settings.project_id, d_uid, {"role": "dermatologist"}), settings)
    with pytest.raises(images.ImageMissing, match="heatmap is missing from Storage"):
        images.fetch(storage, cases.heatmap_object(patient, case_id), "heatmap")
    with pytest.raises(images.ImageMissing, match="No photo was recorded"):
        images.fetch(storage, None, "photo")
    admin_bucket(settings).blob(cases.image_object(patient, case_id)).upload_from_string(
        b"\xff\xd8 not really a jpeg", content_type="image/jpeg")
    data = images.fetch(storage, cases.image_object(patient, case_id), "photo")
    with pytest.raises(images.ImageMissing, match="not a readable image"):
        images.render(data)


# ---- admins: a read-only portal ---------------------------------------------------------------------


def test_admins_read_what_dermatologists_read_and_write_nothing(settings):
    patient_uid, _ = user(settings, "patient", "pat")
    case_id = seed_case(settings, patient_uid)
    d_uid, derm = user(settings, "dermatologist", "derm")
    a_uid, admin_db = user(settings, "admin", "lead")
    claims.take(derm, d_uid, patient_uid, case_id)
    review.save(derm, d_uid, patient_uid, case_id, _form(), LABELS)
    derm.push(cases.messages_path(patient_uid, case_id), cases.message_record(d_uid, "dermatologist", "Hello"))
    admin(settings, cases.user_path(d_uid)).set({"displayName": "Dr Derm", "role": "dermatologist", "createdAt": 1})
    # Reads: the queue, every case, claims, the review audit, every chat, colleagues' names.
    assert admin_db.get(f"{cases.queue_path(case_id)}/status") == "reviewed"
    assert admin_db.get(cases.case_path(patient_uid, case_id))["review"]["reviewerUid"] == d_uid
    assert patient_uid in admin_db.get("cases", shallow=True)
    assert admin_db.get(cases.claim_path(case_id))["uid"] == d_uid
    assert len(admin_db.get(cases.review_history_path(case_id))) == 1
    assert len(admin_db.get(cases.messages_path(patient_uid, case_id))) == 1
    assert admin_db.get("messages", shallow=True)
    assert admin_db.get(f"{cases.user_path(d_uid)}/displayName") == "Dr Derm"
    # Writes: no claim (not even a free one), no review, no message as either role, no read mark, no
    # templates, no queue status, nobody's name; and none of the dermatologists' own records.
    other_case = seed_case(settings, patient_uid)
    assert refused(lambda: admin_db.set(cases.claim_path(other_case), cases.claim_record(a_uid, patient_uid)))
    with pytest.raises(PermissionDenied):
        claims.take(admin_db, a_uid, patient_uid, other_case)
    record = cases.review_record(a_uid, "nv", "fine", "routine", taxonomy_labels=LABELS)
    assert refused(lambda: admin_db.update("/", cases.reviewed_writes(patient_uid, other_case, record, new_push_id())))
    assert refused(lambda: admin_db.update(cases.case_path(patient_uid, other_case),
                                           {"review": record, "status": "reviewed"}))
    for role in ("dermatologist", "patient"):
        assert refused(lambda r=role: admin_db.push(cases.messages_path(patient_uid, case_id),
                                                    cases.message_record(a_uid, r, "from the admin")))
    assert refused(lambda: admin_db.set(cases.reads_path(a_uid, case_id), cases.SERVER_TIMESTAMP))
    assert refused(lambda: admin_db.get(cases.reads_path(d_uid)))
    assert refused(lambda: admin_db.set(cases.reviewer_templates_path(a_uid, "soon"), "x"))
    assert refused(lambda: admin_db.get(cases.reviewer_templates_path(d_uid)))
    assert refused(lambda: admin_db.set(f"{cases.queue_path(other_case)}/status", "reviewed"))
    assert refused(lambda: admin_db.set(f"{cases.user_path(d_uid)}/displayName", "Renamed"))
    assert refused(lambda: admin_db.delete(cases.claim_path(case_id)))
    assert admin(settings, cases.claim_path(other_case)).get() is None
    assert admin(settings, f"{cases.case_path(patient_uid, other_case)}/status").get() == "diagnosed"
    assert len(admin(settings, cases.messages_path(patient_uid, case_id)).get()) == 1


def test_an_admin_session_is_read_only_and_complete(settings):
    """The portal's session for an admin: every live copy syncs (none is refused, so none cancels the
    session), no read marks are kept, nothing is published."""
    tag = uuid.uuid4().hex[:6]
    create_user(f"lead-{tag}@dermaloop.test", "portal-pass-1", "admin", display_name="Lead", settings=settings)
    ended: list[str] = []
    session = PortalSession(sign_in(AuthClient(settings), f"lead-{tag}@dermaloop.test", "portal-pass-1"), settings,
                            on_change=lambda what: None, on_ended=ended.append)
    try:
        assert session.read_only and session.role == "admin"
        assert session.wait_synced(60), "an admin's live copies did not sync"
        assert "reads" not in session.mirrors and session.value("reads") == {}
        assert isinstance(session.value("queue"), dict) and session.value("queue")
        session.publish_name()
        assert admin(settings, f"{cases.user_path(session.uid)}/displayName").get() is None
        assert not ended and not session.ended
    finally:
        session.close()


def test_a_revoked_session_ends_with_a_clear_message(settings):
    tag = uuid.uuid4().hex[:6]
    record, _ = create_user(f"derm-{tag}@dermaloop.test", "portal-pass-1", "dermatologist", settings=settings)
    ended: list[str] = []
    got = threading.Event()
    session = PortalSession(sign_in(AuthClient(settings), f"derm-{tag}@dermaloop.test", "portal-pass-1"), settings,
                            on_change=lambda what: None, on_ended=lambda reason: (ended.append(reason), got.set()))
    try:
        assert session.wait_synced(60)
        # validSince counts whole seconds (as in production): a token issued in the second of the
        # revocation stays valid, so revoke from the next second on.
        time.sleep(1.1)
        revoke(record.uid, settings=settings)
        assert got.wait(120), "revoking the account did not end the portal session"
        assert session.ended and ended == [SESSION_ENDED]  # once, however many copies were cancelled
        assert "Please sign in again" in SESSION_ENDED
        assert all(m.listener.closed for m in session.mirrors.values())
    finally:
        session.close()


# ---- names instead of uids ---------------------------------------------------------------------------


def test_colleagues_are_named_not_numbered(settings):
    d_uid, derm = user(settings, "dermatologist", "derm")
    e_uid, other = user(settings, "dermatologist", "derm2")
    n_uid, nameless = user(settings, "dermatologist", "derm3")
    # Published on sign-in: the Auth display name, else the email; a name the user set stays.
    assert people.publish_own(derm, d_uid, "Dr One", "one@x.test") == "Dr One"
    assert people.publish_own(other, e_uid, None, "two@x.test") == "two@x.test"
    other.set(f"{cases.user_path(e_uid)}/displayName", "Dr Two")
    assert people.publish_own(other, e_uid, None, "two@x.test") == "Dr Two"
    assert people.publish_own(derm, d_uid, "x" * 300, None) == "x" * people.MAX_NAME_CHARS
    derm.set(f"{cases.user_path(d_uid)}/displayName", "Dr One")
    # Read once per session: a later rename shows in the next session, an unknown uid stays a uid.
    names = people.Names(derm)
    assert names.of(e_uid) == "Dr Two"
    admin(settings, f"{cases.user_path(e_uid)}/displayName").set("Dr Renamed")
    assert names.of(e_uid) == "Dr Two"
    assert people.Names(derm).of(e_uid) == "Dr Renamed"
    assert names.of(n_uid) == n_uid and names.of("bad/key") == "bad/key" and names.of(None) == "someone"
    # A patient cannot read a dermatologist's record, so their Names says the uid.
    p_uid, patient = user(settings, "patient", "pat")
    assert people.Names(patient).of(d_uid) == d_uid


# ---- recommendation templates, kept per dermatologist -------------------------------------------------


def test_templates_are_kept_per_dermatologist_and_checked(settings):
    d_uid, derm = user(settings, "dermatologist", "derm")
    e_uid, other = user(settings, "dermatologist", "derm2")
    p_uid, patient = user(settings, "patient", "pat")
    assert templates.load(derm, d_uid) == review.DEFAULT_TEMPLATES
    stored = templates.save(derm, d_uid, {"soon": "  Book within two weeks.  ", "urgent": ""})
    assert stored == {"soon": "Book within two weeks.", "urgent": ""}
    loaded = templates.load(derm, d_uid)  # as a later session loads them
    assert loaded == {**review.DEFAULT_TEMPLATES, "soon": "Book within two weeks.", "urgent": ""}
    # Bad input: a clear error, nothing stored (not even the good template in the same save).
    with pytest.raises(templates.TemplatesRefused, match=r"urgent template is limited to 4000 characters \(100000"):
        templates.save(derm, d_uid, {"routine": "Fine.", "urgent": "x" * 100_000})
    with pytest.raises(templates.TemplatesRefused, match="no urgency called 'later'"):
        templates.save(derm, d_uid, {"later": "x"})
    assert templates.load(derm, d_uid) == loaded
    # The rules, however the portal is bypassed: own only, 4000 characters, the three urgencies, no delete.
    path = cases.reviewer_templates_path(d_uid)
    assert refused(lambda: derm.set(f"{path}/urgent", "x" * 4001))
    assert refused(lambda: derm.set(f"{path}/later", "x"))
    assert refused(lambda: derm.set(f"{path}/soon", 5))
    assert refused(lambda: derm.delete(f"{path}/soon"))
    assert refused(lambda: derm.set(path, {"soon": "whole record"}))
    for db in (other, patient):
        assert refused(lambda db=db: db.get(path))
        assert refused(lambda db=db: db.set(f"{path}/soon", "hijacked"))
    assert refused(lambda: patient.set(f"{cases.reviewer_templates_path(p_uid)}/soon", "mine"))
    derm.set(f"{path}/urgent", "x" * 4000)
    assert templates.load(derm, d_uid)["soon"] == "Book within two weeks."
    with pytest.raises(cases.CaseError):
        cases.reviewer_templates_path(d_uid, "later")
