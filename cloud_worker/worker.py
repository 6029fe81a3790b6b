"""The worker's moving parts: discovery, claiming, the download/inference/write pipeline, shutdown.

Threads and why:
- a firebase-admin listener on ``/jobs`` hears new jobs at once; a periodic sweep (a query on
  ``state``) catches what a dropped stream, a restart or an expired lease left behind;
- a claimer takes candidates and claims them (transaction + lease) while it has free slots
  (``concurrency`` jobs in flight at most: back-pressure for memory and for other workers);
- a download pool fetches, verifies and decodes images, so I/O overlaps inference;
- one inference thread collects whatever is ready into a micro-batch (up to ``batch_size``,
  waiting at most ``batch_wait_ms`` while more claimed jobs are still downloading) and makes one
  model call for all of them;
- a writer pool uploads heatmaps and commits results;
- a renewer keeps leases alive while jobs are in flight; a heartbeat publishes metrics.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from firebase_admin import db

from cloud_worker import triage
from cloud_worker.errors import JobError, permanent, transient
from cloud_worker.fetch import download, expected_image
from cloud_worker.jobs import CaseGone, Claim, JobQueue, LeaseLost, claimable, now_ms
from cloud_worker.metrics import Metrics
from cloud_worker.pipeline import Analysis, Inferred, Prepared, heatmap_png, infer, prepare, record
from cloud_worker.registry import ModelProvider
from dermaloop import cases
from dermaloop.admin_listen import close_listener

log = logging.getLogger("cloud_worker")


@dataclass(frozen=True)
class WorkerConfig:
    concurrency: int = 16  # jobs in flight in this process
    batch_size: int = 16  # most images per model call (1 = one at a time)
    batch_wait_ms: int = 30  # how long a batch may wait for claimed jobs still downloading
    lease_ms: int = 30_000
    max_attempts: int = 3
    backoff_ms: int = 2_000  # first retry delay; doubles per attempt, with jitter
    sweep_interval_s: float = 5.0
    heartbeat_s: float = 5.0
    shutdown_grace_s: float = 10.0
    heatmaps: bool = True
    fault_hold_s: float = 0.0  # fault injection for crash tests: hold each job mid-way (after download)


@dataclass
class _Work:
    claim: Claim
    case: dict[str, Any]
    prepared: Prepared
    started: float = field(default_factory=time.perf_counter)


def _fields(**kw: Any) -> dict[str, Any]:
    return {"fields": kw}


class Worker:
    def __init__(self, app, bucket, jobs: JobQueue, models: ModelProvider, analysis: Analysis,
                 config: WorkerConfig | None = None) -> None:
        self.app = app
        self.bucket = bucket
        self.jobs = jobs
        self.models = models
        self.analysis = analysis
        self.config = config or WorkerConfig()
        self.worker_id = jobs.worker_id
        self.metrics = Metrics()
        self.started_at = now_ms()
        self._stop = threading.Event()  # no new claims
        self._halt = threading.Event()  # every thread exits
        self._slots = threading.BoundedSemaphore(self.config.concurrency)
        self._candidates: queue.Queue[str] = queue.Queue()
        self._pending: set[str] = set()
        self._inflight: dict[str, Claim] = {}
        self._front = 0  # claimed jobs still downloading/decoding
        self._lock = threading.Lock()
        self._ready: queue.Queue[_Work] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._listener = None
        from concurrent.futures import ThreadPoolExecutor

        self._fetch_pool = ThreadPoolExecutor(self.config.concurrency, thread_name_prefix="fetch")
        self._write_pool = ThreadPoolExecutor(max(2, self.config.concurrency // 2), thread_name_prefix="write")

    # ---- life cycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._listen()
        for target, name in ((self._claimer, "claimer"), (self._batcher, "inference"),
                             (self._sweeper, "sweeper"), (self._renewer, "renewer"), (self._heartbeat, "heartbeat")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        self._publish("running")

    def stop(self) -> None:
        """Graceful: stop claiming, let in-flight jobs finish within the grace time, release the rest."""
        if self._stop.is_set():
            return
        self._stop.set()
        log.info("stopping", extra=_fields(inflight=len(self._inflight)))
        self._close_listener()
        deadline = time.monotonic() + self.config.shutdown_grace_s
        while self._inflight and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._lock:
            leftovers = list(self._inflight.values())
        for claim in leftovers:
            try:
                self.jobs.release(claim)
                self.metrics.add("released")
                log.info("lease released", extra=_fields(caseId=claim.case_id))
            except LeaseLost:
                pass
            except Exception as exc:  # the lease will expire and another worker takes the job
                log.warning("could not release lease", extra=_fields(caseId=claim.case_id, error=str(exc)))
        self._halt.set()
        self._fetch_pool.shutdown(wait=False, cancel_futures=True)
        self._write_pool.shutdown(wait=False, cancel_futures=True)
        for thread in self._threads:
            thread.join(timeout=2)
        self._publish("stopped")
        log.info("stopped", extra=_fields(**self.metrics.snapshot()))

    # ---- discovery --------------------------------------------------------------------------
    def _offer(self, case_id: str) -> None:
        if not isinstance(case_id, str) or not case_id or self._stop.is_set():
            return
        with self._lock:
            if case_id in self._pending or case_id in self._inflight:
                return
            self._pending.add(case_id)
        self._candidates.put(case_id)

    def _on_event(self, event) -> None:
        """Offer jobs that an event shows as claimable. Events arrive as a ``put`` of the whole
        queue (connect, reconnect), a ``put`` of one job or field, or a ``patch`` whose keys may be
        deeper paths (multi-path writes: ``"{caseId}/state"``)."""
        try:
            now = now_ms()
            base = [p for p in (event.path or "/").split("/") if p]
            changes = event.data if not base and isinstance(event.data, dict) else {"/".join(base): event.data}
            if not base and event.event_type == "put" and not isinstance(event.data, dict):
                return  # the whole queue is empty
            for key, value in changes.items():
                parts = [p for p in key.split("/") if p]
                if not parts:
                    continue
                if len(parts) == 1:
                    if isinstance(value, dict) and ("state" in value or "uid" in value) and claimable(value, now):
                        self._offer(parts[0])
                elif parts[1:] == ["state"] and value == cases.JobState.QUEUED:
                    self._offer(parts[0])
        except Exception:  # an exception would kill firebase-admin's listener thread
            log.exception("job event handling failed")

    def _listen(self) -> None:
        self._listener = db.reference("jobs", app=self.app).listen(self._on_event)

    def _close_listener(self) -> None:
        listener, self._listener = self._listener, None
        close_listener(listener)

    def _sweeper(self) -> None:
        while not self._stop.wait(self.config.sweep_interval_s):
            try:
                listener = self._listener
                if listener is not None and not listener._thread.is_alive():
                    log.warning("jobs listener died; reconnecting")
                    self._listen()
                for case_id in self.jobs.due_job_ids():
                    self._offer(case_id)
            except Exception as exc:
                log.warning("sweep failed", extra=_fields(error=str(exc)))

    def sweep_now(self) -> None:
        for case_id in self.jobs.due_job_ids():
            self._offer(case_id)

    # ---- claiming ---------------------------------------------------------------------------
    def _claimer(self) -> None:
        while not self._stop.is_set():
            try:
                case_id = self._candidates.get(timeout=0.2)
            except queue.Empty:
                continue
            with self._lock:
                self._pending.discard(case_id)
            while not self._slots.acquire(timeout=0.2):
                if self._stop.is_set():
                    return
            try:
                claim = self.jobs.claim(case_id)
            except Exception as exc:
                log.warning("claim failed", extra=_fields(caseId=case_id, error=str(exc)))
                claim = None
            if claim is None:
                self._slots.release()
                continue
            if self._stop.is_set():  # stopped while claiming: hand it straight back
                with self._lock:
                    self._inflight[case_id] = claim
                self._end(claim, release=True)
                continue
            self.metrics.add("claimed")
            with self._lock:
                self._inflight[case_id] = claim
                self._front += 1
            log.info("claimed", extra=_fields(caseId=case_id, attempt=claim.attempt))
            self._fetch_pool.submit(self._front_stage, claim)

    def _end(self, claim: Claim, release: bool = False) -> None:
        """A job leaves this worker: free its slot exactly once."""
        if release:
            try:
                self.jobs.release(claim)
            except Exception as exc:  # the lease expires on its own
                log.warning("could not release lease", extra=_fields(caseId=claim.case_id, error=str(exc)))
        with self._lock:
            present = self._inflight.get(claim.case_id) is claim
            if present:
                del self._inflight[claim.case_id]
        if present:
            self._slots.release()

    # ---- stage 1: case, download, verify, decode, checks -------------------------------------
    def _front_stage(self, claim: Claim) -> None:
        handed_over = False
        try:
            t0 = time.perf_counter()
            if not claim.uid or "/" in claim.uid:
                self._settle(claim, permanent("case_missing", f"job has no valid uid: {claim.uid!r}"), case_exists=False)
                return
            if claim.exhausted:
                reason, _, detail = claim.last_error.partition(": ")
                if reason not in cases.FAILURE_REASONS:
                    reason, detail = "worker_crashed", "no result after the maximum number of attempts"
                raise permanent(reason, f"{detail} (gave up after {claim.attempt - 1} attempts)")
            case = db.reference(cases.case_path(claim.uid, claim.case_id), app=self.app).get()
            if not isinstance(case, dict):
                self._settle(claim, permanent("case_missing", f"no case at {cases.case_path(claim.uid, claim.case_id)}"),
                             case_exists=False)
                return
            status = case.get("status")
            if status in cases.WORKER_FINISHED:
                self.jobs.mark_done(claim)  # a previous attempt wrote the result but died before settling
                log.info("already diagnosed", extra=_fields(caseId=claim.case_id))
                self._end(claim)
                return
            self.jobs.set_processing(claim)
            path, digest = expected_image(case, claim.uid, claim.case_id)
            upload = download(self.bucket, path, digest)
            download_ms = round((time.perf_counter() - t0) * 1000.0, 1)
            prepared = prepare(upload.data, self.analysis)
            prepared.timings_ms["download"] = download_ms
            if self.config.fault_hold_s:
                self._halt.wait(self.config.fault_hold_s)
                if self._halt.is_set():  # shut down meanwhile: the lease was released
                    return
            self._ready.put(_Work(claim, case, prepared, t0))
            handed_over = True
        except JobError as err:
            self._settle(claim, err)
        except LeaseLost:
            self.metrics.add("leaseLost")
            self._end(claim)
        except Exception as exc:
            log.exception("unexpected error before inference", extra=_fields(caseId=claim.case_id))
            self._settle(claim, transient("internal_error", repr(exc)))
        finally:
            with self._lock:
                self._front -= 1
            if not handed_over:
                self._end(claim)

    # ---- stage 2: micro-batched inference ----------------------------------------------------
    def _collect(self) -> list[_Work] | None:
        try:
            items = [self._ready.get(timeout=0.2)]
        except queue.Empty:
            return None
        deadline = time.monotonic() + self.config.batch_wait_ms / 1000.0
        while len(items) < self.config.batch_size:
            try:
                items.append(self._ready.get_nowait())
                continue
            except queue.Empty:
                pass
            with self._lock:
                more_coming = self._front > 0
            remaining = deadline - time.monotonic()
            if not more_coming or remaining <= 0:
                break
            try:
                items.append(self._ready.get(timeout=min(remaining, 0.005)))
            except queue.Empty:
                continue
        return items

    def _batcher(self) -> None:
        while not self._halt.is_set():
            items = self._collect()
            if not items:
                continue
            model = self.models.current()
            self.metrics.batch(len(items))
            try:
                results = infer(model, [w.prepared for w in items], explain=self.config.heatmaps)
            except Exception as exc:
                if len(items) == 1:
                    log.exception("model call failed", extra=_fields(caseId=items[0].claim.case_id))
                    self._write_pool.submit(self._settle, items[0].claim,
                                            transient("model_error", f"{model.version}: {exc!r}"))
                    continue
                # One bad input must not fail its batch-mates: run them one by one.
                log.warning("batch failed; retrying one by one", extra=_fields(size=len(items), error=repr(exc)))
                for work in items:
                    self._ready.put(work)
                self._single_pass(len(items))
                continue
            for work, result in zip(items, results, strict=True):
                self._write_pool.submit(self._finish, work, result)

    def _single_pass(self, n: int) -> None:
        for _ in range(n):
            work = self._ready.get()
            model = self.models.current()
            try:
                result = infer(model, [work.prepared], explain=self.config.heatmaps)[0]
            except Exception as exc:
                log.exception("model call failed", extra=_fields(caseId=work.claim.case_id))
                self._write_pool.submit(self._settle, work.claim, transient("model_error", f"{model.version}: {exc!r}"))
                continue
            self._write_pool.submit(self._finish, work, result)

    # ---- stage 3: heatmap upload and the atomic result write ----------------------------------
    def _finish(self, work: _Work, result: Inferred) -> None:
        claim = work.claim
        try:
            heatmap_path = None
            if self.config.heatmaps and result.heatmap is not None:
                t = time.perf_counter()
                heatmap_path = cases.heatmap_object(claim.uid, claim.case_id)
                blob = self.bucket.blob(heatmap_path)
                blob.upload_from_string(heatmap_png(work.prepared, result), content_type="image/png")
                work.prepared.timings_ms["heatmapUpload"] = round((time.perf_counter() - t) * 1000.0, 1)
            now = now_ms()
            work.prepared.timings_ms["total"] = round((time.perf_counter() - work.started) * 1000.0, 1)
            cloud = record(work.prepared, result, heatmap_path, now)
            if result.probs is None:  # declined by the checks: a person should look at the photo
                points = triage.RISK_POINTS[None]
            else:
                disagreement = triage.disagrees(work.case.get("device"), cloud["top"][0]["label"], cloud["risk"])
                points = triage.urgency(cloud["risk"], cloud["malignantP"], np.asarray(result.probs), disagreement)
            created = work.case.get("createdAt")
            entry = cases.queue_entry(claim.uid, cases.Status.DIAGNOSED, cloud["risk"],
                                      triage.score(points, created, now), created, now)
            self.jobs.complete(claim, cloud, entry)
            latency = now_ms() - claim.created_at if claim.created_at else None
            self.metrics.done(latency)
            log.info("diagnosed", extra=_fields(caseId=claim.case_id, model=result.model.version, risk=cloud["risk"],
                                                 batch=work.prepared.timings_ms.get("batch"), latencyMs=latency))
        except CaseGone:  # erased meanwhile (issue 17): leave nothing behind, not even the heatmap
            self.metrics.add("erased")
            log.warning("the case was erased; result dropped", extra=_fields(caseId=claim.case_id))
            if heatmap_path is not None:
                with contextlib.suppress(Exception):
                    self.bucket.blob(heatmap_path).delete()
        except LeaseLost:
            self.metrics.add("leaseLost")
            log.warning("lease lost before the result was written; result dropped", extra=_fields(caseId=claim.case_id))
        except Exception as exc:
            log.exception("writing the result failed", extra=_fields(caseId=claim.case_id))
            self._settle(claim, transient("internal_error", repr(exc)))
            return
        finally:
            self._end(claim)

    # ---- failures ---------------------------------------------------------------------------
    def _settle(self, claim: Claim, err: JobError, case_exists: bool = True) -> None:
        """Retry later with backoff, or give up with a reason; never lets an error escape."""
        try:
            if err.permanent or claim.attempt >= self.jobs.max_attempts:
                now = now_ms()
                # A failed case still reaches a dermatologist (what the patient is told), unranked by risk.
                entry = cases.queue_entry(claim.uid, cases.Status.FAILED, None,
                                          triage.score(triage.RISK_POINTS[None], claim.created_at, now),
                                          claim.created_at, now)
                self.jobs.fail(claim, err.reason, err.detail, case_exists=case_exists, queue_entry=entry)
                self.metrics.failed(err.reason)
                log.warning("failed", extra=_fields(caseId=claim.case_id, reason=err.reason, detail=err.detail,
                                                    attempt=claim.attempt))
            else:
                delay = int(self.config.backoff_ms * 2 ** (claim.attempt - 1) * random.uniform(0.8, 1.2))
                self.jobs.retry_later(claim, delay, f"{err.reason}: {err.detail}")
                self.metrics.add("retried")
                log.info("retry later", extra=_fields(caseId=claim.case_id, reason=err.reason, detail=err.detail,
                                                      attempt=claim.attempt, delayMs=delay))
                timer = threading.Timer(delay / 1000.0 + 0.05, self._offer, args=(claim.case_id,))
                timer.daemon = True
                timer.start()
        except LeaseLost:
            self.metrics.add("leaseLost")
        except Exception as exc:  # e.g. the database is unreachable: the lease expires, a sweep retries
            log.warning("could not record the outcome", extra=_fields(caseId=claim.case_id, error=str(exc)))
        finally:
            self._end(claim)

    # ---- leases and heartbeat -----------------------------------------------------------------
    def _renewer(self) -> None:
        interval = max(0.2, self.config.lease_ms / 3000.0)
        while not self._halt.wait(interval):
            with self._lock:
                claims = list(self._inflight.values())
            for claim in claims:
                try:
                    self.jobs.renew(claim)
                except LeaseLost:
                    log.warning("lease lost", extra=_fields(caseId=claim.case_id))
                except Exception as exc:
                    log.warning("lease renewal failed", extra=_fields(caseId=claim.case_id, error=str(exc)))

    def status(self, state: str) -> dict[str, Any]:
        snap = self.metrics.snapshot()
        with self._lock:
            snap["inFlight"] = len(self._inflight)
        snap.update(state=state, modelVersion=self.models.current().version, startedAt=self.started_at,
                    updatedAt=now_ms(), concurrency=self.config.concurrency, batchSize=self.config.batch_size)
        return snap

    def _publish(self, state: str) -> None:
        try:
            snap = self.status(state)
            snap["queueDepth"] = self.jobs.queue_depth()
            db.reference(f"workers/{self.worker_id}", app=self.app).set(snap)
        except Exception as exc:
            log.warning("heartbeat failed", extra=_fields(error=str(exc)))

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.config.heartbeat_s):
            self._publish("running")
