"""Carrying out "delete my data" requests (issue 17): one job, beside the worker's job loop.

A patient cannot delete through the rules, so erasure is a request: the patient creates
``/erasures/{uid}`` (``{requestedAt}``) and this module, with admin rights, removes everything of
that uid and records the outcome on the request (``dermaloop.cases`` builds the paths and writes;
docs/ARCHITECTURE.md "Erasure").

How requests are found and shared between workers, as jobs are: a firebase-admin listener on
``/erasures`` hears a request at once, a periodic sweep (a query on ``state``) catches what a dropped
stream or a restart missed, and a request is claimed by a transaction that sets
``state: running`` and a ``lease`` (token, expiry). A worker that dies stops renewing; its lease
expires and the next sweep of any worker claims the request again. Every step can run again with the
same result, so a re-run finishes what a crash left. Each checkpoint (and the final ``done``) is
fenced: written only while the lease still carries our token.

What one erasure does, in order (:meth:`Eraser.erase`):

1. collects the patient's case ids (``/cases/{uid}``, ``/messages/{uid}``, jobs and queue entries
   whose ``uid`` is theirs, the last run's ids, and the folders under ``cases/{uid}/`` in Storage);
2. deletes the jobs of those cases that no worker is running now, and waits (a bounded time) for the
   ones a worker holds a live lease on to settle, then deletes them too. With the job gone no fenced
   outcome can land, and ``cloud_worker/jobs.py`` checks the case still exists before it writes one,
   so a result that was being computed cannot recreate the case;
3. one atomic multi-path update: ``/cases/{uid}``, ``/messages/{uid}``, ``/users/{uid}``, the queue
   entries, claims and review histories of those cases (each only if it names this uid), the
   dermatologists' read marks of them, and a tombstone ``/erased/{caseId}`` per case;
4. every Storage object under ``cases/{uid}/`` (photos, heatmaps);
5. the Auth account (``auth.delete_user``; an account that is already gone is fine);
6. steps 1-4 once more, for anything that raced in (a heatmap upload, a write with a token that was
   still valid), and finally ``state: done``, ``doneAt`` and ``counts`` on the request, which stays
   (it holds no personal data beyond the uid) so the app can be told it is done.

Nothing of another patient is touched: a job, queue entry, claim or review history is deleted only
when it names this uid (or, for a job left half-written by a racing outcome, names no one), and
Storage is listed under this uid's own prefix.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from firebase_admin import auth as admin_auth
from firebase_admin import db
from firebase_admin import exceptions as fb_exceptions
from google.api_core.exceptions import NotFound

from cloud_worker.jobs import claimable, now_ms
from dermaloop import cases
from dermaloop.admin_listen import close_listener, listener_alive
from dermaloop.cases import ErasureState

log = logging.getLogger("cloud_worker")

REQUESTED, RUNNING, DONE = ErasureState.REQUESTED.value, ErasureState.RUNNING.value, ErasureState.DONE.value


@dataclass(frozen=True)
class ErasureConfig:
    lease_ms: int = 120_000  # the request's lease; renewed at every checkpoint and while waiting
    sweep_interval_s: float = 5.0  # the sweep for requests the listener missed (and expired leases)
    job_wait_s: float = 120.0  # longest wait for a job a worker is running on one of the cases
    poll_s: float = 0.25  # how often the live jobs are looked at again while waiting


@dataclass(frozen=True)
class ErasureClaim:
    """An erasure request this process holds the lease on."""

    uid: str
    token: str
    attempt: int  # 1 for the first claim; more after a crash or a stop mid-way
    counts: dict[str, int]  # what earlier attempts removed already
    case_ids: frozenset[str]  # the case ids earlier attempts collected


class ErasureLost(RuntimeError):
    """Our lease on the request was taken over (we stalled past it) or the request vanished."""


class _Abort(Exception):
    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


class _Stopped(Exception):
    """The process is stopping: leave the request for the next claim (every step can run again)."""


def claimable_request(record: Any, now: int) -> bool:
    """Whether an ``/erasures/{uid}`` record is a request some worker should carry out now: asked for
    and not done, and not held by a live lease."""
    state = cases.erasure_state(record)
    if state is None or state == ErasureState.DONE:
        return False
    if state == ErasureState.RUNNING:
        lease = record.get("lease")
        expires = lease.get("expiresAt", 0) if isinstance(lease, dict) else 0
        return not isinstance(expires, int | float) or expires <= now
    return True


def _zero_counts() -> dict[str, int]:
    return dict.fromkeys(cases.ERASURE_COUNTS, 0)


def _fields(**kw: Any) -> dict[str, Any]:
    return {"fields": kw}


@dataclass
class _Found:
    """What one pass found to remove (case ids and what belongs to this uid)."""

    owned: set[str] = field(default_factory=set)  # case ids provably this patient's
    in_storage: set[str] = field(default_factory=set)  # case folders under cases/{uid}/ in Storage
    cases: int = 0


class Eraser:
    """Listens for erasure requests and carries them out, one at a time, on its own threads
    (:meth:`start`, :meth:`stop`); :meth:`erase` does one request in the caller's thread."""

    def __init__(self, app, bucket, worker_id: str, config: ErasureConfig | None = None) -> None:
        self.app = app
        self.bucket = bucket
        self.worker_id = worker_id
        self.config = config or ErasureConfig()
        self._stop = threading.Event()
        self._candidates: queue.Queue[str] = queue.Queue()
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._listener = None
        self._indexed: dict[str, bool] = {}

    def ref(self, path: str = "/") -> db.Reference:
        return db.reference(path, app=self.app)

    # ---- life cycle -------------------------------------------------------------------------
    def start(self) -> Eraser:
        """Listen and sweep in the background (returns at once; an unreachable database is retried)."""
        self._stop.clear()
        self._listen()
        for target, name in ((self._run, "erasure"), (self._sweeper, "erasure-sweeper")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop listening and claiming. An erasure in progress stops at its next step and hands its
        request back (the lease is dropped), so the next worker carries it on at once."""
        self._stop.set()
        listener, self._listener = self._listener, None
        close_listener(listener)
        for thread in self._threads:
            thread.join(timeout)
        self._threads.clear()
        listener, self._listener = self._listener, None  # one the sweeper opened meanwhile
        close_listener(listener)

    # ---- discovery --------------------------------------------------------------------------
    def _listen(self) -> None:
        try:
            self._listener = self.ref("erasures").listen(self._on_event)
        except Exception as exc:  # the sweeper listens again
            log.warning("erasure listener could not start", extra=_fields(error=str(exc)))

    def _on_event(self, event) -> None:
        """``put`` of the whole tree (connect), of one request or field, or a ``patch`` whose keys
        may be deeper paths. A request is offered when it could be claimed."""
        try:
            now = now_ms()
            base = [p for p in (event.path or "/").split("/") if p]
            if not base:
                changes = event.data if isinstance(event.data, dict) else {}
            else:
                changes = {"/".join(base): event.data}
            for key, value in changes.items():
                parts = [p for p in key.split("/") if p]
                whole = len(parts) == 1 and claimable_request(value, now)
                if whole or (parts[1:] == ["requestedAt"] and value is not None):
                    self.offer(parts[0])
        except Exception:  # an exception would end firebase-admin's listener thread
            log.exception("erasure event handling failed")

    def offer(self, uid: str) -> None:
        if not isinstance(uid, str) or not uid or self._stop.is_set():
            return
        with self._lock:
            if uid in self._pending:
                return
            self._pending.add(uid)
        self._candidates.put(uid)

    def due(self, now: int | None = None) -> list[str]:
        """The uids whose request any worker may claim now (the sweep)."""
        now = now_ms() if now is None else now
        root = self.ref("erasures")
        found: dict[str, Any] = {}
        try:
            found.update(root.order_by_child("state").end_at("").get() or {})
            for state in (REQUESTED, RUNNING):
                found.update(root.order_by_child("state").equal_to(state).get() or {})
        except fb_exceptions.FirebaseError as exc:
            if "Index not defined" not in str(exc):
                raise
            found = root.get() or {}
        return sorted(uid for uid, record in found.items() if claimable_request(record, now))

    def _sweeper(self) -> None:
        while True:
            try:
                if self._listener is None or not listener_alive(self._listener):
                    if self._listener is not None:
                        log.warning("erasure listener died; listening again")
                    close_listener(self._listener)
                    self._listener = None
                    if not self._stop.is_set():
                        self._listen()
                for uid in self.due():
                    self.offer(uid)
            except Exception as exc:
                log.warning("erasure sweep failed", extra=_fields(error=str(exc)))
            if self._stop.wait(self.config.sweep_interval_s):
                return

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                uid = self._candidates.get(timeout=0.2)
            except queue.Empty:
                continue
            with self._lock:
                self._pending.discard(uid)
            try:
                self.erase(uid)
            except Exception:
                log.exception("erasure failed; the next sweep tries again", extra=_fields(uid=uid))

    # ---- the request's lease -------------------------------------------------------------------
    def claim(self, uid: str) -> ErasureClaim | None:
        """Take the request of ``uid`` if it may be claimed now; None if there is none, it is done,
        or another worker holds it."""
        token = uuid.uuid4().hex
        seen: dict[str, Any] = {}

        def update(record: Any) -> Any:
            now = now_ms()
            if not claimable_request(record, now):
                raise _Abort("not claimable")
            seen.clear()
            seen.update(record)
            new = dict(record)
            new.update(state=RUNNING, attempts=int(record.get("attempts") or 0) + 1,
                       lease={"worker": self.worker_id, "token": token, "expiresAt": now + self.config.lease_ms})
            new.setdefault("startedAt", now)
            return new

        try:
            self.ref(cases.erasure_path(uid)).transaction(update)
        except _Abort:
            return None
        counts = _zero_counts()
        earlier = seen.get("counts")
        if isinstance(earlier, dict):
            counts.update({k: int(v) for k, v in earlier.items() if k in counts and isinstance(v, int | float)})
        ids = seen.get("caseIds")
        return ErasureClaim(uid, token, int(seen.get("attempts") or 0) + 1, counts,
                            frozenset(ids) if isinstance(ids, dict) else frozenset())

    def _fence(self, claim: ErasureClaim, counts: dict[str, int] | None = None, case_ids: set[str] | None = None,
               done: bool = False, release: bool = False) -> None:
        """Check our lease still holds and, in the same transaction, extend it and record progress
        (or hand the request back, or mark it done). Raises :class:`ErasureLost` otherwise."""

        def update(record: Any) -> Any:
            lease = record.get("lease") if isinstance(record, dict) else None
            if (not isinstance(lease, dict) or lease.get("token") != claim.token
                    or record.get("state") != RUNNING):
                raise _Abort("lease lost")
            now = now_ms()
            new = dict(record)
            if counts is not None:
                new["counts"] = dict(counts)
            if case_ids:  # the ids found so far, so a re-run after a crash still knows them
                new["caseIds"] = {**(record.get("caseIds") or {}), **dict.fromkeys(sorted(case_ids), True)}
            if done:
                new.update(state=DONE, doneAt=now)
                new.pop("lease", None)
                new.pop("caseIds", None)
            elif release:
                new["lease"] = dict(lease, expiresAt=0)
            else:
                new["lease"] = dict(lease, expiresAt=now + self.config.lease_ms)
            return new

        try:
            self.ref(cases.erasure_path(claim.uid)).transaction(update)
        except _Abort as exc:
            raise ErasureLost(f"erasure of {claim.uid}: {exc.why}") from None

    def _check(self, claim: ErasureClaim) -> None:
        if self._stop.is_set():
            raise _Stopped
        self._fence(claim)

    # ---- one erasure ----------------------------------------------------------------------------
    def erase(self, uid: str) -> dict[str, int] | None:
        """Claim the request of ``uid`` and carry it out; the counts when done, None if it was not
        ours to do (not claimable, lost to another worker, or this process is stopping)."""
        claim = self.claim(uid)
        if claim is None:
            return None
        log.info("erasure started", extra=_fields(uid=uid, attempt=claim.attempt))
        counts = dict(claim.counts)
        tombstoned: set[str] = set()
        try:
            ids = self._pass(claim, counts, tombstoned, set(claim.case_ids))
            self._check(claim)
            counts["account"] += self._delete_account(uid)
            self._fence(claim, counts)
            self._pass(claim, counts, tombstoned, ids)  # whatever raced in meanwhile
            self._fence(claim, counts, done=True)
        except ErasureLost as exc:
            log.warning("erasure lease lost; another worker carries it on", extra=_fields(uid=uid, error=str(exc)))
            return None
        except _Stopped:
            with contextlib.suppress(Exception):
                self._fence(claim, counts, release=True)
            log.info("erasure handed back (stopping)", extra=_fields(uid=uid))
            return None
        except Exception:  # e.g. the backend went away: hand it back, the next sweep tries again
            with contextlib.suppress(Exception):
                self._fence(claim, counts, release=True)
            raise
        log.info("erasure done", extra=_fields(uid=uid, **counts))
        return counts

    def _pass(self, claim: ErasureClaim, counts: dict[str, int], tombstoned: set[str], known: set[str]) -> set[str]:
        """Steps 1-4 once; returns the patient's case ids seen so far."""
        uid = claim.uid
        found = self._collect(uid, known)
        self._fence(claim, counts, case_ids=found.owned)
        counts["jobs"] += self._settle_jobs(claim, uid, found.owned)
        self._check(claim)
        counts["cases"] += found.cases
        self._delete_records(uid, found.owned, counts, tombstoned)
        self._fence(claim, counts)
        self._delete_objects(uid, counts)
        self._fence(claim, counts)
        return found.owned

    def _collect(self, uid: str, known: set[str]) -> _Found:
        found = _Found()
        case_keys = self.ref(cases.patient_cases_path(uid)).get(shallow=True)
        if isinstance(case_keys, dict):
            found.cases = len(case_keys)
            found.owned |= set(case_keys)
        chats = self.ref(f"messages/{uid}").get(shallow=True)
        if isinstance(chats, dict):
            found.owned |= set(chats)
        found.owned |= set(self._by_uid("jobs", uid)) | set(self._by_uid("queue", uid))
        found.owned |= known
        prefix = cases.patient_folder(uid)
        for blob in self.bucket.list_blobs(prefix=prefix):
            case_id = blob.name[len(prefix):].split("/")[0]
            if case_id:
                found.in_storage.add(case_id)
        found.owned = {c for c in found.owned if _valid_key(c)}
        return found

    def _by_uid(self, root: str, uid: str) -> dict[str, Any]:
        """The children of ``/{root}`` whose ``uid`` is this patient's: a query where the rules index
        ``uid`` there, else a read of the whole node (erasures are rare)."""
        ref = self.ref(root)
        if self._indexed.get(root, True):
            try:
                return ref.order_by_child("uid").equal_to(uid).get() or {}
            except fb_exceptions.FirebaseError as exc:
                if "Index not defined" not in str(exc):
                    raise
                self._indexed[root] = False
        everything = ref.get() or {}
        if not isinstance(everything, dict):
            return {}
        return {k: v for k, v in everything.items() if isinstance(v, dict) and v.get("uid") == uid}

    def _settle_jobs(self, claim: ErasureClaim, uid: str, case_ids: set[str]) -> int:
        """Delete the jobs of these cases: at once where no worker holds a live lease, else once it
        settles or ``job_wait_s`` has passed. A claim racing the delete then finds no job."""
        deleted = 0
        waiting = set(case_ids)
        reported: set[str] = set()
        deadline = time.monotonic() + self.config.job_wait_s
        while waiting:
            force = time.monotonic() >= deadline
            for case_id in sorted(waiting):
                outcome = self._delete_job(uid, case_id, force)
                if outcome != "live":
                    waiting.discard(case_id)
                    deleted += outcome == "deleted"
            if not waiting:
                break
            if waiting != reported:
                reported = set(waiting)
                log.info("erasure waits for jobs a worker is running", extra=_fields(uid=uid, jobs=sorted(waiting)))
            self._check(claim)
            if self._stop.wait(self.config.poll_s):
                raise _Stopped
        return deleted

    def _delete_job(self, uid: str, case_id: str, force: bool) -> str:
        """Delete one job unless a worker holds a live lease on it ("live"). Not conditional (the
        Admin SDK deletes only unconditionally): a worker that claims the job between the read and
        the delete finds it gone at its next fenced step (``CaseGone``) and writes nothing."""
        job_ref = self.ref(cases.job_path(case_id))
        job = job_ref.get()
        if job is None:
            return "absent"
        owner = job.get("uid") if isinstance(job, dict) else None
        if owner not in (None, uid):
            return "foreign"  # someone else's case id: not ours to touch
        if not force and isinstance(job, dict) and job.get("state") == "running" and not claimable(job, now_ms()):
            return "live"
        job_ref.delete()
        return "deleted"

    def _delete_records(self, uid: str, owned: set[str], counts: dict[str, int], tombstoned: set[str]) -> None:
        """Step 3: one atomic multi-path update (with the tombstones)."""
        queue_ids, claim_ids, history_ids, reads = [], [], [], []
        for case_id in sorted(owned):
            entry = self.ref(cases.queue_path(case_id)).get()
            if isinstance(entry, dict) and entry.get("uid") in (None, uid):
                queue_ids.append(case_id)
            held = self.ref(cases.claim_path(case_id)).get()
            if isinstance(held, dict) and held.get("patientUid") in (None, uid):
                claim_ids.append(case_id)
            history = self.ref(cases.review_history_path(case_id)).get()
            if isinstance(history, dict) and all(
                    not isinstance(e, dict) or e.get("patientUid") in (None, uid) for e in history.values()):
                history_ids.append(case_id)
                counts["reviewHistory"] += len(history)
        readers = self.ref("reads").get(shallow=True)
        for reader in sorted(readers) if isinstance(readers, dict) else ():
            marked = self.ref(f"reads/{reader}").get(shallow=True)
            if isinstance(marked, dict) and _valid_key(reader):
                reads += [(reader, case_id) for case_id in sorted(owned & set(marked))]
        chats = self.ref(f"messages/{uid}").get()
        if isinstance(chats, dict):
            counts["messages"] += sum(len(chat) for chat in chats.values() if isinstance(chat, dict))
        counts["user"] += int(self.ref(cases.user_path(uid)).get(shallow=True) is not None)
        counts["queue"] += len(queue_ids)
        counts["claims"] += len(claim_ids)
        counts["reads"] += len(reads)
        for case_id in sorted(owned - tombstoned):  # an earlier attempt's tombstone keeps its time
            if self.ref(cases.erased_path(case_id)).get(shallow=True) is not None:
                tombstoned.add(case_id)
        new_tombstones = sorted(owned - tombstoned)
        counts["tombstones"] += len(new_tombstones)
        writes = cases.erasure_writes(uid, tombstones=new_tombstones, queue=queue_ids, claims=claim_ids,
                                      history=history_ids, reads=reads, now=now_ms())
        self.ref("/").update(writes)
        tombstoned.update(new_tombstones)

    def _delete_objects(self, uid: str, counts: dict[str, int]) -> None:
        """Step 4: every object under ``cases/{uid}/`` (photos, heatmaps, anything else)."""
        for blob in list(self.bucket.list_blobs(prefix=cases.patient_folder(uid))):
            name = blob.name.rsplit("/", 1)[-1]
            kind = {"image.jpg": "images", "heatmap.png": "heatmaps"}.get(name, "files")
            try:
                blob.delete()
            except NotFound:
                continue
            counts[kind] += 1

    def _delete_account(self, uid: str) -> int:
        """Step 5: the Auth account (1 if there was one to delete)."""
        try:
            admin_auth.delete_user(uid, app=self.app)
        except admin_auth.UserNotFoundError:
            return 0
        return 1


def _valid_key(value: Any) -> bool:
    return isinstance(value, str) and bool(value) and not any(c in value for c in "/.#$[]")
