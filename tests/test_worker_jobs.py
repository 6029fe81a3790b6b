"""The worker's job queue on a real localbase through firebase-admin: claims are exclusive, leases
expire, outcomes are fenced and atomic, the sweep finds exactly the claimable jobs."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from firebase_admin import db

from cloud_worker.jobs import JobQueue, LeaseLost, claimable, now_ms


def _job(app, uid: str = "u1", **extra) -> str:
    case_id = "c" + uuid.uuid4().hex[:10]
    db.reference("/", app=app).update({
        f"cases/{uid}/{case_id}": {"caseId": case_id, "patientUid": uid, "status": "queued", "createdAt": now_ms()},
        f"jobs/{case_id}": {"uid": uid, "caseId": case_id, "createdAt": now_ms(), **extra},
    })
    return case_id


def test_only_one_of_many_concurrent_claims_wins(app):
    case_id = _job(app)
    queues = [JobQueue(app, f"w{i}") for i in range(6)]
    claims, barrier = [], threading.Barrier(len(queues))

    def go(q: JobQueue) -> None:
        barrier.wait()
        claims.append(q.claim(case_id))

    threads = [threading.Thread(target=go, args=(q,)) for q in queues]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [c for c in claims if c is not None]
    assert len(won) == 1
    job = db.reference(f"jobs/{case_id}", app=app).get()
    assert job["state"] == "running" and job["attempts"] == 1
    assert job["lease"]["token"] == won[0].token


def test_expired_lease_is_taken_over_and_the_stale_worker_is_fenced_out(app):
    case_id = _job(app)
    slow, other = JobQueue(app, "slow", lease_ms=300), JobQueue(app, "other", lease_ms=30_000)
    first = slow.claim(case_id)
    assert first is not None and other.claim(case_id) is None  # the lease is live
    time.sleep(0.4)
    second = other.claim(case_id)
    assert second is not None and second.attempt == 2
    with pytest.raises(LeaseLost):
        slow.complete(first, {"modelVersion": "stale"}, {"uid": "u1", "score": 0})
    other.complete(second, {"modelVersion": "fresh"}, {"uid": "u1", "status": "diagnosed", "score": 1.5})
    case = db.reference(f"cases/u1/{case_id}", app=app).get()
    assert case["cloud"] == {"modelVersion": "fresh"} and case["status"] == "diagnosed"
    job = db.reference(f"jobs/{case_id}", app=app).get()
    assert job["state"] == "done" and "lease" not in job
    assert db.reference(f"queue/{case_id}", app=app).get()["score"] == 1.5


def test_attempts_are_bounded(app):
    case_id = _job(app)
    q = JobQueue(app, "w", lease_ms=1, max_attempts=2)
    seen = []
    for _ in range(3):
        time.sleep(0.01)
        claim = q.claim(case_id)
        assert claim is not None
        seen.append((claim.attempt, claim.exhausted))
    assert seen == [(1, False), (2, False), (3, True)]


def test_retry_later_waits_for_its_backoff_and_release_does_not_count(app):
    case_id = _job(app)
    q = JobQueue(app, "w")
    claim = q.claim(case_id)
    q.retry_later(claim, 400, "missing_upload: not yet")
    job = db.reference(f"jobs/{case_id}", app=app).get()
    assert job["state"] == "queued" and job["error"] == "missing_upload: not yet"
    assert q.claim(case_id) is None  # backoff not over
    time.sleep(0.45)
    again = q.claim(case_id)
    assert again is not None and again.attempt == 2
    q.release(again)
    assert db.reference(f"jobs/{case_id}/attempts", app=app).get() == 1
    assert db.reference(f"cases/u1/{case_id}/status", app=app).get() == "queued"


def test_fail_records_a_reason_on_the_case(app):
    case_id = _job(app, uid="u2")
    q = JobQueue(app, "w")
    claim = q.claim(case_id)
    q.fail(claim, "corrupt_image", "image data is corrupt or truncated")
    case = db.reference(f"cases/u2/{case_id}", app=app).get()
    assert case["status"] == "failed"
    assert case["failure"]["reason"] == "corrupt_image" and case["failure"]["attempts"] == 1
    assert db.reference(f"jobs/{case_id}/state", app=app).get() == "failed"
    with pytest.raises(LeaseLost):  # settled: nothing more can be written under that claim
        q.renew(claim)


def test_sweep_lists_exactly_the_claimable_jobs(app):
    now = now_ms()
    new = _job(app)
    due = _job(app, state="queued", retryAt=now - 1)
    later = _job(app, state="queued", retryAt=now + 60_000)
    expired = _job(app, state="running", lease={"worker": "x", "token": "t", "expiresAt": now - 1})
    live = _job(app, state="running", lease={"worker": "x", "token": "t", "expiresAt": now + 60_000})
    done = _job(app, state="done")
    found = set(JobQueue(app, "w").due_job_ids())
    assert {new, due, expired} <= found
    assert not {later, live, done} & found


@pytest.mark.parametrize(("job", "expected"), [
    ({"uid": "u"}, True),
    ({"state": "queued", "retryAt": 10}, True),
    ({"state": "queued", "retryAt": 10_000}, False),
    ({"state": "running", "lease": {"expiresAt": 10}}, True),
    ({"state": "running", "lease": {"expiresAt": 10_000}}, False),
    ({"state": "done"}, False),
    ({"state": "failed"}, False),
    ("garbage", False),
])
def test_claimable(job, expected):
    assert claimable(job, now=1000) is expected


def test_download_verifies_size_and_hash(localbase):
    import hashlib

    from cloud_worker.errors import JobError
    from cloud_worker.fetch import download
    from dermaloop.storage import admin_bucket

    bucket = admin_bucket(localbase.settings())
    bucket.blob("fetch/zero").upload_from_string(b"", content_type="image/jpeg")
    bucket.blob("fetch/ten").upload_from_string(b"0123456789", content_type="image/jpeg")
    assert download(bucket, "fetch/zero", hashlib.sha256(b"").hexdigest()).data == b""
    assert download(bucket, "fetch/ten", hashlib.sha256(b"0123456789").hexdigest()).data == b"0123456789"
    cases = [("fetch/ten", hashlib.sha256(b"0123456789").hexdigest(), 5, "image_too_large", True),
             ("fetch/ten", hashlib.sha256(b"other").hexdigest(), 100, "hash_mismatch", False),
             ("fetch/missing", "0" * 64, 100, "missing_upload", False)]
    for path, digest, limit, reason, is_permanent in cases:
        with pytest.raises(JobError) as err:
            download(bucket, path, digest, max_bytes=limit)
        assert (err.value.reason, err.value.permanent) == (reason, is_permanent)
