"""The patient app's sync engine: sends the cases in the local store and follows them on the server.

The app never waits for the network. A photo becomes a case in :class:`client.store.LocalStore`
first; this engine, on one background thread, then takes the signed-in patient's pending cases in
the order they were made and for each one:

1. marks it ``uploading``;
2. uploads the photo to ``cases.image_object(uid, caseId)`` with the resumable protocol, its
   session URL kept in the case's row, so an upload cut by a lost network, a backend restart or a
   killed app goes on from the byte the server has (an object already there with the same sha256 is
   not sent again);
3. writes the case and its job in ONE multi-path write (``cases.new_case_writes``), which the rules
   let the patient repeat while the worker has not touched the case;
4. marks it ``queued``.

Then it sends the chat messages the patient wrote while offline (the store's outbox), each at the
id it was given when written, so a retry never posts one twice.

The case id is fixed when the photo is taken, so however often a step is repeated there is one case
and one job. When the backend cannot be reached the case stays pending and the engine tries again
with exponential backoff (capped, with jitter), or at once on :meth:`SyncEngine.kick` (a new case,
the network is back). When the server refuses a case for good (rules, malformed) it is marked
``failed`` on the phone with the reason in plain words and the queue moves on. All state is in the
store, so a new engine after an app restart resumes where the last one stopped.

It also keeps the phone up to date: a :class:`~dermaloop.database.Mirror` of ``cases/{uid}`` puts
every server change (the worker's result, a review, a case made on another device) into the store,
and one of the patient's messages keeps each case's chat; ``on_change(caseId)`` tells the UI what
changed, ``on_change(None)`` that :attr:`SyncEngine.state` or :attr:`SyncEngine.online` did.

The session object is the token source of every request and listener, so expired ID tokens are
refreshed and the listeners reconnect with a fresh one by themselves.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
from collections.abc import Callable
from typing import Any

from client.store import LocalCase, LocalStore
from dermaloop import cases
from dermaloop.auth import UserSession
from dermaloop.cases import Status
from dermaloop.database import CONNECTED, Event, Mirror, UserDatabase, new_push_id
from dermaloop.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ServiceError,
    Unauthenticated,
    Unavailable,
)
from dermaloop.http import RetryPolicy
from dermaloop.settings import Settings
from dermaloop.storage import CHUNK_BYTES, UserStorage

__all__ = ["BACKOFF", "IDLE", "OFFLINE", "RETRYING", "SIGNED_OUT", "STOPPED", "SYNCING", "SyncEngine"]

log = logging.getLogger(__name__)

# SyncEngine.state
STOPPED = "stopped"  # not started, or stopped
IDLE = "idle"  # nothing left to send
SYNCING = "syncing"  # sending a case
OFFLINE = "offline"  # the backend cannot be reached; trying again with backoff
RETRYING = "retrying"  # an unexpected error; trying again with backoff
SIGNED_OUT = "signed_out"  # the session ended (revoked, account gone): sign in again

# Between sync rounds after a failure: 1 s, 2 s, 4 s ... up to a minute, each with jitter.
BACKOFF = RetryPolicy(base_delay=1.0, max_delay=60.0)

# Words for the patient when a case cannot be sent as it is.
PHOTO_REFUSED = "The server did not accept this photo. It may be too large or not a JPEG, PNG or WebP picture."
CASE_REFUSED = "The server did not accept this case. Please take the photo again."
PHOTO_MISSING = "The photo is no longer on this phone. Please take it again."
PHOTO_DAMAGED = "The photo on this phone was damaged after it was taken. Please take it again."
UPLOAD_MISMATCH = "The photo did not arrive intact. Please take it again."
MESSAGE_REFUSED = "Not sent: the service did not accept this message."


class _Stopped(Exception):
    """Raised inside an upload's progress callback to end it at once when the engine stops (the
    session URL stays in the store, so the next engine goes on from there)."""


def _messages_root(uid: str) -> str:
    """``messages/{uid}``: the patient's chats (``cases`` names only one case's chat path)."""
    return cases.messages_path(uid, "_").rpartition("/")[0]


def _md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


class SyncEngine:
    """Sends ``session``'s pending cases from ``store`` and keeps the store in step with the server.

    ``retry`` is the backoff between sync rounds after a failure (default :data:`BACKOFF`);
    ``request_retry`` how hard each request is retried before a round counts as failed (the
    clients' default); ``chunk_bytes`` the upload chunk (a multiple of 256 KiB).
    ``on_change(caseId | None)`` is called from background threads; keep it short.
    """

    def __init__(self, store: LocalStore, session: UserSession, settings: Settings, *,
                 on_change: Callable[[str | None], None] | None = None, retry: RetryPolicy | None = None,
                 request_retry: RetryPolicy | None = None, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.store = store
        self.session = session
        self.uid = session.uid
        self.settings = settings
        self.on_change = on_change
        self.retry = retry or BACKOFF
        self.chunk_bytes = chunk_bytes
        self.db = UserDatabase(session, settings, retry=request_retry)
        self.storage = UserStorage(session, settings, retry=request_retry)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._mirrors_ready = threading.Event()
        self._session_ended = threading.Event()  # set on Unauthenticated, cleared by any contact that worked
        self._thread: threading.Thread | None = None
        self._cases: Mirror | None = None
        self._messages: Mirror | None = None
        self._state = STOPPED
        self._online = False
        self._error: str | None = None
        self._progress: dict[str, tuple[int, int]] = {}

    # ---- what the UI reads ------------------------------------------------------------------------
    @property
    def state(self) -> str:
        """"stopped", "idle", "syncing", "offline", "retrying" or "signed_out"."""
        with self._lock:
            return self._state

    @property
    def online(self) -> bool:
        """Whether the last contact with the backend worked."""
        with self._lock:
            return self._online

    @property
    def error(self) -> str | None:
        """Why the engine is offline, retrying or signed out (one line), else None."""
        with self._lock:
            return self._error

    def progress(self, case_id: str) -> tuple[int, int] | None:
        """``(bytes on the server, total)`` of the photo being uploaded, else None."""
        with self._lock:
            return self._progress.get(case_id)

    def cases(self) -> list[LocalCase]:
        """The patient's cases, newest first (see :meth:`LocalStore.cases`)."""
        return self.store.cases(self.uid)

    # ---- life cycle -------------------------------------------------------------------------------
    def start(self) -> SyncEngine:
        """Start sending and following (returns at once; safe to call offline)."""
        if self._thread is not None and self._thread.is_alive():
            return self
        self._stop.clear()
        self._mirrors_ready.clear()
        self._set(state=IDLE)
        self._cases = self.db.mirror(cases.patient_cases_path(self.uid), self._on_cases,
                                     on_state=self._on_listener_state, on_error=self._on_listener_error,
                                     on_cancel=self._on_listener_cancel)
        self._messages = self.db.mirror(_messages_root(self.uid), self._on_messages,
                                        on_state=self._on_listener_state, on_error=self._on_listener_error,
                                        on_cancel=self._on_listener_cancel)
        self._mirrors_ready.set()
        self._thread = threading.Thread(target=self._run, name=f"case-sync:{self.uid}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop sending (an upload in progress ends after its current chunk, resumable later) and
        following. Safe from any thread, also from ``on_change``, and more than once."""
        self._stop.set()
        self._wake.set()
        self._mirrors_ready.set()  # a callback waiting for the mirrors must not hang
        for mirror in (self._cases, self._messages):
            if mirror is not None:
                mirror.close()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self._set(state=STOPPED)

    def kick(self) -> None:
        """Try now instead of after the backoff: a new case was added, or the network came back."""
        self._wake.set()

    def __enter__(self) -> SyncEngine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- chat --------------------------------------------------------------------------------------
    def messages(self, case_id: str) -> list[dict[str, Any]]:
        """The case's chat, oldest first (``at``), each message with its ``id``; kept in the store,
        so it shows offline too. The patient's messages not on the server yet come last, marked
        ``waiting: True`` (and ``error`` in plain words if the server refused one for good)."""
        shown = self.store.messages(self.uid, case_id)
        seen = {m["id"] for m in shown}
        for item in self.store.outbox(self.uid, case_id):
            if item["id"] not in seen:
                shown.append({**item["record"], "at": item["created_at"], "id": item["id"], "waiting": True,
                              "error": item["error"]})
        return shown

    def send_message(self, case_id: str, text: str) -> str:
        """Send a chat message about one of the patient's cases (which must be on the server);
        returns its id. It goes to the store's outbox first, then is sent at once if the backend
        answers, else by the engine when it is back. The id is made here, so a repeat after a lost
        answer cannot post it twice. Raises ``cases.CaseError`` (a ValueError) for an empty or too
        long text, and a :class:`~dermaloop.errors.ServiceError` when the server refuses it for good
        (it is then not kept)."""
        record = cases.message_record(self.uid, "patient", text)
        msg_id = new_push_id()
        self.store.queue_message(self.uid, case_id, msg_id, record)
        self._notify(case_id)
        try:
            self._deliver(case_id, msg_id, record)
        except (Unavailable, Unauthenticated) as exc:
            log.info("sync engine: message %s waits to be sent (%s)", msg_id, exc)
            if isinstance(exc, Unauthenticated):
                self._signed_out(exc)
            else:
                self._set(online=False)
            self.kick()  # the engine's backoff takes it from here
        except ServiceError:
            self.store.message_sent(self.uid, case_id, msg_id)  # refused: the patient is told, nothing kept
            self._notify(case_id)
            raise
        return msg_id

    def _deliver(self, case_id: str, msg_id: str, record: dict[str, Any]) -> None:
        """Write one message at its own id; a message already there (an earlier try whose answer
        was lost) counts as sent. Then it leaves the outbox."""
        path = f"{cases.messages_path(self.uid, case_id)}/{msg_id}"
        try:
            self.db.set(path, record)
        except PermissionDenied:
            # Messages are never rewritten, so a repeat of a write that got through is refused.
            there = self.db.get(path)
            if not (isinstance(there, dict) and there.get("senderUid") == self.uid
                    and there.get("text") == record["text"]):
                raise
        self._contact_ok()
        self.store.message_sent(self.uid, case_id, msg_id)
        self._notify(case_id)

    def _send_outbox(self) -> None:
        """Send the messages written while offline, oldest first."""
        for item in self.store.outbox(self.uid, failed=False):
            if self._stop.is_set():
                return
            try:
                self._deliver(item["case_id"], item["id"], item["record"])
            except (PermissionDenied, InvalidArgument, NotFound) as exc:
                log.warning("sync engine: message %s refused: %s", item["id"], exc)
                self.store.message_refused(self.uid, item["case_id"], item["id"], MESSAGE_REFUSED)
                self._notify(item["case_id"])

    def mark_read(self, case_id: str) -> None:
        """The patient has seen the case's chat up to its newest message."""
        self.store.mark_read(self.uid, case_id)
        self._notify(case_id)

    def unread(self, case_id: str) -> int:
        """Dermatologist messages the patient has not seen."""
        return self.store.unread(self.uid, case_id)

    def retry_case(self, case_id: str) -> bool:
        """Send a case again that failed on this phone (the patient asked to); False if it cannot be."""
        if not self.store.retry(self.uid, case_id):
            return False
        self._notify(case_id)
        self.kick()
        return True

    # ---- state ---------------------------------------------------------------------------------
    _UNSET: Any = object()

    def _set(self, *, state: str | None = None, online: bool | None = None, error: Any = _UNSET) -> None:
        with self._lock:
            before = (self._state, self._online, self._error)
            if state is not None and not (self._stop.is_set() and state != STOPPED):
                self._state = state
            if online is not None:
                self._online = online
            if error is not SyncEngine._UNSET:
                self._error = error
            changed = before != (self._state, self._online, self._error)
        if changed:
            self._notify(None)

    def _contact_ok(self) -> None:
        """A request or a listener just worked: online, and the session is fine."""
        self._session_ended.clear()
        self._set(online=True)

    def _signed_out(self, exc: ServiceError) -> None:
        """The session cannot be renewed (revoked, account disabled or deleted): sign in again."""
        log.warning("sync engine: the session ended (%s); sign in again", exc)
        self._session_ended.set()
        self._set(state=SIGNED_OUT, online=True, error=str(exc))

    def _notify(self, case_id: str | None) -> None:
        if self.on_change is None:
            return
        try:
            self.on_change(case_id)
        except Exception:
            log.exception("sync engine: on_change(%s) raised; carrying on", case_id)

    # ---- the sending thread ------------------------------------------------------------------------
    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self._drain()
            except _Stopped:
                break
            except Unauthenticated as exc:
                self._signed_out(exc)
                self._wake.wait()
                continue
            except Unavailable as exc:
                failures += 1
                log.info("sync engine: %s; trying again later", exc)
                self._set(state=OFFLINE, online=False, error=str(exc))
                self._wake.wait(self.retry.delay(failures, exc.retry_after))
                continue
            except Exception as exc:  # a bug or a local problem: keep the cases, try again later
                failures += 1
                log.exception("sync engine: unexpected error; trying again later")
                self._set(state=RETRYING, error=f"{type(exc).__name__}: {exc}")
                self._wake.wait(self.retry.delay(failures))
                continue
            failures = 0
            if self._session_ended.is_set():
                self._set(state=SIGNED_OUT)
            else:
                self._set(state=IDLE, error=None)
            self._wake.wait()

    def _drain(self) -> None:
        """Send every pending case, oldest first (a case added meanwhile is picked up too)."""
        while not self._stop.is_set():
            pending = self.store.pending(self.uid)
            if not pending:
                self._send_outbox()  # after the cases: a message needs its case on the server
                return
            self._set(state=SYNCING)
            self._send(pending[0])

    def _fail(self, case: LocalCase, words: str, exc: BaseException | None = None) -> None:
        log.warning("sync engine: case %s cannot be sent: %s (%s)", case.case_id, words, exc)
        self.store.mark_failed(self.uid, case.case_id, words)
        with self._lock:
            self._progress.pop(case.case_id, None)
        self._notify(case.case_id)

    def _send(self, case: LocalCase) -> None:
        case_id = case.case_id
        earlier_attempt = case.status == Status.UPLOADING  # it may have reached the server already
        if not earlier_attempt:
            self.store.set_status(self.uid, case_id, Status.UPLOADING)
            self._notify(case_id)
        try:
            record = case.server_case()
        except cases.CaseError as exc:
            self._fail(case, CASE_REFUSED, exc)
            return
        try:
            data = self.store.image_bytes(case)
        except OSError as exc:
            self._fail(case, PHOTO_MISSING, exc)
            return
        if hashlib.sha256(data).hexdigest() != case.sha256:
            self._fail(case, PHOTO_DAMAGED)
            return
        if earlier_attempt and self._already_on_server(case):
            return
        try:
            if not self._upload(case, data):
                self._fail(case, UPLOAD_MISMATCH)
                return
        except Unauthenticated:
            raise
        except (PermissionDenied, InvalidArgument) as exc:
            self._fail(case, PHOTO_REFUSED, exc)
            return
        try:
            # One multi-path write: the case and its job appear together or not at all.
            self.db.update("/", cases.new_case_writes(record))
        except Unauthenticated:
            raise
        except (PermissionDenied, InvalidArgument) as exc:
            # Refused also when an earlier write got through and the worker has taken the job since.
            if not self._already_on_server(case):
                self._fail(case, CASE_REFUSED, exc)
            return
        self._contact_ok()
        self.store.mark_queued(self.uid, case_id)
        with self._lock:
            self._progress.pop(case_id, None)
        self._notify(case_id)

    def _already_on_server(self, case: LocalCase) -> bool:
        """Whether an earlier attempt created the case: then take the server's copy and move on."""
        remote = self.db.get(cases.case_path(self.uid, case.case_id))
        self._contact_ok()
        image = remote.get("image") if isinstance(remote, dict) else None
        if not (isinstance(image, dict) and image.get("sha256") == case.sha256):
            return False
        self.store.apply_remote(self.uid, case.case_id, remote)
        self.store.mark_queued(self.uid, case.case_id)  # if the server's status was not taken
        with self._lock:
            self._progress.pop(case.case_id, None)
        self._notify(case.case_id)
        return True

    @staticmethod
    def _is_photo(meta: Any, case: LocalCase, md5: str) -> bool:
        """Whether Storage's metadata describes exactly this photo."""
        if not isinstance(meta, dict):
            return False
        custom = meta.get("metadata") if isinstance(meta.get("metadata"), dict) else {}
        return (str(meta.get("size")) == str(case.bytes) and custom.get("sha256") == case.sha256
                and meta.get("md5Hash", md5) == md5)

    def _upload(self, case: LocalCase, data: bytes) -> bool:
        """Put the photo in Storage unless it is there already; False if what arrived is not it."""
        path = cases.image_object(self.uid, case.case_id)
        sessions = self.store.upload_session(self.uid, case.case_id)
        md5 = _md5_b64(data)
        if sessions.load() is None:
            try:
                if self._is_photo(self.storage.metadata(path), case, md5):
                    self._report(case.case_id, case.bytes, case.bytes)
                    return True
            except NotFound:
                pass

        def progress(sent: int, total: int) -> None:
            self._contact_ok()
            self._report(case.case_id, sent, total)

        for _attempt in range(2):
            meta = self.storage.upload(path, data, case.content_type, metadata={"sha256": case.sha256},
                                       chunk_bytes=self.chunk_bytes, session_store=sessions, on_progress=progress)
            if self._is_photo(meta, case, md5):
                return True
            # A saved session that had finished another upload of this path: send ours afresh.
            log.warning("sync engine: the stored photo of case %s is not the one on this phone; sending it again",
                        case.case_id)
            sessions.clear()
        return False

    def _report(self, case_id: str, sent: int, total: int) -> None:
        with self._lock:
            self._progress[case_id] = (sent, total)
        self._notify(case_id)
        if self._stop.is_set():
            raise _Stopped

    # ---- following the server ----------------------------------------------------------------------
    def _on_cases(self, event: Event) -> None:
        self._mirrors_ready.wait()
        mirror = self._cases
        if mirror is None or self._stop.is_set():
            return
        if event.event_type == "put" and event.path.strip("/") == "":
            changed = self.store.apply_remote_all(self.uid, mirror.value)
        else:
            changed = {case_id for case_id in cases.touched_cases(event.path, event.data)
                       if self.store.apply_remote(self.uid, case_id, mirror.get(case_id))}
        for case_id in sorted(changed):
            with self._lock:
                self._progress.pop(case_id, None)
            self._notify(case_id)

    def _on_messages(self, event: Event) -> None:
        self._mirrors_ready.wait()
        mirror = self._messages
        if mirror is None or self._stop.is_set():
            return
        if event.event_type == "put" and event.path.strip("/") == "":
            value = mirror.value
            self.store.replace_all_messages(self.uid, value if isinstance(value, dict) else None)
            touched = set(value) if isinstance(value, dict) else set()
        else:
            touched = cases.touched_cases(event.path, event.data)
            for case_id in touched:
                chat = mirror.get(case_id)
                self.store.replace_messages(self.uid, case_id, chat if isinstance(chat, dict) else None)
        for case_id in sorted(touched):
            self._notify(case_id)

    def _on_listener_state(self, state: str) -> None:
        if state == CONNECTED:
            self._contact_ok()
            self.kick()  # the backend is reachable again: send what waits now, not after the backoff

    def _on_listener_error(self, exc: ServiceError) -> None:
        if isinstance(exc, Unauthenticated):  # the listener gives up: the session cannot be renewed
            self._signed_out(exc)
        elif isinstance(exc, Unavailable):
            self._set(online=False)

    def _on_listener_cancel(self, reason: str) -> None:
        log.warning("sync engine: the server ended a live update (%s)", reason)
        if not self._session_ended.is_set():  # that one already says why
            self._set(error=f"live updates stopped: {reason}")
