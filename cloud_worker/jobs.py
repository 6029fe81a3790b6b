"""The ``/jobs`` work queue in the Realtime Database: claiming with leases, and fenced outcomes.

Why transactions and leases: several workers (processes or machines) watch the same queue. A job is
claimed by an RTDB transaction that sets ``lease = {worker, token, expiresAt}``; only one transaction
can win for a given state of the job, so only one worker holds a live lease. A worker that dies
stops renewing, its lease expires, and the next sweep of any worker claims the job again (counting
an attempt, so a job that kills every worker that touches it ends as failed instead of looping).

Every outcome (result, failure, retry later, release) is *fenced*: a transaction first checks that
the lease still carries our token and extends it, and only then is the outcome written, in one
atomic multi-path update that moves the job and the case together. A worker that stalled past its
lease therefore cannot overwrite the work of the worker that took over, and a crash can never leave
a diagnosed case with a job that is still queued (or the reverse).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from firebase_admin import db
from firebase_admin import exceptions as fb_exceptions

from dermaloop import cases
from dermaloop.cases import JobState, Status

QUEUED, RUNNING = JobState.QUEUED.value, JobState.RUNNING.value


def now_ms() -> int:
    return int(time.time() * 1000)


class _Abort(Exception):
    """Raised inside a transaction function to leave the job untouched."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


class LeaseLost(RuntimeError):
    """Our lease was taken over (we stalled past its expiry) or the job vanished: drop the work."""


class CaseGone(LeaseLost):
    """The job or its case is no longer there: the patient's data was erased (issue 17,
    ``cloud_worker/erasure.py``), the only thing that deletes them. Drop the work and write
    nothing: an outcome's multi-path update would otherwise recreate part of the case, its job
    and its queue entry."""


@dataclass(frozen=True)
class Claim:
    """A job this worker holds a lease on."""

    case_id: str
    uid: str
    token: str
    attempt: int  # 1 for the first claim
    exhausted: bool  # attempts were already used up: the job must be failed, not processed
    last_error: str
    created_at: int | None


def claimable(job: Any, now: int) -> bool:
    """Whether a job may be claimed now (queued and due, or running with an expired lease)."""
    if not isinstance(job, dict):
        return False
    state = job.get("state", QUEUED)  # a job from an older client may carry no state yet
    if state == QUEUED:
        retry_at = job.get("retryAt") or 0
        return not isinstance(retry_at, (int, float)) or retry_at <= now
    if state == RUNNING:
        lease = job.get("lease") or {}
        expires = lease.get("expiresAt", 0) if isinstance(lease, dict) else 0
        return not isinstance(expires, (int, float)) or expires <= now
    return False


class JobQueue:
    """Claims and settles jobs for one worker identity."""

    def __init__(self, app, worker_id: str, lease_ms: int = 30_000, max_attempts: int = 3) -> None:
        self.app = app
        self.worker_id = worker_id
        self.lease_ms = lease_ms
        self.max_attempts = max_attempts
        self._indexed = True
        self.open_count: int | None = None

    def ref(self, path: str = "/") -> db.Reference:
        return db.reference(path, app=self.app)

    # ---- discovery -------------------------------------------------------------------------
    def _open_jobs(self) -> dict[str, Any]:
        """Jobs that are not settled: new (no state yet), queued or running.

        Uses the ``state`` index (null sorts first in RTDB's order, so ``endAt("")`` returns the jobs
        without a state). Where the rules define no index it falls back to reading all of ``/jobs``.
        """
        jobs = self.ref("jobs")
        if self._indexed:
            try:
                found: dict[str, Any] = {}
                found.update(jobs.order_by_child("state").end_at("").get() or {})
                for state in (QUEUED, RUNNING):
                    found.update(jobs.order_by_child("state").equal_to(state).get() or {})
                return found
            except fb_exceptions.FirebaseError as exc:
                if "Index not defined" not in str(exc):
                    raise
                self._indexed = False  # rules without .indexOn state: slower but correct
        everything = jobs.get() or {}
        return {k: v for k, v in everything.items() if isinstance(v, dict) and v.get("state", QUEUED) in (QUEUED, RUNNING)}

    def due_job_ids(self, now: int | None = None) -> list[str]:
        """Jobs any worker may claim now: the sweep that catches what the listener missed."""
        now = now_ms() if now is None else now
        open_jobs = self._open_jobs()
        self.open_count = len(open_jobs)
        due = [case_id for case_id, job in open_jobs.items() if claimable(job, now)]
        return sorted(due)  # push ids sort by creation time: oldest first

    def queue_depth(self) -> int:
        """Jobs waiting or in progress, as of the last sweep (for the metrics; no extra read)."""
        return self.open_count if self.open_count is not None else len(self._open_jobs())

    # ---- claiming --------------------------------------------------------------------------
    def claim(self, case_id: str) -> Claim | None:
        """Take a lease on a job if it is claimable; ``None`` if someone else has it or it is settled."""
        token = uuid.uuid4().hex
        seen: dict[str, Any] = {}

        def update(job: Any) -> Any:
            now = now_ms()
            if not claimable(job, now):
                raise _Abort("not claimable")
            attempts = int(job.get("attempts") or 0)
            seen.update(job)
            new = dict(job)
            new.update(
                state=RUNNING,
                lease={"worker": self.worker_id, "token": token, "expiresAt": now + self.lease_ms},
                attempts=attempts + 1,
                updatedAt=now,
            )
            new.pop("retryAt", None)
            return new

        try:
            self.ref(cases.job_path(case_id)).transaction(update)
        except _Abort:
            return None
        attempts = int(seen.get("attempts") or 0)
        uid = seen.get("uid")
        created = seen.get("createdAt")
        return Claim(
            case_id=case_id,
            uid=uid if isinstance(uid, str) else "",
            token=token,
            attempt=attempts + 1,
            exhausted=attempts >= self.max_attempts,
            last_error=str(seen.get("error") or ""),
            created_at=created if isinstance(created, (int, float)) else None,
        )

    def _fence(self, claim: Claim, extend_ms: int | None = None, release_attempt: bool = False) -> None:
        """Check our lease still holds and extend it, atomically; raises ``LeaseLost`` otherwise."""

        def update(job: Any) -> Any:
            if job is None:
                raise _Abort("job gone")
            lease = job.get("lease") if isinstance(job, dict) else None
            if not isinstance(lease, dict) or lease.get("token") != claim.token or job.get("state") != RUNNING:
                raise _Abort("lease lost")
            new = dict(job)
            new["lease"] = dict(lease, expiresAt=now_ms() + (extend_ms or self.lease_ms))
            if release_attempt:
                new["attempts"] = max(0, int(job.get("attempts") or 1) - 1)
            return new

        try:
            self.ref(cases.job_path(claim.case_id)).transaction(update)
        except _Abort as exc:
            if exc.why == "job gone":
                raise CaseGone(f"job {claim.case_id}: the job is gone (erased)") from None
            raise LeaseLost(f"job {claim.case_id}: {exc.why}") from None

    def renew(self, claim: Claim) -> None:
        self._fence(claim)

    def _case_still_there(self, claim: Claim) -> None:
        """The resurrection guard: after the fence, an outcome that writes into the case first checks
        the case still exists. An erasure deletes the job first and waits for live leases
        (``cloud_worker/erasure.py``), so this covers a fence that passed just before that."""
        if self.ref(f"{cases.case_path(claim.uid, claim.case_id)}/caseId").get() is None:
            raise CaseGone(f"job {claim.case_id}: the case is gone (erased)")

    # ---- outcomes (each one fenced, then one atomic multi-path update from the case domain) ---
    def complete(self, claim: Claim, cloud: dict[str, Any], queue_entry: dict[str, Any]) -> None:
        """Write the cloud result, move the case to ``diagnosed`` and the job to ``done``, at once."""
        self._fence(claim)
        self._case_still_there(claim)
        self.ref("/").update(cases.diagnosed_writes(claim.uid, claim.case_id, cloud, queue_entry, now_ms()))

    def fail(self, claim: Claim, reason: str, detail: str, case_exists: bool = True,
             queue_entry: dict[str, Any] | None = None) -> None:
        """Give up on a job: the case shows ``failed`` with a reason the patient app can explain
        and, with ``queue_entry``, waits in the dermatologists' queue."""
        self._fence(claim)
        if case_exists:
            self._case_still_there(claim)
        self.ref("/").update(cases.failed_writes(claim.uid, claim.case_id, reason, detail, claim.attempt, now_ms(),
                                                 case_exists=case_exists, entry=queue_entry))

    def mark_done(self, claim: Claim) -> None:
        """The case was already diagnosed (a crash came between result and bookkeeping): just settle."""
        self._fence(claim)
        self.ref("/").update(cases.done_writes(claim.case_id, now_ms()))

    def set_processing(self, claim: Claim) -> None:
        """Show the patient that the cloud has the case. A transaction, so that a worker that stalled
        past its lease can never move a case that another worker already diagnosed back."""

        def update(status: Any) -> Any:
            if status is None:  # no case (erased): writing the status would recreate it
                raise _Abort("case gone")
            if status not in (Status.QUEUED, Status.PROCESSING):
                raise _Abort(f"case is {status}")
            return Status.PROCESSING.value

        try:
            self.ref(f"{cases.case_path(claim.uid, claim.case_id)}/status").transaction(update)
        except _Abort as exc:
            if exc.why == "case gone":
                raise CaseGone(f"job {claim.case_id}: the case is gone (erased)") from None
            raise LeaseLost(f"job {claim.case_id}: {exc.why}") from None

    def retry_later(self, claim: Claim, delay_ms: int, error: str) -> None:
        """Put the job back with a backoff; the attempt stays counted."""
        self._fence(claim)
        self._case_still_there(claim)
        now = now_ms()
        self.ref("/").update(cases.requeue_writes(claim.uid, claim.case_id, now, retry_at=now + delay_ms, error=error))

    def release(self, claim: Claim) -> None:
        """Hand a job back untouched (graceful shutdown): it does not count as an attempt."""
        self._fence(claim, release_attempt=True)
        self._case_still_there(claim)
        self.ref("/").update(cases.requeue_writes(claim.uid, claim.case_id, now_ms()))
